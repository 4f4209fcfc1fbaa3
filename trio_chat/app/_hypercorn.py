"""Hypercorn 0.18's trio connection handling, with the failure boundary it lacks.

Every connection on hypercorn's port runs in ``TCPServer.run``, started by
``trio.serve_listeners`` in the worker's server nursery: an exception that escapes it
stops hypercorn's whole server, every client of port 8000 with it (DESIGN.md §4). Two
bugs of hypercorn 0.18 found by the fuzzer (tests/test_fuzz_sockets.py) do that, or leak:

- Bytes in the same read as an upgrade request (a client that pipelines a frame):
  ``WSStream.handle`` answers them with a 400 while the app, already started, answers
  the handshake with a 101. Whichever of the two comes second raises h11's
  ``LocalProtocolError``: in the app, or in the connection's reader, out of ``run``.
  `_WSStream` holds such bytes until the app has answered, then hands them on (after a
  101) or drops them (after a refusal): the upgrade works.
- ``TCPServer._close`` calls ``send_eof`` without the send lock, so a frame sent at the
  same moment fails with ``trio.BusyResourceError`` in the app's ``websocket.send``.
  `_TCPServer.protocol_send` treats it as what it means: hypercorn is closing this
  connection (as it treats ``BrokenResourceError``). ``_close`` must stay lock-free: its
  ``aclose`` is what ends a send stuck on a client that stopped reading.
- A client's clean close reaches the app as ``websocket.disconnect`` with code 1006, as
  if the connection had been lost. `_WSStream` keeps the code of the first close frame
  it sends (the app's, hypercorn's own, or the answer echoing the client's) and passes
  that on instead, for the connection's log line (app/_clients.py).

`_TCPServer.run` is the boundary for anything else: an exception of one connection
closes that connection, is counted in ``/metrics`` as ``where="http_connection"``, and
is logged rate-limited (`FailureBoundary`).

Both classes are installed where hypercorn looks them up when it serves (the names in
``hypercorn.trio.run`` and ``hypercorn.protocol.h11``), when trio_chat is imported: this
covers ``trio-chat serve`` and ``hypercorn trio_chat:app --worker-class trio`` alike.
If an upgrade of hypercorn moves what they rely on, `install` fails at import time,
loudly, rather than serve on without the boundary.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any, Final

import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Data, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, Handshake, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import CloseConnection

from ..node._node import Node
from ..server._boundary import FailureBoundary

if TYPE_CHECKING:
    from hypercorn.events import Event
    from hypercorn.protocol.events import Event as StreamEvent
    from hypercorn.typing import ASGISendEvent
    from wsproto.events import Event as WsEvent

WHERE: Final = "http_connection"
# Counts and logs (rate-limited) failures of connections served while no node runs.
_NO_NODE_FAILURES: Final = FailureBoundary()
# How long closing a failed connection may take.
_CLOSE_GRACE: Final = 1.0


class _WSStream(WSStream):
    """A WebSocket stream that keeps bytes sent before the app answered the handshake."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set once the app has accepted or refused the handshake.
        self._answered = trio.Event()
        #: The code of the first close frame sent: the closing handshake's.
        self._close_code: int | None = None

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and self._close_code is not None and self.app_put:
            # What hypercorn does, with the close's code rather than 1006.
            self.closed = True
            await self.app_put({"type": "websocket.disconnect", "code": self._close_code})
            return
        if isinstance(event, Data) and not self.closed:
            # The reader waits here, as it waits on a full app queue: the client's
            # bytes push back on it, none are lost, and none are answered with a 400.
            await self._answered.wait()
            if not self.handshake.accepted:
                # Refused: the bytes were for a WebSocket that never opened (and a 400
                # after the app's refusal would be a second response).
                return
        await super().handle(event)

    async def app_send(self, message: ASGISendEvent | None) -> None:
        try:
            await super().app_send(message)
        finally:
            if message is None or self.state is not ASGIWebsocketState.HANDSHAKE:
                self._answered.set()

    async def _send_wsproto_event(self, event: WsEvent) -> None:
        if isinstance(event, CloseConnection) and self._close_code is None:
            self._close_code = event.code
        await super()._send_wsproto_event(event)


class _TCPServer(TCPServer):
    """Hypercorn's trio connection handler, behind a failure boundary."""

    async def run(self) -> None:
        remote = _peer(self.stream)
        try:
            await super().run()
        except* Exception as group:
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # The one exception, out of its nursery's groups.
            # super().run closed the stream in its ``finally``, unless that failed.
            with trio.move_on_after(_CLOSE_GRACE, shield=True):
                await self.stream.aclose()
            node = getattr(getattr(self.app, "app", None), "node", None)
            failures = node.failures if isinstance(node, Node) else _NO_NODE_FAILURES
            failures.record(WHERE, exc, remote)

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            if not isinstance(event, RawData):
                raise
            # ``_close`` is in ``send_eof``: the connection is closing (module docstring).
            await self.protocol.handle(Closed())


def _peer(stream: Any) -> str:
    """The client's address, for the log; "?" if the socket cannot tell."""
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"


def install() -> None:
    """Make hypercorn serve every connection with `_TCPServer` and `_WSStream`.

    Raises:
      ImportError: hypercorn's internals are not those of the version this was
        written for (0.18), so the fixes might silently not apply.
    """
    # Names looked up (modules, methods), then attributes the instances set.
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in (
            (hypercorn.trio.run, ("TCPServer",)),
            (hypercorn.protocol.h11, ("WSStream",)),
            (TCPServer, ("run", "protocol_send", "_close")),
            (WSStream, ("handle", "app_send", "_accept", "_send_wsproto_event")),
        )
        for name in names
        if not hasattr(owner, name)
    ] + [
        f"{owner.__name__}.{name}"
        for owner, names in (
            (TCPServer, ("stream", "app", "protocol")),
            (WSStream, ("closed", "handshake", "state", "app_put")),
            (Handshake, ("accepted",)),
        )
        for name in names
        if not _sets(owner, name)
    ]
    if missing:
        raise ImportError(
            f"hypercorn {importlib.metadata.version('hypercorn')} lacks {', '.join(missing)}:"
            " trio_chat/_hypercorn.py was written for 0.18 and needs review"
        )
    hypercorn.trio.run.TCPServer = _TCPServer  # type: ignore[attr-defined]
    hypercorn.protocol.h11.WSStream = _WSStream  # type: ignore[attr-defined]


def _sets(cls: type, name: str) -> bool:
    """Whether a method of ``cls`` assigns or reads ``self.<name>``."""
    return any(name in f.__code__.co_names for f in vars(cls).values() if hasattr(f, "__code__"))
