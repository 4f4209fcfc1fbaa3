"""Hypercorn's side of who the client is: the scope behind a trusted proxy, and the
``/ws`` connection's log lines.

`resolve_scope` applies the one rule of protocol/_proxies.py to every request and
WebSocket on hypercorn's port, before anything reads the scope: Quart's
``remote_addr`` and ``scheme``, the ``/ws`` caps, the origin check and the logs then all
see the client, never the proxy. Hypercorn ships a ``ProxyFixMiddleware``; it is not
used because it believes the headers from any peer (it counts hops, it does not check
who is speaking), and the chat socket needs the same rule anyway. The scope is changed
in place, so hypercorn's own access log names the client too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from ..protocol._codes import CLOSE_ABNORMAL, CLOSE_NORMAL
from ..protocol._proxies import resolve_client_untrusted
from ..server._connection_log import log_closed, log_open

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..protocol._proxies import TrustedProxies

log = logging.getLogger("trio_chat.app")

Scope = dict[str, Any]
#: The scope key that keeps the TCP peer (``host:port``) once ``client`` names the client.
PEER: Final = "trio_chat.peer"
_SECURE: Final = {"http": "https", "websocket": "wss"}
_PLAIN: Final = {"http": "http", "websocket": "ws"}


def resolve_scope(scope: Scope, proxies: TrustedProxies) -> None:
    """Make ``scope``'s ``client`` and ``scheme`` the client's, if a trusted proxy says so."""
    client = scope.get("client")
    peer = str(client[0]) if client else "?"
    scope[PEER] = f"{peer}:{client[1]}" if client else "?"
    if not proxies:
        return
    found = resolve_client_untrusted(peer, scope["headers"], proxies)
    if found.problem is not None:
        # The proxy's doing, or a client's through it: not worth more than DEBUG.
        log.debug("%s: forwarding headers not used: %s", peer, found.problem)
    if found.address != peer:
        scope["client"] = (found.address, 0)
    if found.scheme is not None:
        schemes = _SECURE if found.scheme == "https" else _PLAIN
        scope["scheme"] = schemes[scope["type"]]


async def serve_logged_websocket(
    app: Callable[..., Awaitable[None]],
    scope: Scope,
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
    node_id: str,
) -> None:
    """Run ``app`` on a WebSocket scope, logging its open and close (`_connection_log`).

    The close code is that of whoever closed first: the app's ``websocket.close``, or
    the client's as hypercorn reports it (app/_hypercorn.py passes it on), 1006 when
    the connection was lost.
    """
    client = str((scope.get("client") or ["?"])[0])
    opened_at: float | None = None
    code: int | None = None

    async def logged_receive() -> dict[str, Any]:
        nonlocal code
        event = await receive()
        if event["type"] == "websocket.disconnect" and code is None:
            code = int(event.get("code", CLOSE_ABNORMAL))
        return event

    async def logged_send(event: dict[str, Any]) -> None:
        nonlocal opened_at, code
        await send(event)
        if event["type"] == "websocket.accept":
            opened_at = trio.current_time()
            log_open(client, "ws-fallback", scope.get(PEER, "?"), node_id)
        elif event["type"] == "websocket.close" and code is None and opened_at is not None:
            code = int(event.get("code", CLOSE_NORMAL))

    try:
        await app(scope, logged_receive, logged_send)
    finally:
        if opened_at is not None:
            log_closed(
                client,
                "ws-fallback",
                CLOSE_ABNORMAL if code is None else code,
                trio.current_time() - opened_at,
                node_id,
            )
