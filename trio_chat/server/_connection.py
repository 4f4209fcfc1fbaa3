"""One chat-socket connection: the handshake and the inbound frames, over its outbound path.

wsproto does the handshake and parses what clients send. Everything written to the
socket goes through the connection's one outbound path (`_outbound.py`: the backlog, the
writer task, replies with flow control, the close frame as the last frame).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import ssl
from typing import TYPE_CHECKING, Final

import trio
from wsproto import WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
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
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
)
from ..protocol._frames import http_response
from ..protocol._proxies import FORWARDING_HEADERS

# SLOW_CLOSE_GRACE and SocketCounters are also the listener's (from here, as before the split).
from ._outbound import SLOW_CLOSE_GRACE as SLOW_CLOSE_GRACE
from ._outbound import OutboundPath
from ._outbound import SocketCounters as SocketCounters

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator, Iterator, Sequence

    from wsproto.events import Event


log = logging.getLogger("trio_chat.websocket")

# Over a TLS record's 16 KiB, so a read leaves no decrypted bytes in OpenSSL's buffer
# unread (`_wait_readable` checks anyway).
RECV_SIZE: Final = 64 * 1024
_MAX_HANDSHAKE: Final = 16 * 1024


class ConnectionClosed(Exception):
    """The WebSocket is closed (by either side); ``code`` says why."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass
class HandshakeRequest:
    """What a client asked for when it opened the WebSocket."""

    path: str
    query: str
    host: str
    origin: str | None
    #: The request's forwarding headers (protocol/_proxies.py FORWARDING_HEADERS).
    forwarded: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    #: The client's address: the TCP peer's, or a trusted proxy's word for it.
    client: str = "?"
    #: Whether the client reached us over TLS: ours, or a trusted proxy's.
    secure: bool = False


