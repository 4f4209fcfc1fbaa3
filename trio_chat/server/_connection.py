"""One chat-socket connection: the outbound write path and the inbound frames.

wsproto does the handshake and parses what clients send. Outgoing data frames are built
by `encode_text_frame` (protocol/_frames.py) once per broadcast and written with a
non-blocking ``send`` to every recipient, so delivering a broadcast costs one syscall per
socket and no task switch.

One outbound path per connection owns every byte written to its socket (data, pong,
close). Bytes the kernel did not take wait in the connection's backlog, in order, and a
writer task (started only while there is backlog) drains them. A direct write happens
only while the backlog is empty: otherwise it would land in the middle of a frame the
writer has half written.

Broadcasts are pushed; a backlog of them over its bound means the client cannot keep up:
the connection is closed with 4008 "slow" and its backlog freed, so no client can grow the
server's memory. Replies the client asked for (a history page, a join's replay) are
pulled instead: `WebSocketConnection.send_reply` waits until the backlog has drained
below half its bound before queueing one, so a reply of any size goes out as fast as the
client reads it, and its bytes never count as lag.

A close frame is the last frame: after it, or after the client's close, only the frame
already partly on the wire may still go out before it. The connection ends once the
close frame has been written (bounded by the caller), never by cancelling the writer
while it still holds the close.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
from typing import TYPE_CHECKING, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsProtocolError

from .._errors import ProtocolError
from ..protocol._codes import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_SLOW,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
)
from ..protocol._frames import encode_text_frame, http_response

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator, Iterator, Sequence

    from wsproto.connection import Connection
    from wsproto.events import Event

    from ._hub import Outgoing

log = logging.getLogger("trio_chat.websocket")

RECV_SIZE: Final = 64 * 1024
_MAX_HANDSHAKE: Final = 16 * 1024
# A slow client's close frame gets this long to drain before the socket is cut.
SLOW_CLOSE_GRACE: Final = 2.0
# sendmsg takes at most IOV_MAX buffers; 64 is plenty to fill a socket buffer.
_MAX_IOV: Final = 64


class ConnectionClosed(Exception):
    """The WebSocket is closed (by either side); ``code`` says why."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass
class SocketCounters:
    """Write-path counters shared by all connections of a server."""

    partial_writes: int = 0
    peak_backlog: int = 0
    slow_closes: int = 0
    accept_failures: int = 0


@dataclasses.dataclass
class HandshakeRequest:
    """What a client asked for when it opened the WebSocket."""

    path: str
    query: str
    host: str
    origin: str | None


