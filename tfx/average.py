"""Moved to tfx.compress.average; `python -m tfx.average` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.average", "tfx.compress.average")
