"""The HTTP reads for clients: the room list and history pages (docs/protocol.md).

In jwt mode both apply the socket's room rule (`room_allowed`) to the token sent as
``Authorization: Bearer <token>``: the same rooms over HTTP as over the socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response, jsonify, request

from .._errors import ProtocolError, StoreError
from ..protocol._wire import (
    STORE_UNAVAILABLE,
    History,
    encode_event,
    history_request_untrusted,
)
from ..server._auth import room_allowed, unauthorized

if TYPE_CHECKING:
    from collections.abc import Callable

    from quart_trio import QuartTrio

    from ..node._node import Node
    from ..server._auth import Identity


def add_room_reads(quart: QuartTrio, node: Callable[[], Node]) -> None:
    """Add the room list and history routes to ``quart``; ``node`` is the running node
    or aborts."""

    def caller(n: Node, *, required: bool) -> Identity | None:
        """jwt mode: who sent ``Authorization: Bearer <token>`` (None: no header and
        not ``required``; always None in open mode).

        Raises:
          ProtocolError: ``unauthorized``: a bad token, or none when ``required``.
        """
        if n.tokens is None:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            if not required and not scheme:
                return None
            raise unauthorized("send Authorization: Bearer <token>")
        return n.tokens.check_untrusted(token.strip())

    @quart.get("/api/rooms")
    async def rooms() -> Response | tuple[Response, int]:
        n = node()
        try:
            identity = caller(n, required=False)
        except ProtocolError as exc:
            return jsonify(code=exc.code, message=exc.message), 401
        public = n.settings.public_room_patterns
        return jsonify(
            rooms=[
                {"room": r, "members": n.members(r)}
                for r in n.hub.room_names()
                if room_allowed(identity, r, public)
            ]
        )

    @quart.get("/api/rooms/<room>/messages")
    async def messages(room: str) -> Response | tuple[Response, int]:
        n = node()
        try:
            identity = caller(n, required=True)
        except ProtocolError as exc:
            return jsonify(code=exc.code, message=exc.message), 401
        if not room_allowed(identity, room, n.settings.public_room_patterns):
            return jsonify(code="forbidden", message=f"you may not see {room!r}"), 403
        try:
            page_request = history_request_untrusted(
                room, request.args.get("before") or None, request.args.get("limit", "50")
            )
            page, more = await n.page(room, page_request.before, page_request.limit)
        except ProtocolError as exc:
            status = 404 if exc.code == "unknown_id" else 400
            return jsonify(code=exc.code, message=exc.message), status
        except StoreError:
            # Logged and counted by the node; this request alone fails.
            return jsonify(code="store_unavailable", message=STORE_UNAVAILABLE), 503
        body = encode_event(History(room=room, messages=[m.event() for m in page], more=more))
        return Response(body, content_type="application/json")
