"""The server's settings, read from ``TRIO_CHAT_*`` and validated (pure: no I/O but the environment)."""

from __future__ import annotations

from ._settings import Settings as Settings

__all__ = ["Settings"]
