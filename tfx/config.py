"""Moved to tfx.core.config; `python -m tfx.config` still runs it."""
from tfx.core.cli import moved

moved(__name__, "tfx.config", "tfx.core.config")

from tfx.core.config import default_config  # noqa: E402, F401  (config files of the old layout)
