"""The chat socket: a trio WebSocket server built for fan-out.

wsproto does the handshake and parses what clients send. Outgoing data frames are built
by `encode_text_frame` once per broadcast and written with a non-blocking ``send`` to every
recipient, so delivering a broadcast costs one syscall per socket and no task switch.

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

Each connection is served behind one failure boundary (`WebSocketServer._run_connection`):
whatever its handshake, handler or session raises closes that connection only (1011
"internal error" once accepted, else HTTP 400) and goes to the node's `FailureBoundary`,
never to the server's nursery. Only the accept loop and the keepalive sweep are the
node's own tasks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import http
import logging
import math
import socket
import struct
from typing import TYPE_CHECKING, Final, NoReturn

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

from ._errors import ProtocolError
from ._limits import RETRY_AFTER, refusal_body

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

    from wsproto.connection import Connection
    from wsproto.events import Event

    from ._boundary import FailureBoundary
    from ._hub import Outgoing
    from ._limits import ConnectionLimits

log = logging.getLogger("trio_chat.websocket")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SLOW: Final = 4008

_RECV_SIZE: Final = 64 * 1024
_MAX_HANDSHAKE: Final = 16 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
# After an HTTP error, how long and how much we read before closing: closing with the
# client's request unread makes the kernel reset the connection, and the reset can
# destroy the error before the client has read it.
_LINGER: Final = 1.0
_LINGER_BYTES: Final = 64 * 1024
# Clients past a cap being answered 503 at once; past this many, a flood of them is
# just closed (one task and one descriptor each, for up to _LINGER).
_MAX_REFUSING: Final = 64
# Out of descriptors (or kernel memory): wait before accepting again, as trio's
# serve_listeners does, instead of spinning on the error; log it at most once a second.
_ACCEPT_BACKOFF: Final = 0.1
_ACCEPT_LOG_INTERVAL: Final = 1.0
_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A connection that failed before we accepted it: Linux reports its error from accept();
# the next one may be fine (the list is trio's, trio/_highlevel_socket.py).
_GONE_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
# A slow client's close frame gets this long to drain before the socket is cut.
_SLOW_CLOSE_GRACE: Final = 2.0
# The kernel's send buffer per connection. Linux would grow it to 4 MiB for a reader
# that stalls; fixed, a slow client's cost is bounded by this plus its backlog.
_SNDBUF: Final = 128 * 1024
# Connections pinged together by the keepalive sweep.
_PING_GROUP: Final = 50
# sendmsg takes at most IOV_MAX buffers; 64 is plenty to fill a socket buffer.
_MAX_IOV: Final = 64


def encode_text_frame(payload: bytes) -> bytes:
    """Frame ``payload`` as one unmasked, final text frame (server to client)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def http_response(status: int, body: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """An HTTP/1.1 error response with a plain-text body, after which we close."""
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(data)).encode(),
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + data


