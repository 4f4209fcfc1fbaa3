"""The top: the Quart app and its lifespan, metrics, the ``trio-chat`` command and the supervisor."""

from __future__ import annotations

from ._app import ChatApp as ChatApp
from ._app import app as app
from ._cli import main as main

__all__ = ["ChatApp", "app", "main"]