class WebSocketConnection:
    """One accepted chat-socket connection.

    Created by `WebSocketServer` (_listener.py), which gives it a nursery of its own: the writer task
    runs there, and cancelling it ends everything the connection started.
    """

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        *,
        max_message: int,
        backlog_limit: int,
        counters: SocketCounters,
    ) -> None:
        self._sock = sock
        self._counters = counters
        self._nursery = nursery
        self._ws: WSConnection | Connection = WSConnection(ConnectionType.SERVER)
        self._max_message = max_message
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
        #: Messages read by `cancel_on_close` while a command ran, for the session.
        self._stash: collections.deque[Event] = collections.deque()
        self._stash_size = 0
        self._close_code: int | None = None
        self._done = trio.Event()
        self.accepted = False
        #: The handshake was answered with an HTTP error.
        self.rejected = False
        self.received_since_ping = True
        try:
            peer = sock.getpeername()
            self.remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.remote = "?"

    # -- outbound -----------------------------------------------------------------------

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
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return
            if sent == len(data):
                return
            self._counters.partial_writes += 1
            self._append(memoryview(data)[sent:] if sent else data, reply)
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

    async def _writer(self) -> None:
        try:
            while self._backlog:
                await trio.lowlevel.wait_writable(self._sock)
                self._flush()
                if self._backlog_bytes <= self._reply_low_water:
                    self._drained.set()
        except OSError:
            self.abort()
            return
        finally:
            self._writer_running = False
        if self._close_received:
            self._finish()

    def _flush(self) -> None:
        """Write as much of the backlog as the kernel takes, keeping frame order."""
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

    # -- inbound ------------------------------------------------------------------------

    async def _receive_bytes(self) -> bytes:
        while True:
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
                    return b""
                raise
            await trio.lowlevel.checkpoint()
            return data

    async def handshake_untrusted(self) -> HandshakeRequest:
        """Read the HTTP upgrade request.

        Raises:
          ProtocolError: the client sent something that is not a WebSocket handshake;
            it was answered with HTTP 400 (code ``bad_handshake``), or 426 for another
            WebSocket version (``bad_version``), and the connection is closing.
          ConnectionClosed: the client went away first.
        """
        received = 0
        while True:
            data = await self._receive_bytes()
            if not data:
                raise ConnectionClosed(CLOSE_ABNORMAL, "closed during the handshake")
            received += len(data)
            try:
                if received > _MAX_HANDSHAKE:
                    raise WsProtocolError(f"the request is over {_MAX_HANDSHAKE} bytes")
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, Request):
                        return _parse_request(event)
            except WsProtocolError as exc:
                hint = exc.event_hint
                if isinstance(hint, RejectConnection) and hint.status_code == 426:
                    self.reject(426, "only WebSocket version 13 is supported\n", hint.headers)
                    raise ProtocolError("bad_version", str(exc)) from None
                self.reject(400, f"{exc}\n")
                raise ProtocolError("bad_handshake", str(exc)) from None
            except UnicodeError:
                # wsproto decodes Host as IDNA and header tokens as ASCII.
                self.reject(400, "a header is not ASCII\n")
                raise ProtocolError("bad_handshake", "a header is not ASCII") from None

    def accept(self) -> None:
        """Accept the handshake (no extensions, no subprotocol)."""
        self.accepted = True
        self.send_nowait(self._ws.send(AcceptConnection()))
        # From here on only the frame protocol is needed: dropping the handshake's HTTP
        # state (an h11 connection and its buffers) makes every idle connection smaller.
        if isinstance(self._ws, WSConnection) and self._ws.connection is not None:
            self._ws = self._ws.connection

    def reject(self, status: int, body: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Refuse the handshake with an HTTP error and a plain-text reason."""
        self.rejected = True
        self._close_output()
        self._queue(http_response(status, body, headers))
        if not self._backlog:
            self._finish()
        else:
            self._nursery.start_soon(self._cut_after, SLOW_CLOSE_GRACE)

    def fail(self) -> None:
        """After an unexpected error: close 1011 once accepted, else answer HTTP 400.

        Called once the connection's tasks have ended, so no write is in flight and the
        last bytes go straight to the socket; if a frame is still partly unwritten, or
        the closing had begun, the TCP close is all the client gets. Never blocks.
        """
        if self._output_closed or self._backlog:
            return
        self._close_output()
        try:
            if self.accepted:
                data = self._ws.send(
                    CloseConnection(code=CLOSE_INTERNAL_ERROR, reason="internal error")
                )
            else:
                data = http_response(400, "the server could not serve this request\n")
            self._sock.send(data)
        except (OSError, WsLocalProtocolError):
            pass

    async def wait_closed_untrusted(self) -> None:
        """End the closing handshake: read (and drop) until the client's close has come,
        then wait until our last frame (our close, or the answer to theirs) is written.

        RFC 6455 has the server wait for the client's close before cutting TCP, so the
        client learns the close code. Bounded by the caller.
        """
        with contextlib.suppress(ConnectionClosed):
            while not self._close_received:
                try:
                    await self.receive_message_untrusted()
                except ProtocolError:
                    continue
        await self.wait_done()

    @contextlib.asynccontextmanager
    async def cancel_on_close(self) -> AsyncIterator[None]:
        """Run the body while still reading the client's control frames.

        For commands that may wait (a store read, a full commit queue, a reply waiting
        for the client to read): a close that arrives meanwhile is answered at once and
        cancels the body, and pings are answered. Messages that arrive meanwhile are
        kept for `receive_message_untrusted`, up to about the message size limit; past
        it, reading waits for the body to end (a close behind them is read then).

        Raises:
          ConnectionClosed: the client closed the connection while the body ran.
        """
        with trio.CancelScope() as body:
            watcher = trio.CancelScope()
            self._nursery.start_soon(self._watch_untrusted, body, watcher)
            try:
                yield
            finally:
                watcher.cancel()
        if self._close_received:
            raise ConnectionClosed(CLOSE_NORMAL, "closed by the client")

    async def _watch_untrusted(self, body: trio.CancelScope, scope: trio.CancelScope) -> None:
        # Once the body is over the session reads the socket again: the watcher must
        # not touch it, even when it started, or woke, after that. Between those checks
        # and the next wait, nothing awaits: no other task runs, and a recv's data is
        # always handled.
        with scope:
            await trio.lowlevel.checkpoint_if_cancelled()
            while self._stash_size <= self._max_message:
                await trio.lowlevel.wait_readable(self._sock)
                if scope.cancel_called:
                    return
                try:
                    data = self._sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                self.received_since_ping = True
                if not data:
                    self._close_output()
                    self._finish()
                    return
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, CloseConnection):
                        self._answer_close(event)
                        body.cancel()
                        return
                    if isinstance(event, Ping):
                        if not self._output_closed:
                            self.send_nowait(self._ws.send(event.response()))
                    elif isinstance(event, (TextMessage, BytesMessage)):
                        self._stash.append(event)
                        self._stash_size += len(event.data)
            await trio.sleep_forever()

    def _events(self) -> Iterator[Event]:
        """What the client sent: first what `cancel_on_close` kept, then the rest."""
        while self._stash:
            event = self._stash.popleft()
            if isinstance(event, (TextMessage, BytesMessage)):
                self._stash_size -= len(event.data)
            yield event
        yield from self._ws.events()

    async def receive_message_untrusted(self) -> str:
        """Receive the next complete text message.

        Answers pings and the client's close frame by itself.

        Raises:
          ConnectionClosed: the connection ended.
          ProtocolError: the client sent a binary message (close 1003) or a message over
            the size limit (close 1009). The connection must then be closed with
            ``close_code``.
        """
        parts: list[str] = []
        size = 0
        while True:
            for event in self._events():
                if isinstance(event, TextMessage):
                    size += len(event.data.encode())
                    if size > self._max_message:
                        raise ProtocolError(
                            "too_big",
                            f"messages are limited to {self._max_message} bytes",
                            close_code=CLOSE_TOO_BIG,
                        )
                    parts.append(event.data)
                    if event.message_finished:
                        return "".join(parts)
                elif isinstance(event, BytesMessage):
                    raise ProtocolError(
                        "binary_unsupported",
                        "binary frames are not part of the protocol: send JSON text",
                        close_code=CLOSE_UNSUPPORTED,
                    )
                elif isinstance(event, Ping):
                    # After our close frame wsproto refuses a pong (and the client
                    # needs none): a ping then is dropped.
                    if not self._output_closed:
                        self.send_nowait(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._answer_close(event)
                    raise ConnectionClosed(event.code, event.reason or "")
                elif isinstance(event, Pong):
                    pass
            data = await self._receive_bytes()
            self.received_since_ping = True
            if not data:
                self._close_output()
                self._finish()
                raise ConnectionClosed(CLOSE_ABNORMAL, "connection lost")
            self._ws.receive_data(data)

    def _answer_close(self, event: CloseConnection) -> None:
        """Answer the client's close at once; end the connection when it is written.

        The client is leaving, so queued frames it has not started to receive are
        dropped: the answer waits only for the frame already partly on the wire.
        Cancelling the writer before then would lose the answer, and the client would
        wait out its close timeout and report 1006.
        """
        self._close_received = True
        if not self._output_closed:
            try:
                data = self._ws.send(event.response())
            except Exception:  # already closing on our side
                data = b""
            self._drop_unstarted()
            self._close_output()
            if data:
                self._queue(data)
        if self._backlog:
            self._start_writer()
        else:
            self._finish()

    def ping_nowait(self) -> None:
        """Send a ping; the keepalive checks that something came back."""
        self.received_since_ping = False
        self.send_nowait(self._ws.send(Ping()))


def _parse_request(event: Request) -> HandshakeRequest:
    origin = None
    for name, value in event.extra_headers:
        if name.lower() == b"origin":
            origin = value.decode("latin-1")
    path, _, query = event.target.partition("?")
    return HandshakeRequest(path=path, query=query, host=event.host, origin=origin)
