"""The terminal client's chat state and connection: `ChatClient` (see `_terminal`).

Its state outlives any one connection: per room the ids already printed and the highest
id seen (sent as ``since`` on the next join), and the outbox of unacked sends with their
``cid``, sent again after a reconnect.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import secrets
import time
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

from ..protocol._codes import CLOSE_SLOW
from ._explain import CONNECT_TIMEOUT, explain_close, explain_failure, is_number, printable
from ._state import Pending, Room

if TYPE_CHECKING:
    from collections.abc import Callable

#: How many stdin lines may wait for the command task; typing faster than that blocks the
#: reader thread, which is the backpressure a terminal wants.
STDIN_BUFFER: Final = 64
PING_INTERVAL: Final = 20.0
#: No frame at all (not even a pong) for this long means the connection is dead.
SILENCE_LIMIT: Final = 45.0
#: Unacked sends older than this are sent again (same cid) while connected.
RETRY_INTERVAL: Final = 5.0
CLOSE_TIMEOUT: Final = 2.0
BACKOFF_BASE: Final = 0.5
#: How long EOF on stdin waits for unacked sends before exiting.
EOF_DRAIN_TIMEOUT: Final = 10.0
#: ``typing`` is sent at most this often while the user types (the page's pace too).
TYPING_SEND_EVERY: Final = 2.0
#: How long "bob is typing…" stays without a new ``typing`` from bob (the page's 4 s).
TYPING_SHOW: Final = 4.0
HELP: Final = (
    "commands: /join ROOM, /leave [ROOM], /rooms, /who, /quit; other lines are sent to the "
    "current room (start with // to send a line beginning with /)"
)


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


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
        self._rooms: dict[str, Room] = {r: Room(r) for r in dict.fromkeys(rooms)}
        self._current: str | None = rooms[0] if rooms else None
        self._outbox: dict[str, Pending] = {}
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
        self._status: Callable[[str], None] | None = None
        self._status_changed = trio.Event()
        self._last_typing_sent = -math.inf
        # Typing notices for the sender task; one waiting is enough (they say the same).
        self._typing_out, self._typing_in = trio.open_memory_channel[str](1)
        self._run_scope = trio.CancelScope()
        self._quitting = False
        #: Why the server refused this client for good (the run then ended), or None.
        self.failure: str | None = None

    def set_status_callback(self, status: Callable[[str], None]) -> None:
        """Show the status line (current room, who is typing) through ``status``."""
        self._status = status
        self._status_changed.set()

    def prompt(self) -> str:
        """The prompt's text: the current room."""
        return f"#{self._current}> " if self._current else "> "

    def stop(self) -> None:
        """End the run now, without waiting for unacked sends (Ctrl-C)."""
        self._run_scope.cancel()

    def note_typing(self, text: str) -> None:
        """The user changed the line being typed: tell the room, at most every 2 s."""
        room = self._rooms.get(self._current) if self._current else None
        if room is None or not room.joined or not text.strip() or text.startswith("/"):
            return
        now = trio.current_time()
        if now - self._last_typing_sent < TYPING_SEND_EVERY:
            return
        self._last_typing_sent = now
        with contextlib.suppress(trio.WouldBlock):
            self._typing_out.send_nowait(room.name)

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
        with self._run_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_lines, send)
                nursery.start_soon(self._connection_loop)
                nursery.start_soon(self._send_typing)
                if self._status is not None:
                    nursery.start_soon(self._show_status)
                await self._process_input(receive)
                nursery.cancel_scope.cancel()

    async def _send_typing(self) -> None:
        async for room in self._typing_in:
            ws = self._ws
            if ws is not None and room in self._rooms and self._rooms[room].joined:
                await self._send(ws, {"type": "typing", "room": room})

    async def _show_status(self) -> None:
        """Keep the status line current: the room, and who is typing there until it ends."""
        assert self._status is not None
        while True:
            now = trio.current_time()
            room = self._rooms.get(self._current) if self._current else None
            typing: list[str] = []
            if room is not None:
                room.typing = {who: end for who, end in room.typing.items() if end > now}
                typing = sorted(room.typing)
            text = f"#{room.name}" if room is not None else "no room: /join ROOM"
            if typing:
                verb = "is" if len(typing) == 1 else "are"
                text += f" · {', '.join(printable(t) for t in typing)} {verb} typing…"
            self._status(text)
            self._status_changed = trio.Event()
            with trio.move_on_at(min(room.typing.values(), default=math.inf) if room else math.inf):
                await self._status_changed.wait()

    async def _connection_loop(self) -> None:
        await trio.lowlevel.checkpoint()  # a connect that fails at once awaits nothing else
        attempt = 0
        while True:
            closed: CloseReason | None = None
            try:
                async with open_websocket_url(
                    _with_query(self._url, name=self._name, client_id=self._client_id),
                    connect_timeout=CONNECT_TIMEOUT,
                    disconnect_timeout=CLOSE_TIMEOUT,
                ) as ws:
                    attempt = 0
                    closed = await self._session(ws)
                    why, permanent = explain_close(closed)
            except (HandshakeError, OSError, ConnectionClosed) as exc:
                why, permanent = (
                    explain_close(closed) if closed else explain_failure(exc, self._url)
                )
            self._went_offline()
            if self._quitting or self.failure is not None:
                return  # /quit, end of input, or refused for good (bad_name): the run ends
            if permanent:
                self._refused(why)
                return
            if closed is not None and closed.code == CLOSE_SLOW:
                delay = 0.25 + random.random() * 0.75
                self._say(f"* disconnected: {why}; catching up in {delay:.1f}s")
            else:
                # Full jitter over the upper half, so a restarted server is not stampeded.
                cap = min(self._max_backoff, BACKOFF_BASE * 2**attempt)
                delay = cap / 2 + random.random() * cap / 2
                self._say(f"* disconnected: {why}; reconnecting in {delay:.1f}s")
            attempt += 1
            await trio.sleep(delay)

    def _refused(self, why: str) -> None:
        """The server refused this client for good: end the run (exit status 1)."""
        self.failure = why
        self.stop()

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
            room.typing.clear()
        self._status_changed.set()

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
                f"* connected as {printable(frame.get('name'))} (node {printable(frame.get('node'))})"
            )
            for r in list(self._rooms.values()):
                await self._join(ws, r)
        elif kind == "message":
            self._on_message(frame, room)
        elif kind == "joined" and room is not None:
            room.joined = True
            room.members = {m for m in frame.get("members", []) if isinstance(m, str)}
            count = frame.get("count")
            # A big room lists nobody: its count stands in for the list.
            big = isinstance(count, int) and count > len(room.members)
            room.head_count = count if big else None
            members = ", ".join(printable(m) for m in frame.get("members", []))
            self._say(f"* joined #{room.name}: " + (f"{count} here" if big else members))
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
            if isinstance(who := frame.get("joined"), str):
                room.members.add(who)
                self._say(f"* #{room.name}: {printable(who)} joined")
            if isinstance(who := frame.get("left"), str):
                room.members.discard(who)
                room.typing.pop(who, None)
                self._status_changed.set()
                self._say(f"* #{room.name}: {printable(who)} left")
        elif kind == "members" and room is not None and isinstance(frame.get("count"), int):
            names = frame.get("names")
            if isinstance(names, list):
                room.members = {m for m in names if isinstance(m, str)}
                room.head_count = None
            else:
                room.members.clear()
                room.head_count = frame["count"]
        elif kind == "typing" and room is not None and isinstance(who := frame.get("from"), str):
            room.typing[who] = trio.current_time() + TYPING_SHOW
            self._status_changed.set()
        elif kind == "error" and frame.get("code") == "bad_name":
            self._refused(
                f"the server refused the name {self._name!r}: {printable(frame.get('message'))}"
            )
        elif kind == "error":
            self._say(f"! error {printable(frame.get('code'))}: {printable(frame.get('message'))}")
            if frame.get("code") == "store_unavailable" and room is not None and not room.joined:
                room.rejoin = True

    def _on_message(self, frame: dict[str, Any], room: Room | None) -> None:
        msg_id = frame.get("id")
        if room is None or not isinstance(msg_id, str):
            return
        self._settle(frame.get("cid"))
        if not room.remember(msg_id):
            return
        if room.typing.pop(str(frame.get("from")), None) is not None:
            self._status_changed.set()  # the message ends their "is typing"
        ts = frame.get("ts")
        clock = time.strftime("%H:%M:%S", time.localtime(ts)) if is_number(ts) else "--:--:--"
        self._say(
            f"[{clock}] #{room.name} <{printable(frame.get('from'))}> {printable(frame.get('text'))}"
        )

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
            self._status_changed.set()
            if arg not in self._rooms:
                self._rooms[arg] = Room(arg)
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
                self._status_changed.set()
            self._say(f"* left #{name}" + (f"; now in #{self._current}" if self._current else ""))
        elif verb == "/who":
            room = self._rooms.get(self._current) if self._current else None
            if room is None or not room.joined:
                self._say(f"! not in #{self._current}" if room is None else "! not joined yet")
            elif room.head_count is not None:
                self._say(f"* #{room.name}: {room.head_count} here (too many to list)")
            else:
                who = ", ".join(printable(m) for m in sorted(room.members))
                self._say(f"* #{room.name}: {len(room.members)} here: {who}")
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
        pending = Pending(f"{self._cid_prefix}-{next(self._cids)}", self._current, text)
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

    async def _join(self, ws: WebSocketConnection, room: Room) -> None:
        frame: dict[str, Any] = {"type": "join", "room": room.name}
        if room.last_id is not None:
            frame["since"] = room.last_id
        await self._send(ws, frame)

    async def _send_pending(self, ws: WebSocketConnection, p: Pending) -> None:
        p.sent_at = time.monotonic()
        await self._send(ws, {"type": "send", "room": p.room, "text": p.text, "cid": p.cid})

    async def _send(self, ws: WebSocketConnection, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()  # on a closed connection, send_message does not
        # A closed connection is noticed (and handled) by the receive loop; a send that
        # fails here stays in the outbox and goes out again after the reconnect.
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(json.dumps(frame))

    async def _close(self) -> None:
        self._quitting = True
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose()
        await trio.lowlevel.checkpoint()  # the close is shielded: not one

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()
