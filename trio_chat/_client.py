"""The terminal client: ``trio-chat client URL --name alice --room general``.

Theory of operation: one task reads stdin lines (in a thread, so pipes and terminals both
work) into a bounded channel; one task turns them into commands and sends; one connection
loop keeps a WebSocket open, reconnecting with exponential backoff and jitter. The client's
state outlives any one connection:

- per room, the ids already printed (so a replay never prints a message twice) and the
  highest id seen, sent as ``since`` when the room is joined again after a reconnect;
- the outbox: every ``send`` with its ``cid`` until the server acks it. After a reconnect
  the outbox is sent again; the server stores a ``cid`` once per ``client_id``, so a
  retry is never a duplicate.

The ``client_id`` (sent as ``?client_id=``) is a random secret made once per run: the
outbox lives in this process's memory only, so no retry outlives the run, and a file
would be state to guard and share between runs for nothing. It is never the name,
which anyone can ask for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

#: How many stdin lines may wait for the command task; typing faster than that blocks the
#: reader thread, which is the backpressure a terminal wants.
STDIN_BUFFER: Final = 64
#: Ids remembered per room for de-duplication; replays are at most a few hundred.
SEEN_IDS_PER_ROOM: Final = 5000
PING_INTERVAL: Final = 20.0
#: No frame at all (not even a pong) for this long means the connection is dead.
SILENCE_LIMIT: Final = 45.0
#: Unacked sends older than this are sent again (same cid) while connected.
RETRY_INTERVAL: Final = 5.0
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0
BACKOFF_BASE: Final = 0.5
#: Close code the server uses for a client that could not keep up (see docs/protocol.md).
CLOSE_SLOW: Final = 4008
#: How long EOF on stdin waits for unacked sends before exiting.
EOF_DRAIN_TIMEOUT: Final = 10.0

HELP: Final = (
    "commands: /join ROOM, /leave [ROOM], /rooms, /quit; other lines are sent to the "
    "current room (start with // to send a line beginning with /)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``client`` command's arguments to ``parser``.

    Args:
        parser: The (sub)parser of the ``client`` command.
    """
    parser.add_argument(
        "url",
        help="chat socket URL, e.g. ws://127.0.0.1:8001/ws or ws://127.0.0.1:8000/ws",
    )
    parser.add_argument(
        "--name",
        default=os.environ.get("USER") or "guest",
        help="nickname (the server may add a suffix if it is taken; default: $USER)",
    )
    parser.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="ROOM",
        help="room to join at start; repeat for several (default: general)",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="longest wait between reconnection attempts (default: 8)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the terminal client until ``/quit``, end of input or Ctrl-C.

    Args:
        args: Parsed arguments, as declared by :func:`add_arguments`.

    Returns:
        The process exit status: 0 after ``/quit`` or end of input, 2 for a bad URL,
        130 after Ctrl-C.
    """
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        print(f"trio-chat client: {exc}", file=sys.stderr)
        return 2
    client = ChatClient(
        url,
        name=args.name,
        rooms=args.rooms or ["general"],
        max_backoff=args.max_backoff,
        out=sys.stdout,
    )
    try:
        trio.run(client.run_until_quit, _read_stdin_lines)
    except KeyboardInterrupt:
        return 130
    return 0


def normalize_url(url: str) -> str:
    """Turn what a user types into a WebSocket URL.

    ``http(s)://`` becomes ``ws(s)://`` and an empty path becomes ``/ws``.

    Args:
        url: The URL given on the command line.

    Returns:
        A ``ws://`` or ``wss://`` URL.

    Raises:
        ValueError: The URL has another scheme or no host.
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or http:// URL: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path or "/ws", parts.query, ""))


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _read_stdin_lines(send: trio.MemorySendChannel[str]) -> None:
    """Forward stdin lines into ``send``; close it at end of input.

    A thread reads, because a blocking read works the same on a pipe, a file and a
    terminal (a non-blocking ``FdStream`` on fd 0 would also flip the terminal's mode
    under the shell).

    Cancellation: abandons the blocked reader thread, which ends with the process.
    """
    async with send:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            await send.send(line.rstrip("\r\n"))