class ConnectionClosed(Exception):
    """The WebSocket is closed (by either side); ``code`` says why."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass
class _Counters:
    """Write-path counters shared by all connections of a server."""

    partial_writes: int = 0
    peak_backlog: int = 0
    slow_closes: int = 0
    accept_failures: int = 0


@dataclasses.dataclass(frozen=True)
class ChatSocketStatistics:
    connections: int
    #: Bytes waiting in all backlogs now, and the most one connection ever held.
    backlog_bytes: int
    peak_backlog: int
    #: Writes the kernel took only part of (the rest went to a backlog).
    partial_writes: int
    slow_closes: int
    #: accept() failures for want of descriptors or memory (each followed by a backoff).
    accept_failures: int


@dataclasses.dataclass
class HandshakeRequest:
    """What a client asked for when it opened the WebSocket."""

    path: str
    query: str
    host: str
    origin: str | None


class WebSocketConnection:
    """One accepted chat-socket connection.

    Created by `serve_websocket`, which gives it a nursery of its own: the writer task
    runs there, and cancelling it ends everything the connection started.
    """

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        *,
        max_message: int,
        backlog_limit: int,
        counters: _Counters,
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
        self._nursery.start_soon(self._cut_after, _SLOW_CLOSE_GRACE)

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
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
                    raise
                data = b""
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
                raise ConnectionClosed(1006, "closed during the handshake")
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
            self._nursery.start_soon(self._cut_after, _SLOW_CLOSE_GRACE)

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

    # Its checkpoints are the body's: one on the way out would cancel a body whose work
    # (a stored message) succeeded before its reply went out.
    @contextlib.asynccontextmanager
    async def cancel_on_close(self) -> AsyncIterator[None]:  # noqa: ASYNC911
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
                yield  # noqa: ASYNC911
            finally:
                watcher.cancel()
        if self._close_received:
            raise ConnectionClosed(1000, "closed by the client")

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
                    data = self._sock.recv(_RECV_SIZE)
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
                raise ConnectionClosed(1006, "connection lost")
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


class WebSocketServer:
    """Listens on the chat socket and runs each connection in a nursery of its own.

    Args:
      handler: runs one accepted connection; returns when the session is over. It
        decides whether to `WebSocketConnection.accept` or `WebSocketConnection.reject`.
      failures: where an exception that closed one connection is counted and logged.
      limits: the node's connection caps (shared with ``/ws``).
      count_error: counts a refused handshake or client by code (``/metrics``).
      max_message: largest message a client may send, in bytes.
      backlog_limit: bytes a client may leave unread before it is closed as slow.
      keepalive_interval: seconds between two pings of each connection.
    """

    def __init__(
        self,
        handler: Callable[[WebSocketConnection, HandshakeRequest], Awaitable[None]],
        *,
        failures: FailureBoundary,
        limits: ConnectionLimits,
        count_error: Callable[[str], None],
        max_message: int,
        backlog_limit: int,
        keepalive_interval: float,
    ) -> None:
        self._handler = handler
        self._failures = failures
        self._limits = limits
        self._count_error = count_error
        self._max_message = max_message
        self._backlog_limit = backlog_limit
        self._keepalive_interval = keepalive_interval
        self._accepting = trio.CancelScope()
        self._counters = _Counters()
        self._refusing = 0
        self.connections: set[WebSocketConnection] = set()
        self.port: int | None = None

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Listen on ``host:port`` (``SO_REUSEPORT``, so every worker can) and serve forever.

        Calls ``task_status.started(port)`` with the bound port once listening.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(1024)
            listener.setblocking(False)
            self.port = listener.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive)
                task_status.started(self.port)
                with self._accepting:
                    await self._accept_forever(listener, nursery)
                trio.lowlevel.notify_closing(listener)
                listener.close()
                await trio.sleep_forever()
        finally:
            if listener.fileno() != -1:
                trio.lowlevel.notify_closing(listener)
                listener.close()
        raise AssertionError("unreachable")

    async def _accept_forever(self, listener: socket.socket, nursery: trio.Nursery) -> NoReturn:
        last_logged: float | None = None
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _GONE_ERRNOS:
                        continue
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors, say: the clients we have keep being served,
                    # and new ones wait in the listen queue until some close.
                    self._counters.accept_failures += 1
                    now = trio.current_time()
                    if last_logged is None or now - last_logged >= _ACCEPT_LOG_INTERVAL:
                        last_logged = now
                        log.warning(
                            "accept failed (%s): retrying every %g s",
                            exc.strerror,
                            _ACCEPT_BACKOFF,
                        )
                    await trio.sleep(_ACCEPT_BACKOFF)
                    break
                self._admit(sock, str(address[0]), nursery)

    def _admit(self, sock: socket.socket, host: str, nursery: trio.Nursery) -> None:
        refused = self._limits.admit(host)
        if refused is not None:
            self._count_error(refused)
            if self._refusing >= _MAX_REFUSING:
                _send_refusal(sock, refused)
                sock.close()
                return
            self._refusing += 1
        nursery.start_soon(self._run_connection, sock, host, refused)

    async def _keepalive(self) -> NoReturn:
        # One sweep for all connections instead of a task each: an idle connection
        # costs no task. A client silent for a whole interval after a ping is cut. The
        # pings go out in small groups spread over the interval: thousands of pongs
        # arriving at once would hold up every room's fan-out.
        # groups >= 1: each turn sleeps at least once.
        while True:  # noqa: ASYNC913
            conns = list(self.connections)
            groups = max(1, math.ceil(len(conns) / _PING_GROUP))
            for start in range(0, groups * _PING_GROUP, _PING_GROUP):
                await trio.sleep(self._keepalive_interval / groups)
                for conn in conns[start : start + _PING_GROUP]:
                    if not conn.accepted or conn.closed:
                        continue
                    if conn.received_since_ping:
                        conn.ping_nowait()
                    else:
                        log.info("cutting %s: no answer to a ping", conn.remote)
                        conn.abort()

    def statistics(self) -> ChatSocketStatistics:
        return ChatSocketStatistics(
            connections=len(self.connections),
            backlog_bytes=sum(c.backlog_bytes for c in self.connections),
            peak_backlog=self._counters.peak_backlog,
            partial_writes=self._counters.partial_writes,
            slow_closes=self._counters.slow_closes,
            accept_failures=self._counters.accept_failures,
        )

    async def shutdown(self, code: int, reason: str, grace: float) -> None:
        """Stop accepting; close every connection with ``code``; wait up to ``grace``."""
        self._accepting.cancel()
        for conn in list(self.connections):
            conn.close_nowait(code, reason)
        with trio.move_on_after(grace):
            await trio.lowlevel.checkpoint()  # with no connection left, nothing else
            for conn in list(self.connections):
                await conn.wait_done()

    # A task of its own (`_admit`): no caller awaits it for a checkpoint.
    async def _run_connection(  # noqa: ASYNC910
        self, sock: socket.socket, host: str, refused: str | None
    ) -> None:
        """Serve one client, from accept to close: its failure boundary.

        ``refused`` (a cap's code) answers the client 503 instead. Whatever the
        client's handshake, the handler or the session raises ends here: it closes
        this connection (`WebSocketConnection.fail`), goes to the node's
        `FailureBoundary`, and never reaches the server's nursery. Either way the
        socket is closed and the client's slot freed.
        """
        conn: WebSocketConnection | None = None
        try:
            sock.setblocking(False)
            if refused is not None:
                _send_refusal(sock, refused)
                await _linger(sock)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            async with trio.open_nursery() as nursery:
                conn = WebSocketConnection(
                    sock,
                    nursery,
                    max_message=self._max_message,
                    backlog_limit=self._backlog_limit,
                    counters=self._counters,
                )
                self.connections.add(conn)
                try:
                    await self._serve(conn)
                except ConnectionClosed:
                    pass
                finally:
                    self.connections.discard(conn)
                    nursery.cancel_scope.cancel()
            if conn.rejected:
                await _linger(sock)
        except* Exception as group:  # the failure boundary: this client only
            for exc in _leaves(group):
                self._failures.record("chat_socket", exc, conn.remote if conn is not None else host)
            if conn is not None:
                conn.fail()
        finally:
            if refused is None:
                self._limits.release(host)
            else:
                self._refusing -= 1
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _serve(self, conn: WebSocketConnection) -> None:
        request = await self._handshake(conn)
        if request is not None:
            await self._handler(conn, request)
        with trio.move_on_after(_SLOW_CLOSE_GRACE):
            if conn.accepted:
                await conn.wait_closed_untrusted()
            else:
                await conn.wait_done()

    async def _handshake(self, conn: WebSocketConnection) -> HandshakeRequest | None:
        """The client's upgrade request, or None if it was refused or too slow."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                return await conn.handshake_untrusted()
            except ProtocolError as exc:
                # A scanner or a health check, most likely: not worth a log line each.
                log.debug("refused %s: %s", conn.remote, exc.message)
                self._count_error(exc.code)
                await trio.lowlevel.checkpoint()  # a bad request line may need no wait
                return None
        log.debug("cutting %s: no handshake within %g s", conn.remote, HANDSHAKE_TIMEOUT)
        self._count_error("handshake_timeout")
        conn.abort()
        return None


def _send_refusal(sock: socket.socket, code: str) -> None:
    """Answer 503 at once, before reading anything (a new socket's buffer takes it)."""
    sock.setblocking(False)
    response = http_response(503, refusal_body(code), [(b"Retry-After", str(RETRY_AFTER).encode())])
    with contextlib.suppress(OSError):
        sock.send(response)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions in ``exc``, out of any groups (a nursery wraps them)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _linger(sock: socket.socket) -> None:
    """After an HTTP error: send our FIN, then read until the client closes (bounded)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        await trio.lowlevel.checkpoint()
        return
    drained = 0
    with trio.move_on_after(_LINGER):
        await trio.lowlevel.checkpoint()  # a client that has closed already: no wait
        while drained < _LINGER_BYTES:
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)
