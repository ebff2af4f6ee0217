"""Moved to tfx.core.config; `python -m tfx.config` still runs it, and config files written for the
old layout still import `default_config` from here."""
from tfx.core.cli import moved
from tfx.core.config import default_config

__all__ = ["default_config"]

moved(__name__, "tfx.config", "tfx.core.config")