class WebSocketConnection(OutboundPath):
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
        super().__init__(sock, nursery, backlog_limit=backlog_limit, counters=counters)
        self._max_message = max_message
        #: Messages read by `cancel_on_close` while a command ran, for the session.
        self._stash: collections.deque[Event] = collections.deque()
        self._stash_size = 0
        #: The text of a fragmented message so far, and its size in bytes.
        self._parts: list[str] = []
        self._parts_size = 0
        #: A refusal that followed messages of the same read: raised by the next read.
        self._refused: ProtocolError | None = None
        self.accepted = False
        #: When it was accepted (`trio.current_time`), for the close's log line.
        self.accepted_at = 0.0
        #: The handshake was answered with an HTTP error.
        self.rejected = False
        #: The TCP peer (``remote`` names the client instead once a trusted proxy has).
        self.peer = self.remote

    # -- inbound ------------------------------------------------------------------------

    async def tls_handshake_untrusted(self) -> None:
        """Run the TLS handshake of a connection accepted on a TLS socket.

        Bounded by the caller (the handshake timeout covers it and the upgrade request).

        Raises:
          ProtocolError: code ``tls_handshake``: the client is not speaking TLS (a
            plain-text request), refused our certificate, or went away; the
            connection is cut.
        """
        assert isinstance(self._sock, ssl.SSLSocket)
        while True:
            try:
                self._sock.do_handshake()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:  # SSLError included; a reset; ENOTCONN if it left early
                self.abort()
                raise ProtocolError("tls_handshake", f"TLS handshake failed: {exc}") from None
            await trio.lowlevel.checkpoint()
            return

    def _recv_nowait(self) -> bytes | None:
        """What the client sent, b"" once it is gone, None while there is nothing yet.

        On a TLS socket a read never needs a write (renegotiation is off; OpenSSL
        answers a TLS 1.3 key update on the next write), so the want-write case only
        waits like the want-read one.
        """
        try:
            return self._sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLError as exc:
            # A corrupt record, or TCP closed without TLS's close: the client is gone.
            log.debug("cutting %s: %s", self.remote, exc)
            return b""
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
                return b""
            raise

    async def _wait_readable(self) -> None:
        """Wait for input; bytes OpenSSL has decrypted but not handed out count."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.wait_readable(self._sock)

    async def _receive_bytes(self) -> bytes:
        while True:
            data = self._recv_nowait()
            if data is None:
                await self._wait_readable()
                continue
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
        self.accepted_at = trio.current_time()
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
                self._close_code = CLOSE_INTERNAL_ERROR
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
                    await self.receive_messages_untrusted()
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
        kept for `receive_messages_untrusted`, up to about the message size limit; past
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
            raise ConnectionClosed(CLOSE_NORMAL, "closed by the client")

    async def _watch_untrusted(self, body: trio.CancelScope, scope: trio.CancelScope) -> None:
        # Once the body is over the session reads the socket again: the watcher must
        # not touch it, even when it started, or woke, after that. Between those checks
        # and the next wait, nothing awaits: no other task runs, and a recv's data is
        # always handled.
        with scope:
            await trio.lowlevel.checkpoint_if_cancelled()
            while self._stash_size <= self._max_message:
                await self._wait_readable()
                if scope.cancel_called:
                    return
                try:
                    data = self._recv_nowait()
                except OSError:
                    data = b""
                if data is None:
                    continue
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

    # What one read completed returns at once: the caller's next call reads (a checkpoint).
    async def receive_messages_untrusted(self) -> list[str]:
        """Receive the complete text messages of the client's next bytes (at least one).

        Every message one socket read completes comes back in one list, so the session
        handles them as one batch (its sends become one item of the commit queue).
        Answers pings and the client's close frame by itself.

        Raises:
          ConnectionClosed: the connection ended.
          ProtocolError: the client sent a binary message (close 1003) or a message over
            the size limit (close 1009). The connection must then be closed with
            ``close_code``. A refusal or a close that follows messages is raised by the
            next call, once those messages were handled, as if read one at a time.
        """
        if self._refused is not None:
            refused, self._refused = self._refused, None
            raise refused
        messages: list[str] = []
        while True:
            for event in self._events():
                try:
                    text = self._message_untrusted(event)
                except ProtocolError as exc:
                    if not messages:
                        raise
                    self._refused = exc
                    return messages
                if text is not None:
                    messages.append(text)
                elif isinstance(event, CloseConnection):
                    if messages:
                        self._stash.appendleft(event)
                        return messages
                    self._answer_close(event)
                    raise ConnectionClosed(event.code, event.reason or "")
            if messages:
                return messages  # noqa: ASYNC910
            data = await self._receive_bytes()
            self.received_since_ping = True
            if not data:
                self._close_output()
                self._finish()
                raise ConnectionClosed(CLOSE_ABNORMAL, "connection lost")
            self._ws.receive_data(data)

    def _message_untrusted(self, event: Event) -> str | None:
        """The message ``event`` completes, if any; answers a ping."""
        if isinstance(event, TextMessage):
            data = event.data
            # A character is at most 4 bytes: a short whole message needs no byte count.
            if self._parts or not event.message_finished or len(data) * 4 > self._max_message:
                self._parts_size += len(data.encode())
                if self._parts_size > self._max_message:
                    self._parts, self._parts_size = [], 0
                    raise ProtocolError(
                        "too_big",
                        f"messages are limited to {self._max_message} bytes",
                        close_code=CLOSE_TOO_BIG,
                    )
            if not event.message_finished:
                self._parts.append(data)
                return None
            if self._parts:
                self._parts.append(data)
                data = "".join(self._parts)
                self._parts, self._parts_size = [], 0
            return data
        if isinstance(event, BytesMessage):
            raise ProtocolError(
                "binary_unsupported",
                "binary frames are not part of the protocol: send JSON text",
                close_code=CLOSE_UNSUPPORTED,
            )
        # After our close frame wsproto refuses a pong (and the client needs none): a
        # ping then is dropped.
        if isinstance(event, Ping) and not self._output_closed:
            self.send_nowait(self._ws.send(event.response()))
        return None

    def _answer_close(self, event: CloseConnection) -> None:
        """Answer the client's close at once; end the connection when it is written.

        The client is leaving, so queued frames it has not started to receive are
        dropped: the answer waits only for the frame already partly on the wire.
        Cancelling the writer before then would lose the answer, and the client would
        wait out its close timeout and report 1006.
        """
        self._close_received = True
        if self._close_code is None:
            self._close_code = event.code
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

    @property
    def close_code(self) -> int:
        """The code of the closing handshake: our close frame's, else the client's;
        1006 if neither came (the connection was lost or cut)."""
        return CLOSE_ABNORMAL if self._close_code is None else self._close_code

    def ping_nowait(self) -> None:
        """Send a ping; the keepalive checks that something came back."""
        self.received_since_ping = False
        self.send_nowait(self._ws.send(Ping()))


def _parse_request(event: Request) -> HandshakeRequest:
    origin = None
    forwarded = []
    for name, value in event.extra_headers:
        lowered = name.lower()
        if lowered == b"origin":
            origin = value.decode("latin-1")
        elif lowered in FORWARDING_HEADERS:
            forwarded.append((lowered, value))
    path, _, query = event.target.partition("?")
    return HandshakeRequest(
        path=path, query=query, host=event.host, origin=origin, forwarded=forwarded
    )
