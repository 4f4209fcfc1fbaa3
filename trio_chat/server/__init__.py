"""The client-facing trio shells: the chat socket's listener and connections, sessions, hub, ``/ws``."""

from __future__ import annotations

from ..protocol._hosts import origin_allowed as origin_allowed
from ._asgi_transport import AsgiTransport as AsgiTransport
from ._boundary import FailureBoundary as FailureBoundary
from ._chat_socket import handle_chat_socket as handle_chat_socket
from ._connection import ConnectionClosed as ConnectionClosed
from ._connection import HandshakeRequest as HandshakeRequest
from ._connection import WebSocketConnection as WebSocketConnection
from ._hub import Hub as Hub
from ._hub import Outgoing as Outgoing
from ._limits import ConnectionLimits as ConnectionLimits
from ._limits import default_max_connections as default_max_connections
from ._listener import ChatSocketStatistics as ChatSocketStatistics
from ._listener import WebSocketServer as WebSocketServer
from ._session import Session as Session

__all__ = [
    "AsgiTransport",
    "ChatSocketStatistics",
    "ConnectionClosed",
    "ConnectionLimits",
    "FailureBoundary",
    "HandshakeRequest",
    "Hub",
    "Outgoing",
    "Session",
    "WebSocketConnection",
    "WebSocketServer",
    "default_max_connections",
    "handle_chat_socket",
    "origin_allowed",
]