@dataclass
class _Room:
    name: str
    last_id: str | None = None
    joined: bool = False
    #: The join was refused (``store_unavailable``): join again at the next retry.
    rejoin: bool = False
    seen: set[str] = field(default_factory=set)
    seen_order: deque[str] = field(default_factory=deque)

    def remember(self, msg_id: str) -> bool:
        """Record ``msg_id``; return False if it was seen before."""
        if msg_id in self.seen:
            return False
        self.seen.add(msg_id)
        self.seen_order.append(msg_id)
        if len(self.seen_order) > SEEN_IDS_PER_ROOM:
            self.seen.discard(self.seen_order.popleft())
        if self.last_id is None or msg_id > self.last_id:
            self.last_id = msg_id
        return True


@dataclass
class _Pending:
    cid: str
    room: str
    text: str
    sent_at: float = -math.inf


class ChatClient:
    """A chat session that survives reconnects.

    Args:
        url: The WebSocket URL (``name`` and ``client_id`` are added).
        name: The nickname asked for.
        rooms: Rooms to join at start; the first is the current room.
        max_backoff: Longest wait between reconnection attempts, in seconds.
        out: Where to print.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        rooms: list[str],
        max_backoff: float = 8.0,
        out: TextIO,
    ) -> None:
        self._url = url
        self._name = name
        self._out = out
        self._max_backoff = max_backoff
        self._rooms: dict[str, _Room] = {r: _Room(r) for r in dict.fromkeys(rooms)}
        self._current: str | None = rooms[0] if rooms else None
        self._outbox: dict[str, _Pending] = {}
        # Held while outbox messages go out, so a line typed during a flush after a
        # (re)join is sent after the queued ones, never between them.
        self._send_order = trio.Lock()
        self._cids = itertools.count(1)
        self._cid_prefix = f"t-{os.getpid():x}-{random.getrandbits(32):08x}"
        self._client_id = secrets.token_urlsafe(16)
        self._ws: WebSocketConnection | None = None
        self._online = False
        self._outbox_empty = trio.Event()
        self._outbox_empty.set()

    # --------------------------------------------------------------------- running

    async def run_until_quit(
        self, read_lines: Callable[[trio.MemorySendChannel[str]], Any]
    ) -> None:
        """Connect and process input until ``/quit`` or end of input.

        Args:
            read_lines: An async function that feeds input lines into the channel it is
                given and closes it at end of input.

        Cancellation: closes the connection (bounded in time) and returns nothing.
        """
        send, receive = trio.open_memory_channel[str](STDIN_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_lines, send)
            nursery.start_soon(self._connection_loop)
            await self._process_input(receive)
            nursery.cancel_scope.cancel()

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            code: int | None = None
            reason = ""
            try:
                async with open_websocket_url(
                    _with_query(self._url, name=self._name, client_id=self._client_id),
                    connect_timeout=CONNECT_TIMEOUT,
                    disconnect_timeout=CLOSE_TIMEOUT,
                ) as ws:
                    attempt = 0
                    closed = await self._session(ws)
                    if closed is not None:
                        code, reason = closed.code, closed.reason or ""
            except (HandshakeError, OSError, ConnectionClosed) as exc:
                reason = reason or type(exc).__name__
            self._went_offline()
            if code == CLOSE_SLOW:
                delay = 0.25 + random.random() * 0.75
                self._say(f"* disconnected: too slow to keep up; catching up in {delay:.1f}s")
            else:
                # Full jitter over the upper half, so a restarted server is not stampeded.
                cap = min(self._max_backoff, BACKOFF_BASE * 2**attempt)
                delay = cap / 2 + random.random() * cap / 2
                what = f" ({code} {reason})".rstrip() if code is not None else f" ({reason})"
                self._say(f"* disconnected{what}; reconnecting in {delay:.1f}s")
            attempt += 1
            await trio.sleep(delay)

    async def _session(self, ws: WebSocketConnection) -> CloseReason | None:
        """Serve one connection until it closes; return why it closed."""
        self._ws = ws
        last_frame = [time.monotonic()]
        reason: CloseReason | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, ws, last_frame)
                nursery.start_soon(self._retry_unacked, ws)
                try:
                    while True:
                        data = await ws.get_message()
                        last_frame[0] = time.monotonic()
                        if isinstance(data, bytes):
                            continue
                        for line in data.split("\n"):
                            if line:
                                await self._handle_line(ws, line)
                except ConnectionClosed as exc:
                    # Caught inside the nursery, so it does not come out as a group.
                    nursery.cancel_scope.cancel()
                    reason = exc.reason
        finally:
            self._ws = None
        return reason

    async def _keepalive(self, ws: WebSocketConnection, last_frame: list[float]) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            if time.monotonic() - last_frame[0] > SILENCE_LIMIT:
                await ws.aclose(code=4000, reason="no answer")
                return
            await self._send(ws, {"type": "ping"})

    async def _retry_unacked(self, ws: WebSocketConnection) -> None:
        # A send refused (rate_limited, store_unavailable) or lost is not acked: try it
        # again with the same cid, which the server stores at most once.
        while True:
            await trio.sleep(RETRY_INTERVAL)
            now = time.monotonic()
            for refused in list(self._rooms.values()):
                if refused.rejoin and not refused.joined:
                    refused.rejoin = False
                    await self._join(ws, refused)
            async with self._send_order:
                for p in list(self._outbox.values()):
                    room = self._rooms.get(p.room)
                    if room is not None and room.joined and now - p.sent_at > RETRY_INTERVAL:
                        await self._send_pending(ws, p)

    def _went_offline(self) -> None:
        self._online = False
        for room in self._rooms.values():
            room.joined = False
            room.rejoin = False  # every room is joined again on reconnect

    # --------------------------------------------------------------------- server frames

    async def _handle_line(self, ws: WebSocketConnection, line: str) -> None:
        await trio.lowlevel.checkpoint()  # most frames await nothing else
        try:
            frame = json.loads(line)
        except ValueError:
            self._say(f"! unreadable frame from server: {line[:80]!r}")
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        room_name = frame.get("room")
        room = self._rooms.get(room_name) if isinstance(room_name, str) else None
        if kind == "welcome":
            self._online = True
            self._say(
                f"* connected as {_safe(frame.get('name'))} (node {_safe(frame.get('node'))})"
            )
            for r in list(self._rooms.values()):
                await self._join(ws, r)
        elif kind == "message":
            self._on_message(frame, room)
        elif kind == "joined" and room is not None:
            room.joined = True
            members = ", ".join(_safe(m) for m in frame.get("members", []))
            self._say(f"* joined #{room.name}: {members}")
            async with self._send_order:
                for p in list(self._outbox.values()):
                    if p.room == room.name:
                        await self._send_pending(ws, p)
        elif kind == "reset" and room is not None:
            # Our `since` is older than the server keeps; it follows with the latest page.
            self._say(f"* #{room.name}: too much missed; showing the latest messages")
        elif kind == "history" and room is not None:
            for m in frame.get("messages", []):
                if isinstance(m, dict):
                    self._on_message(m, room)
        elif kind == "ack":
            self._settle(frame.get("cid"))
        elif kind == "presence" and room is not None:
            if frame.get("joined"):
                self._say(f"* #{room.name}: {_safe(frame['joined'])} joined")
            if frame.get("left"):
                self._say(f"* #{room.name}: {_safe(frame['left'])} left")
        elif kind == "error":
            self._say(f"! error {_safe(frame.get('code'))}: {_safe(frame.get('message'))}")
            if frame.get("code") == "store_unavailable" and room is not None and not room.joined:
                room.rejoin = True

    def _on_message(self, frame: dict[str, Any], room: _Room | None) -> None:
        msg_id = frame.get("id")
        if room is None or not isinstance(msg_id, str):
            return
        self._settle(frame.get("cid"))
        if not room.remember(msg_id):
            return
        ts = frame.get("ts")
        clock = time.strftime("%H:%M:%S", time.localtime(ts)) if _is_number(ts) else "--:--:--"
        self._say(f"[{clock}] #{room.name} <{_safe(frame.get('from'))}> {_safe(frame.get('text'))}")

    def _settle(self, cid: object) -> None:
        if isinstance(cid, str) and self._outbox.pop(cid, None) is not None and not self._outbox:
            self._outbox_empty.set()

    # --------------------------------------------------------------------- input

    async def _process_input(self, lines: trio.MemoryReceiveChannel[str]) -> None:
        async with lines:
            async for line in lines:
                if not line.strip():
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    if not await self._command(line):
                        break
                else:
                    await self._queue_send(line[1:] if line.startswith("//") else line)
        # /quit or end of input: give unacked sends a chance to reach the server, then leave.
        if self._outbox:
            self._say(f"* sending {len(self._outbox)} queued message(s) first (Ctrl-C quits now)")
            with trio.move_on_after(EOF_DRAIN_TIMEOUT):
                await self._outbox_empty.wait()
            if self._outbox:
                self._say(f"! {len(self._outbox)} message(s) not sent")
        await self._close()

    async def _command(self, line: str) -> bool:
        """Run a ``/command``; return False for ``/quit``."""
        await trio.lowlevel.checkpoint()  # most commands await nothing else
        verb, _, rest = line.partition(" ")
        arg = rest.strip().lstrip("#")
        if verb == "/quit":
            return False
        if verb == "/join" and arg:
            self._current = arg
            if arg not in self._rooms:
                self._rooms[arg] = _Room(arg)
                if self._ws is not None and self._online:
                    await self._join(self._ws, self._rooms[arg])
            self._say(f"* now talking in #{arg}")
        elif verb == "/leave":
            name = arg or self._current
            if name is None or name not in self._rooms:
                self._say(f"! not in #{name}")
                return True
            del self._rooms[name]
            self._outbox = {c: p for c, p in self._outbox.items() if p.room != name}
            if not self._outbox:
                self._outbox_empty.set()
            if self._ws is not None and self._online:
                await self._send(self._ws, {"type": "leave", "room": name})
            if self._current == name:
                self._current = next(iter(self._rooms), None)
            self._say(f"* left #{name}" + (f"; now in #{self._current}" if self._current else ""))
        elif verb == "/rooms":
            listing = " ".join(("*" if r == self._current else "") + "#" + r for r in self._rooms)
            self._say(f"* rooms: {listing or '(none)'}")
        else:
            self._say(HELP)
        return True

    async def _queue_send(self, text: str) -> None:
        await trio.lowlevel.checkpoint()  # queued offline, it awaits nothing else
        if self._current is None:
            self._say("! join a room first: /join ROOM")
            return
        pending = _Pending(f"{self._cid_prefix}-{next(self._cids)}", self._current, text)
        self._outbox[pending.cid] = pending
        if self._outbox_empty.is_set():
            self._outbox_empty = trio.Event()
        room = self._rooms[self._current]
        if self._ws is not None and room.joined:
            async with self._send_order:
                await self._send_pending(self._ws, pending)
        else:
            self._say(f"* offline: queued for #{room.name}")

    # --------------------------------------------------------------------- helpers

    async def _join(self, ws: WebSocketConnection, room: _Room) -> None:
        frame: dict[str, Any] = {"type": "join", "room": room.name}
        if room.last_id is not None:
            frame["since"] = room.last_id
        await self._send(ws, frame)

    async def _send_pending(self, ws: WebSocketConnection, p: _Pending) -> None:
        p.sent_at = time.monotonic()
        await self._send(ws, {"type": "send", "room": p.room, "text": p.text, "cid": p.cid})

    async def _send(self, ws: WebSocketConnection, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()  # on a closed connection, send_message does not
        # A closed connection is noticed (and handled) by the receive loop; a send that
        # fails here stays in the outbox and goes out again after the reconnect.
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(json.dumps(frame))

    async def _close(self) -> None:
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose()
        await trio.lowlevel.checkpoint()  # the close is shielded: not one

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _safe(value: object) -> str:
    """Text from the network as one printable line: control characters (escape
    sequences that could drive the terminal, newlines) are shown as escapes, not obeyed."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
