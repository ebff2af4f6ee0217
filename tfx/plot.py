"""Moved to tfx.train.plot; `python -m tfx.plot` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.plot", "tfx.train.plot")
