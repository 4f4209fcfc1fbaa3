"""The sender of a message published over the server API (``POST /api/rooms/<room>/messages``)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import trio

from ..protocol._wire import Ack, ErrorEvent

if TYPE_CHECKING:
    from ..server._hub import Outgoing


class ApiSender:
    """The sender of a message published over the server API: it awaits its own ack.

    A `Member` that is in no room: the commit task answers it as it answers a session
    (`Ack`, or the ``store_unavailable`` error), through the hub, in commit order.

    Args:
      name: the ``from`` of the message.
      uid: its ``uid`` (the app's id of the user it speaks for), or None.
    """

    def __init__(self, name: str, uid: str | None) -> None:
        self.name = name
        self.uid = uid
        #: In no room, it claims no name.
        self.owner = b""
        self.answer: Ack | ErrorEvent | None = None
        self.answered = trio.Event()

    @property
    def user(self) -> str:
        return self.name

    def deliver_nowait(self, out: Outgoing) -> None:
        for event in out.events:
            if isinstance(event, Ack | ErrorEvent):
                self.answer = event
                self.answered.set()

    def retry_key(self, cid: str) -> str:
        """The API's own retry keys: a backend's retry dedupes against its first try.

        ``api`` is shorter than any client's secret, so no client's key can equal these.
        """
        return hashlib.blake2b(f"api\0{cid}".encode(), digest_size=16).hexdigest()

    def close(self, code: int, reason: str) -> None:
        """Nothing to close: the HTTP request ends with its answer."""
