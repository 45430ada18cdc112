"""The trainer's usage error: one class below `config.py` so that modules `config.py` calls need not import it."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A bad flag, flag combination or config file; the message says what to change."""
