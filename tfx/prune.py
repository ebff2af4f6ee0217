"""Moved to tfx.compress.sparsity; `python -m tfx.prune` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.prune", "tfx.compress.sparsity")
