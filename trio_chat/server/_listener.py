"""The chat socket's listener: accept loop, keepalive sweep, one boundary per connection.

Each connection is served behind one failure boundary (`WebSocketServer._run_connection`):
whatever its handshake, handler or session raises closes that connection only (1011
"internal error" once accepted, else HTTP 400) and goes to the node's `FailureBoundary`,
never to the server's nursery. Only the accept loop and the keepalive sweep are the
node's own tasks. The connection itself (write path, frames) is `_connection.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import socket
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from .._errors import ProtocolError
from ..protocol._frames import http_response
from ..protocol._proxies import resolve_client_untrusted
from ._connection import (
    RECV_SIZE,
    SLOW_CLOSE_GRACE,
    ConnectionClosed,
    SocketCounters,
    WebSocketConnection,
)
from ._connection_log import log_closed
from ._limits import RETRY_AFTER, refusal_body

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Iterator

    from ..protocol._proxies import TrustedProxies
    from ._boundary import FailureBoundary
    from ._connection import HandshakeRequest
    from ._limits import ConnectionLimits

log = logging.getLogger("trio_chat.websocket")

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
# The kernel's send buffer per connection. Linux would grow it to 4 MiB for a reader
# that stalls; fixed, a slow client's cost is bounded by this plus its backlog.
_SNDBUF: Final = 128 * 1024
# Connections pinged together by the keepalive sweep.
_PING_GROUP: Final = 50


@dataclasses.dataclass
class _Slot:
    """A client's place in the connection caps, from accept to close."""

    #: The TCP peer's address.
    peer: str
    #: The address whose per-address slot the client holds; None: none yet (a trusted
    #: proxy's connection until its handshake names the client).
    address: str | None


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
      proxies: peers whose forwarding headers name the client (caps, logs, origin).
      node_id: this node's id, for the connection log lines.
      tls: serve ``wss://`` with this context (None: plain ``ws://``). The TLS handshake
        counts in the handshake timeout.
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
        proxies: TrustedProxies,
        node_id: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._handler = handler
        self._failures = failures
        self._limits = limits
        self._count_error = count_error
        self._max_message = max_message
        self._backlog_limit = backlog_limit
        self._keepalive_interval = keepalive_interval
        self._proxies = proxies
        self._node_id = node_id
        self._tls = tls
        self._accepting = trio.CancelScope()
        self._counters = SocketCounters()
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
        # A trusted proxy's client is known only from its handshake (`_place`).
        slot = _Slot(host, None if self._proxies.trusts(host) else host)
        refused = self._limits.admit(slot.address)
        if refused is not None:
            self._count_error(refused)
            if self._refusing >= _MAX_REFUSING:
                if self._tls is None:
                    _send_refusal(sock, refused)
                sock.close()
                return
            self._refusing += 1
        nursery.start_soon(self._run_connection, sock, slot, refused)

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
        self, sock: socket.socket, slot: _Slot, refused: str | None
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
                # Over TLS the client gets only the close: a 503 would cost a handshake
                # each, the very work a flood past the caps must not get.
                if self._tls is None:
                    _send_refusal(sock, refused)
                    await _linger(sock)
                else:
                    await trio.lowlevel.checkpoint()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            if self._tls is not None:
                # Still non-blocking; the handshake itself runs in `_handshake`.
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
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
                    await self._serve(conn, slot)
                except ConnectionClosed:
                    pass
                finally:
                    self.connections.discard(conn)
                    nursery.cancel_scope.cancel()
            if conn.rejected:
                await _linger(sock)
        except* Exception as group:  # the failure boundary: this client only
            for exc in _leaves(group):
                self._failures.record(
                    "chat_socket", exc, conn.remote if conn is not None else slot.peer
                )
            if conn is not None:
                conn.fail()
        finally:
            if conn is not None and conn.accepted:
                log_closed(
                    slot.address or slot.peer,
                    "chat",
                    conn.close_code,
                    trio.current_time() - conn.accepted_at,
                    self._node_id,
                )
            if refused is None:
                self._limits.release(slot.address)
            else:
                self._refusing -= 1
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _serve(self, conn: WebSocketConnection, slot: _Slot) -> None:
        request = await self._handshake(conn)
        if request is not None and self._place(conn, slot, request):
            await self._handler(conn, request)
        with trio.move_on_after(SLOW_CLOSE_GRACE):
            if conn.accepted:
                await conn.wait_closed_untrusted()
            else:
                await conn.wait_done()

    def _place(self, conn: WebSocketConnection, slot: _Slot, request: HandshakeRequest) -> bool:
        """Say who the client is (a trusted proxy's headers, else the peer), and count
        it against its address's cap if that waited for the handshake.

        Returns False if it was refused (503: its address is at its cap).
        """
        client = resolve_client_untrusted(slot.peer, request.forwarded, self._proxies)
        if client.problem is not None:
            # The proxy's doing, or a client's through it: not worth more than DEBUG.
            log.debug("%s: forwarding headers not used: %s", conn.remote, client.problem)
        request.client = client.address
        request.secure = client.scheme == "https" if client.scheme else self._tls is not None
        if client.address != slot.peer:
            conn.remote = f"{client.address} (via {conn.peer})"
        if slot.address is None:
            refused = self._limits.assign(client.address)
            if refused is not None:
                self._count_error(refused)
                conn.reject(
                    503,
                    refusal_body(refused),
                    [(b"Retry-After", str(RETRY_AFTER).encode())],
                )
                return False
            slot.address = client.address
        return True

    async def _handshake(self, conn: WebSocketConnection) -> HandshakeRequest | None:
        """The client's upgrade request, or None if it was refused or too slow.

        On a TLS socket the TLS handshake comes first, within the same timeout: a
        client that stalls it, or speaks plain text, holds its slot no longer.
        """
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                if self._tls is not None:
                    await conn.tls_handshake_untrusted()
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
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)
