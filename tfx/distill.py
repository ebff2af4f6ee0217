"""Moved to tfx.compress.distill; `python -m tfx.distill` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.distill", "tfx.compress.distill")
