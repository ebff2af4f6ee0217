"""Moved to tfx.compress.lowrank; `python -m tfx.lowrank` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.lowrank", "tfx.compress.lowrank")
