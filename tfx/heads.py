"""Moved to tfx.compress.heads; `python -m tfx.heads` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.heads", "tfx.compress.heads")
