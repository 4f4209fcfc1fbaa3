"""The ``/ws`` fallback's outbound path: a bounded queue drained by one writer task.

Hypercorn's ASGI ``send`` must be awaited per frame, so unlike the chat socket this path
costs a task switch per recipient (docs/architecture.md). The queue is bounded in bytes
by the same backlog limit as the chat socket: broadcasts past it close the client with
4008. Replies the client asked for wait until the queue has drained below half the
bound, as on the chat socket, and never count as lag.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

import trio

from ..protocol._codes import CLOSE_SLOW

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._hub import Outgoing

log = logging.getLogger("trio_chat.transport")


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    """Text the client asked for: not lag."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class AsgiTransport:
    """A session's outbound path over an ASGI WebSocket.

    Args:
      remote: the client's address, for logs.
      limit: bytes of unsent broadcast text the client may hold before it is closed
        as slow.
      on_slow: called when the client is closed as slow (for statistics).
    """

    def __init__(self, remote: str, limit: int, on_slow: Callable[[], None]) -> None:
        self.remote = remote
        self._limit = limit
        self._low_water = limit // 2
        self._on_slow = on_slow
        self._queue: collections.deque[str | _Reply | _Close] = collections.deque()
        self._queued_bytes = 0
        #: Of `_queued_bytes`, those of replies.
        self._reply_bytes = 0
        self._wakeup = trio.Event()
        #: Set when the queue drains to the low-water mark, or output ends.
        self._drained = trio.Event()
        self._closed = False
        self.done = trio.Event()

    def send_payload_nowait(self, payload: bytes) -> None:
        self._put(payload.decode())

    def deliver_nowait(self, out: Outgoing) -> None:
        self._put(out.text)

    async def send_reply(self, payload: bytes) -> None:
        """Queue a reply the client asked for once the queue has drained below half
        the bound. Cancellation: a checkpoint; if cancelled, nothing was queued."""
        await trio.lowlevel.checkpoint()
        while self._queued_bytes > self._low_water and not self._closed:
            self._drained = trio.Event()
            await self._drained.wait()
        if not self._closed:
            text = payload.decode()
            self._queue.append(_Reply(text))
            self._queued_bytes += len(text)
            self._reply_bytes += len(text)
            self._wakeup.set()

    # Its checkpoints are the body's: one on the way out would cancel a body whose work
    # (a stored message) succeeded before its reply went out.
    @contextlib.asynccontextmanager
    async def cancel_on_close(self) -> AsyncIterator[None]:  # noqa: ASYNC911
        """Run the body. Hypercorn answers a client's close by itself, and Quart-trio
        then cancels the whole ``/ws`` handler, whatever it awaits."""
        yield  # noqa: ASYNC911

    def close_nowait(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._drained.set()
        self._queue.append(_Close(code, reason))
        self._wakeup.set()

    def _put(self, text: str) -> None:
        if self._closed:
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        if self._queued_bytes - self._reply_bytes > self._limit:
            log.info("closing %s: backlog over %d bytes (slow client)", self.remote, self._limit)
            self._queue.clear()
            self._queued_bytes = 0
            self._reply_bytes = 0
            self._on_slow()
            self.close_nowait(CLOSE_SLOW, "slow")
        self._wakeup.set()

    async def run_writer(
        self,
        send: Callable[[str], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        cancel_scope: trio.CancelScope,
    ) -> None:
        """Send what is queued, in order; after the close frame, cancel the session.

        Cancellation: whatever is still queued is dropped with the connection.
        """
        while True:
            while not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            item = self._queue.popleft()
            if isinstance(item, _Close):
                await close(item.code, item.reason)
                self.done.set()
                cancel_scope.cancel()
                return
            if isinstance(item, _Reply):
                text = item.text
                self._reply_bytes -= len(text)
            else:
                text = item
            self._queued_bytes -= len(text)
            await send(text)
            if self._queued_bytes <= self._low_water:
                self._drained.set()
