"""One INFO line when a client's WebSocket opens and one when it closes, on both transports.

The lines go to the ``trio_chat.connections`` logger, so an operator can silence them
(``logging.getLogger("trio_chat.connections").setLevel(logging.WARNING)``) without
losing the rest. Each line is ``key=value`` pairs after a fixed word, and the same
fields ride along as the record's extra attributes for a JSON formatter:

    connection open client=203.0.113.7 transport=chat peer=127.0.0.1:50412 node=a1b2c3
    connection closed client=203.0.113.7 transport=chat code=1000 duration=12.345 node=a1b2c3

``client`` is the address the server believes (a trusted proxy's ``X-Forwarded-For``,
else the TCP peer), ``peer`` the TCP peer, ``transport`` ``chat`` (the chat socket) or
``ws-fallback`` (``/ws``), ``code`` the WebSocket close code (1006: the connection was
lost without a close frame), ``duration`` seconds from open to close. A handshake that
is refused opens nothing and logs no line here (it is counted in ``/metrics``).
"""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger("trio_chat.connections")

Transport = Literal["chat", "ws-fallback"]


def log_open(client: str, transport: Transport, peer: str, node: str) -> None:
    """Log that a client's WebSocket was accepted."""
    log.info(
        "connection open client=%s transport=%s peer=%s node=%s",
        client,
        transport,
        peer,
        node,
        extra={"client": client, "transport": transport, "peer": peer, "node": node},
    )


def log_closed(client: str, transport: Transport, code: int, duration: float, node: str) -> None:
    """Log that a client's WebSocket ended, with its close code, ``duration`` seconds after
    it opened."""
    log.info(
        "connection closed client=%s transport=%s code=%d duration=%.3f node=%s",
        client,
        transport,
        code,
        duration,
        node,
        extra={
            "client": client,
            "transport": transport,
            "code": code,
            "duration": round(duration, 3),
            "node": node,
        },
    )
