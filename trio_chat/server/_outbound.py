"""The outbound write path of one chat-socket connection: every byte written to its socket.

Outgoing data frames are built by `encode_text_frame` (protocol/_frames.py) once per
broadcast and written with a non-blocking ``send`` to every recipient, so delivering a
broadcast costs one syscall per socket and no task switch.

One outbound path per connection owns every byte written to its socket (data, pong,
close). Bytes the kernel did not take wait in the connection's backlog, in order, and a
writer task (started only while there is backlog) drains them. A direct write happens
only while the backlog is empty: otherwise it would land in the middle of a frame the
writer has half written.

Broadcasts are pushed; a backlog of them over its bound means the client cannot keep up:
the connection is closed with 4008 "slow" and its backlog freed, so no client can grow the
server's memory. Replies the client asked for (a history page, a join's replay) are
pulled instead: `OutboundPath.send_reply` waits until the backlog has drained
below half its bound before queueing one, so a reply of any size goes out as fast as the
client reads it, and its bytes never count as lag.

On a TLS socket (`ssl.SSLSocket`, non-blocking) the same path holds, with two
differences. ``SSLSocket.sendmsg`` does not exist: the writer sends the backlog's frames
one ``send`` each (each one or more TLS records). And a ``send`` that raises
``SSLWantWriteError`` may already have encrypted part of its frame into OpenSSL's
buffer: that frame must be offered again, whole and first, so it is kept in the backlog as
begun (a memoryview) and never dropped. OpenSSL never reports a partial write (no
``SSL_MODE_ENABLE_PARTIAL_WRITE``): a frame is taken whole or not yet.

A close frame is the last frame: after it, or after the client's close, only the frame
already partly on the wire may still go out before it. The connection ends once the
close frame has been written (bounded by the caller), never by cancelling the writer
while it still holds the close.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import ssl
from typing import TYPE_CHECKING, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection

from ..protocol._codes import CLOSE_SLOW
from ..protocol._frames import encode_text_frame

if TYPE_CHECKING:
    import socket

    from wsproto.connection import Connection

    from ._hub import Outgoing

log = logging.getLogger("trio_chat.websocket")

# A slow client's close frame gets this long to drain before the socket is cut.
SLOW_CLOSE_GRACE: Final = 2.0
# sendmsg takes at most IOV_MAX buffers; 64 is plenty to fill a socket buffer.
_MAX_IOV: Final = 64
# What a non-blocking TLS send raises when the kernel takes no more (a read is never
# needed: renegotiation is off, see Settings.chat_socket_tls).
_TLS_WOULD_BLOCK: Final = (ssl.SSLWantWriteError, ssl.SSLWantReadError)


@dataclasses.dataclass
class SocketCounters:
    """Write-path counters shared by all connections of a server."""

    partial_writes: int = 0
    peak_backlog: int = 0
    slow_closes: int = 0
    accept_failures: int = 0


class OutboundPath:
    """The outbound half of `WebSocketConnection` (_connection.py), which adds the inbound one.

    Owns the socket, the connection's nursery (the writer task runs there, and cancelling
    it ends everything the connection started) and the wsproto state that encodes our
    frames and parses the client's.
    """

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        *,
        backlog_limit: int,
        counters: SocketCounters,
    ) -> None:
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._counters = counters
        self._nursery = nursery
        self._ws: WSConnection | Connection = WSConnection(ConnectionType.SERVER)
        self._backlog_limit = backlog_limit
        #: Frames not yet written, in order. A memoryview is a frame partly on the wire.
        self._backlog: collections.deque[bytes | memoryview] = collections.deque()
        self._backlog_bytes = 0
        #: Bytes ever appended to the backlog: the positions `_reply_spans` refer to.
        self._appended = 0
        #: (start, end) positions of the replies in the backlog: they are not lag.
        self._reply_spans: collections.deque[tuple[int, int]] = collections.deque()
        self._reply_low_water = backlog_limit // 2
        #: Set when the backlog drains to the low-water mark, or output ends.
        self._drained = trio.Event()
        self._writer_running = False
        #: No more frames may be queued: a close frame is the last thing written.
        self._output_closed = False
        #: The client's close frame arrived: the connection ends once the backlog is out.
        self._close_received = False
        self._close_code: int | None = None
        self._done = trio.Event()
        self.received_since_ping = True
        try:
            peer = sock.getpeername()
            self.remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.remote = "?"

    @property
    def backlog_bytes(self) -> int:
        """Bytes queued for this client that the kernel has not taken yet."""
        return self._backlog_bytes

    @property
    def closed(self) -> bool:
        return self._output_closed

    def send_nowait(self, data: bytes) -> None:
        """Queue ``data`` (whole frames) for the client without blocking.

        Writes straight to the socket when nothing is queued; otherwise appends to the
        backlog. Past the backlog bound the connection is closed with 4008 "slow".
        """
        if not self._output_closed:
            self._queue(data)

    async def send_reply(self, payload: bytes) -> None:
        """Frame and queue a reply the client asked for, as fast as it reads.

        Waits while the backlog is over half its bound, then queues the whole frame. A
        reply's bytes are not lag: however large, they never close the client as slow.

        Cancellation: a checkpoint; if cancelled, nothing was queued. After the
        connection's output has ended the reply is dropped, like every frame.
        """
        await trio.lowlevel.checkpoint()
        while self._backlog_bytes > self._reply_low_water and not self._output_closed:
            self._drained = trio.Event()
            await self._drained.wait()
        if not self._output_closed:
            self._queue(encode_text_frame(payload), reply=True)

    def _queue(self, data: bytes, *, reply: bool = False) -> None:
        if not self._backlog:
            rest: bytes | memoryview = data
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except _TLS_WOULD_BLOCK:
                # OpenSSL may hold part of it already: offered again first, never dropped.
                sent = 0
                rest = memoryview(data)
            except OSError:
                self.abort()
                return
            if sent == len(data):
                return
            self._counters.partial_writes += 1
            self._append(memoryview(data)[sent:] if sent else rest, reply)
        else:
            self._append(data, reply)
        if self._backlog_bytes > self._counters.peak_backlog:
            self._counters.peak_backlog = self._backlog_bytes
        # A close frame never overflows: it is the one frame that must go out.
        if (
            self._backlog_bytes > self._backlog_limit
            and not self._output_closed
            and self._lag() > self._backlog_limit
        ):
            self._overflow()
        else:
            self._start_writer()

    def _append(self, data: bytes | memoryview, reply: bool) -> None:
        if reply:
            self._drop_written_spans()
            self._reply_spans.append((self._appended, self._appended + len(data)))
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        self._appended += len(data)

    def _drop_written_spans(self) -> None:
        written = self._appended - self._backlog_bytes
        while self._reply_spans and self._reply_spans[0][1] <= written:
            self._reply_spans.popleft()

    def _lag(self) -> int:
        """Backlog bytes that are not replies: broadcasts (and small frames) waiting."""
        self._drop_written_spans()
        written = self._appended - self._backlog_bytes
        replies = sum(end - max(start, written) for start, end in self._reply_spans)
        return self._backlog_bytes - replies

    def send_payload_nowait(self, payload: bytes) -> None:
        """Frame one text payload and queue it (for frames meant for this client only)."""
        self.send_nowait(encode_text_frame(payload))

    def deliver_nowait(self, out: Outgoing) -> None:
        """Queue a broadcast's shared, pre-built frame."""
        self.send_nowait(out.frame)

    def _start_writer(self) -> None:
        if not self._writer_running and self._backlog:
            self._writer_running = True
            self._nursery.start_soon(self._writer)

    # A task of its own (`_start_writer`): no caller awaits it for a checkpoint.
    async def _writer(self) -> None:  # noqa: ASYNC910
        try:
            while self._backlog:
                await trio.lowlevel.wait_writable(self._sock)
                self._flush()
                if self._backlog_bytes <= self._reply_low_water:
                    self._drained.set()
        except OSError:
            self.abort()
            return  # noqa: ASYNC910
        finally:
            self._writer_running = False
        if self._close_received:
            self._finish()

    def _flush(self) -> None:
        """Write as much of the backlog as the kernel takes, keeping frame order."""
        if self._tls:
            sent = self._flush_tls()
        else:
            buffers = [self._backlog[i] for i in range(min(len(self._backlog), _MAX_IOV))]
            try:
                sent = self._sock.sendmsg(buffers)
            except BlockingIOError:
                return
        self._backlog_bytes -= sent
        if sent:
            # The client is reading (its TCP stack acknowledged data): as alive as a
            # pong says, and its pong may sit unread while a long reply goes out.
            self.received_since_ping = True
        while sent:
            head = self._backlog[0]
            if len(head) <= sent:
                sent -= len(head)
                self._backlog.popleft()
            else:
                self._backlog[0] = memoryview(head)[sent:]
                sent = 0

    def _flush_tls(self) -> int:
        """`_flush`'s write on a TLS socket: one ``send`` per frame; the bytes written."""
        sent = 0
        for i in range(min(len(self._backlog), _MAX_IOV)):
            frame = self._backlog[i]
            try:
                sent += self._sock.send(frame)
            except _TLS_WOULD_BLOCK:
                # Part of it may be encrypted already: it must go out next, whole.
                if not isinstance(frame, memoryview):
                    self._backlog[i] = memoryview(frame)
                break
        return sent

    def _overflow(self) -> None:
        self._drop_unstarted()
        self._counters.slow_closes += 1
        log.info(
            "closing %s: backlog over %d bytes (slow client)", self.remote, self._backlog_limit
        )
        # Queued after the kept frame; the writer (started by `_queue`) sends it.
        self.close_nowait(CLOSE_SLOW, "slow")
        self._nursery.start_soon(self._cut_after, SLOW_CLOSE_GRACE)

    def _drop_unstarted(self) -> None:
        """Drop queued frames but the one partly on the wire, if any.

        The client needs that frame's tail to parse anything after it (the close frame).
        """
        head = self._backlog[0] if self._backlog else None
        self._backlog.clear()
        self._reply_spans.clear()
        self._backlog_bytes = 0
        if isinstance(head, memoryview):
            self._backlog.append(head)
            self._backlog_bytes = len(head)

    async def _cut_after(self, grace: float) -> None:
        await trio.sleep(grace)
        self._finish()

    def close_nowait(self, code: int, reason: str = "") -> None:
        """Start the closing handshake: queue a close frame; nothing may follow it."""
        if self._output_closed:
            return
        self._close_code = code
        try:
            data = self._ws.send(CloseConnection(code=code, reason=reason))
        except Exception:  # wsproto refuses when the handshake never completed
            data = b""
        self._close_output()
        if data:
            self._queue(data)

    def _close_output(self) -> None:
        self._output_closed = True
        # A reply waiting for the backlog to drain gives up: nothing more goes out.
        self._drained.set()

    def abort(self) -> None:
        """Drop the connection now: nothing more is written."""
        self._close_output()
        self._backlog.clear()
        self._reply_spans.clear()
        self._backlog_bytes = 0
        self._finish()

    def _finish(self) -> None:
        """Everything that will ever be written has been: end the connection's tasks."""
        self._done.set()
        self._drained.set()
        self._nursery.cancel_scope.cancel()

    async def wait_done(self) -> None:
        """Wait until the connection has written its last byte (or can write no more)."""
        await self._done.wait()
