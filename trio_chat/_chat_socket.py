"""The chat socket's connection handler: from an accepted WebSocket to a session."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from typing import TYPE_CHECKING

from ._session import Session, origin_allowed
from ._websocket import ConnectionClosed

if TYPE_CHECKING:
    from ._node import Node
    from ._websocket import HandshakeRequest, WebSocketConnection

log = logging.getLogger("trio_chat.chat_socket")


async def handle_chat_socket(
    node: Node, conn: WebSocketConnection, request: HandshakeRequest
) -> None:
    """Check the handshake, then run the client's session until it ends.

    Cancellation: the connection's nursery is cancelled when its socket is done; the
    session leaves its rooms in ``finally`` without awaiting.
    """
    if request.path != "/ws":
        conn.reject(404, "the chat socket is at /ws\n")
        return
    if not origin_allowed(request.origin, request.host, node.settings.allowed_origins):
        # Counted in /metrics; a page hammering us must not fill the log.
        log.debug("refused %s: origin %s is not allowed", conn.remote, request.origin)
        node.count_error("origin_refused")
        conn.reject(403, "this origin may not open the chat socket\n")
        return
    names = urllib.parse.parse_qs(request.query).get("name")
    conn.accept()
    session = Session(node, conn, names[0] if names else None)
    node.register(session)
    with contextlib.suppress(ConnectionClosed):
        await session.run(conn.receive_message_untrusted)
