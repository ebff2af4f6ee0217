"""Moved to tfx.tpu.aot; `python -m tfx.aot` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.aot", "tfx.tpu.aot")
