"""The server API, for the app's backend: publish, delete, disconnect (docs/auth.md).

Off (404 on every route) unless ``TRIO_CHAT_API_KEY`` is set. The key comes as
``Authorization: Bearer <key>`` and is compared in constant time; without it, 401.
Input is checked by the chat socket's rules and refused with its error codes (400).
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Final

from quart import Response, jsonify, request

from .._errors import ProtocolError, StoreError
from ..protocol._wire import (
    MAX_USER,
    STORE_UNAVAILABLE,
    Ack,
    delete_request_untrusted,
    publish_request_untrusted,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from quart_trio import QuartTrio

    from ..node._node import Node

log = logging.getLogger("trio_chat.api")

_Answer = (
    Response
    | tuple[Response, int]
    | tuple[Response, int, dict[str, str]]
    | tuple[str, int, dict[str, str]]
)
# A refusal leaves the body unread: the client must not send its next request on this
# connection (hypercorn then sometimes never hands that request's body on).
_CLOSE: Final = {"Connection": "close"}


def add_server_api(quart: QuartTrio, node: Callable[[], Node]) -> None:
    """Add the server API's routes to ``quart``; ``node`` is the running node or aborts."""

    def refusal(n: Node) -> tuple[str, int, dict[str, str]] | None:
        key = n.settings.api_key
        if key is None:
            return "not found\n", 404, _CLOSE
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, b"Bearer " + key):
            log.debug("refused a server API call without the API key")
            n.count_error("api_unauthorized")
            return "the server API needs Authorization: Bearer <TRIO_CHAT_API_KEY>\n", 401, _CLOSE
        return None

    @quart.post("/api/rooms/<room>/messages")
    async def publish(room: str) -> _Answer:
        n = node()
        refused = refusal(n)
        if refused is not None:
            return refused
        body = await _body(n.settings.max_frame)
        if body is None:
            too_big = jsonify(code="too_big", message="the body is over TRIO_CHAT_MAX_FRAME")
            return too_big, 413, _CLOSE
        try:
            command, sender, uid = publish_request_untrusted(room, body, n.settings.max_text)
            answer = await n.publish(sender, command, uid)
        except ProtocolError as exc:
            n.count_error(exc.code)
            return jsonify(code=exc.code, message=exc.message), 400
        except StoreError:
            return jsonify(code="store_unavailable", message=STORE_UNAVAILABLE), 503
        if not isinstance(answer, Ack):
            return jsonify(code=answer.code, message=answer.message), 503
        if answer.duplicate:
            return jsonify(id=answer.id, duplicate=True), 201
        return jsonify(id=answer.id), 201

    @quart.delete("/api/rooms/<room>/messages/<message_id>")
    async def delete(room: str, message_id: str) -> _Answer:
        n = node()
        refused = refusal(n)
        if refused is not None:
            return refused
        try:
            command = delete_request_untrusted(room, message_id)
            # A second delete of one message changes nothing and answers the same.
            await n.delete(command.room, command.id)
        except ProtocolError as exc:
            status = 404 if exc.code == "unknown_id" else 400
            return jsonify(code=exc.code, message=exc.message), status
        except StoreError:
            return jsonify(code="store_unavailable", message=STORE_UNAVAILABLE), 503
        return Response("", 204)

    @quart.post("/api/users/<user>/disconnect")
    async def disconnect(user: str) -> _Answer:
        n = node()
        refused = refusal(n)
        if refused is not None:
            return refused
        if len(user) > MAX_USER:
            return jsonify(code="bad_user", message=f"user ids are at most {MAX_USER}"), 400
        return jsonify(closed=n.disconnect(user)), 200


async def _body(limit: int) -> bytes | None:
    """The request's body, or None once it is over ``limit`` bytes (read no further)."""
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)
