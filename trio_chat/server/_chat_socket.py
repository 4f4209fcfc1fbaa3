"""The chat socket's connection handler: from an accepted WebSocket to a session."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from typing import TYPE_CHECKING

import trio

from ..protocol._hosts import host_allowed, origin_allowed
from ._connection import ConnectionClosed
from ._connection_log import log_open
from ._session import Session

if TYPE_CHECKING:
    from ._connection import HandshakeRequest, WebSocketConnection
    from ._ports import ChatService

log = logging.getLogger("trio_chat.chat_socket")


async def handle_chat_socket(
    node: ChatService, conn: WebSocketConnection, request: HandshakeRequest
) -> None:
    """Check the handshake, then run the client's session until it ends.

    Cancellation: the connection's nursery is cancelled when its socket is done; the
    session leaves its rooms in ``finally`` without awaiting.
    """
    await trio.lowlevel.checkpoint()  # a refusal awaits nothing else
    if not host_allowed(request.host, node.settings):
        # A DNS-rebinding page, or a name the operator has not listed (_hosts.py).
        log.debug("refused %s: Host %r is not allowed", conn.remote, request.host)
        node.count_error("bad_host")
        conn.reject(400, "bad host\n")
        return
    if request.path != "/ws":
        conn.reject(404, "the chat socket is at /ws\n")
        return
    if not origin_allowed(
        request.origin, request.host, node.settings.allowed_origins, secure=request.secure
    ):
        # Counted in /metrics; a page hammering us must not fill the log.
        log.debug("refused %s: origin %s is not allowed", conn.remote, request.origin)
        node.count_error("origin_refused")
        conn.reject(403, "this origin may not open the chat socket\n")
        return
    query = urllib.parse.parse_qs(request.query)
    names, client_ids, tokens = query.get("name"), query.get("client_id"), query.get("token")
    conn.accept()
    log_open(request.client, "chat", conn.peer, node.node_id)
    session = Session(
        node,
        conn,
        names[0] if names else None,
        client_ids[0] if client_ids else None,
        tokens[0] if tokens else None,
    )
    node.register(session)
    with contextlib.suppress(ConnectionClosed):
        await session.run(conn.receive_messages_untrusted)
