"""The terminal client (``trio-chat client``): it speaks the wire protocol, nothing else of the server."""

from __future__ import annotations

from ._chat import ChatClient as ChatClient

__all__ = ["ChatClient"]
