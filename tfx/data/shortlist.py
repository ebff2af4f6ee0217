"""Moved to tfx.compress.shortlist; `python -m tfx.data.shortlist` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.data.shortlist", "tfx.compress.shortlist")
