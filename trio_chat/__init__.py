"""trio-chat: a real-time chat server on Trio.

``hypercorn trio_chat:app --worker-class trio`` serves the page and the HTTP API on port
8000 and starts the chat socket on port 8001.
"""

from __future__ import annotations

from ._errors import BadPacket as BadPacket
from ._errors import ChatError as ChatError
from ._errors import ConfigError as ConfigError
from ._errors import ProtocolError as ProtocolError
from .app._app import ChatApp as ChatApp
from .app._app import app as app
from .settings._settings import Settings as Settings

__all__ = ["BadPacket", "ChatApp", "ChatError", "ConfigError", "ProtocolError", "Settings", "app"]
