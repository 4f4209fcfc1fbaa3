"""Soak: churning clients and a hostile one for a long time; memory and descriptors stay flat, no acked message is lost.

The server runs as ``make run`` runs it (SQLite history, the host cluster on a port of
its own) on free 127.0.0.1 ports. For ``--minutes`` (30; ``--smoke``: 1):
- churners connect (the chat socket and ``/ws`` in turn), join a room, resume with
  ``since`` = the last message they saw there, resend what was never acked (same
  ``cid``), chat, read a little, and drop: half close cleanly, half reset the TCP
  connection;
- one observer per room stays connected the whole time (it resumes with ``since`` if it
  is ever dropped): it must receive every acked message of its room;
- a hostile client, on both transports in turn, sends garbage handshakes, bad frames,
  deeply nested JSON, a ping after the server's close, floods past the rate limit, and
  frames cut short by a reset.
Every ``--sample`` seconds it reads RSS and open descriptors of the server's process tree.
At the end: messages lost (acked but missing from the room's history or never received
by its observer: must be 0), RSS and descriptor slopes after the warm-up, and the
descriptors once every client is gone, against the level before the first.

Example: ``python benchmarks/soak.py --smoke`` (exit status 1 if anything above fails)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import random
import socket
import struct
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import psutil
import trio
from _harness import Results, console, plt, print_table, start_server
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from wsproto import ConnectionState, ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

if TYPE_CHECKING:
    from _harness import Server

#: Seconds a client waits for the server's close frame, or for one reply.
REPLY_TIMEOUT: Final = 10.0
#: How long the hostile client reads the server's answer before it hangs up.
HOSTILE_READ: Final = 0.5
#: Descriptors above the start level still counted as "back" (a socket the GC has yet to close).
FD_SLACK: Final = 2
#: Seconds, after the churn, for the server to let go of every connection.
SETTLE: Final = 20.0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=30.0, help="how long the churn runs")
    p.add_argument("--smoke", action="store_true", help="one minute, fewer clients (make test)")
    p.add_argument("--churners", type=int, default=24, help="clients connecting and dropping")
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument(
        "--hostile-rate", type=float, default=5.0, help="hostile attempts a second (0: none)"
    )
    p.add_argument(
        "--transports",
        default="chat,ws",
        help="what churners and the hostile client use: chat socket, /ws",
    )
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS/fd samples")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument(
        "--results", type=Path, default=None, help="results folder (default: a new timestamped one)"
    )
    args = p.parse_args()
    if not args.transports or not set(args.transports.split(",")) <= {"chat", "ws"}:
        p.error("--transports: a comma-separated list of chat, ws")
    if args.smoke:
        args.minutes, args.churners, args.sample = 1.0, 8, 1.0
    results = Results("soak", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder)}
    console.print(f"results: {results.folder}")
    server = start_server(
        "ours",
        results.logs,
        pin=False,
        workers=args.workers,
        # Rate limit on (the harness turns it off for throughput runs): the hostile
        # client's floods must meet it.
        extra_env={"TRIO_CHAT_RATE_LIMIT": "10"},
    )
    try:
        run = trio.run(_soak, args, server)
    finally:
        alive = server.proc.poll() is None
        server.stop()
    run["server_alive"] = alive and run["server_alive"]
    results.add(run)
    _plot(results, run)
    problems = _problems(run)
    _print_summary(run, problems)
    console.print(f"JSON and plot in {results.folder}")
    raise SystemExit(1 if problems else 0)


# --- the run ---------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """What the clients saw; shared by every task of the run."""

    rooms: list[str]
    #: Acked message ids per room.
    acked: dict[str, set[str]]
    #: Message ids each room's observer received (live or replayed on resume).
    observed: dict[str, set[str]]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    hostile: dict[str, int] = dataclasses.field(default_factory=dict)
    close_codes: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    open_clients: int = 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def error(self, text: str) -> None:
        self.count("errors")
        if len(self.errors) < 50:
            self.errors.append(text)


async def _soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    known = {"chat": server.url, "ws": f"ws://127.0.0.1:{server.http_port}/ws"}
    urls = [known[t] for t in args.transports.split(",")]
    base = f"http://127.0.0.1:{server.http_port}"
    rooms = [f"soak-{k}" for k in range(args.rooms)]
    tally = Tally(rooms, {r: set() for r in rooms}, {r: set() for r in rooms})
    async with httpx.AsyncClient(base_url=base, timeout=REPLY_TIMEOUT) as http:
        await _warm_up(urls[0], http)
        fds_start, kinds_start = _fds(server), _fd_kinds(server)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        duration = args.minutes * 60
        async with trio.open_nursery() as outer:
            outer.start_soon(_sample_forever, server, tally, samples, t0, args.sample)
            outer.start_soon(_progress, tally, samples, t0, duration)
            async with trio.open_nursery() as observers:
                for k, room in enumerate(rooms):
                    await observers.start(_observe, urls[k % len(urls)], room, tally)
                with trio.move_on_after(duration):
                    async with trio.open_nursery() as churn:
                        for i in range(args.churners):
                            churn.start_soon(_churn, urls, rooms, i, tally)
                        if args.hostile_rate > 0:
                            churn.start_soon(_hostile, urls, args.hostile_rate, tally)
                churn_end = time.monotonic() - t0
                # Every acked message reaches the observers within a few commits.
                with trio.move_on_after(REPLY_TIMEOUT):
                    # Polled: the observers' progress is spread over their tasks.
                    while any(tally.acked[r] - tally.observed[r] for r in rooms):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                observers.cancel_scope.cancel()
            fds_end = await _settle(server, fds_start)
            kinds_end = _fd_kinds(server)
            outer.cancel_scope.cancel()
        samples.append(_sample(server, tally, t0))
        try:
            history = {room: await _history(http, room) for room in rooms}
            healthy = (await http.get("/healthz")).status_code == 200
        except httpx.HTTPError as exc:
            tally.error(f"history: {exc!r}")
            history, healthy = {room: set() for room in rooms}, False
    lost_history = sum(len(tally.acked[r] - history[r]) for r in rooms)
    lost_observed = sum(len(tally.acked[r] - tally.observed[r]) for r in rooms)
    warm = max(10.0, 0.2 * churn_end)
    steady = [s for s in samples if warm <= s["t"] <= churn_end]
    return {
        "label": server.label,
        "minutes": args.minutes,
        "churn_seconds": churn_end,
        "warmup_seconds": warm,
        "acked": sum(len(a) for a in tally.acked.values()),
        "lost": lost_history + lost_observed,
        "lost_from_history": lost_history,
        "lost_to_observers": lost_observed,
        "counts": tally.counts,
        "hostile": tally.hostile,
        "close_codes": tally.close_codes,
        "errors": tally.errors,
        "fds_start": fds_start,
        "fds_end": fds_end,
        "fd_kinds_start": kinds_start,
        "fd_kinds_end": kinds_end,
        "rss_start_mb": samples[0]["rss_mb"] if samples else float("nan"),
        "rss_end_mb": samples[-1]["rss_mb"],
        "rss_slope_mb_per_min": _slope(steady, "rss_mb"),
        "fds_slope_per_min": _slope(steady, "fds"),
        "server_alive": healthy,
        "samples": samples,
    }


async def _warm_up(url: str, http: httpx.AsyncClient) -> None:
    """One client's whole life, so that what the server opens lazily is open at the start."""
    client = await Client.open(url, "warmup")
    await client.send(type="join", room="warmup")
    await client.until("joined")
    await client.send(type="send", room="warmup", text="warm", cid="w")
    await client.until("ack")
    await client.close()
    (await http.get("/api/rooms/warmup/messages")).raise_for_status()


async def _observe(
    url: str,
    room: str,
    tally: Tally,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    since: str | None = None
    started = False
    while True:
        try:
            client = await Client.open(url, f"obs-{room}")
            try:
                await client.send(type="join", room=room, **({"since": since} if since else {}))
                while True:
                    for event in await client.receive():
                        if event["type"] == "message":
                            tally.observed[room].add(event["id"])
                            since = event["id"]
                        elif event["type"] == "reset":
                            tally.count("observer_resets")
                        elif event["type"] == "joined" and not started:
                            started = True
                            task_status.started()
            finally:
                with trio.move_on_after(REPLY_TIMEOUT, shield=True):
                    await client.close()
        except Closed as exc:
            tally.count("observer_drops")
            tally.close_codes[f"observer {exc.code}"] = (
                tally.close_codes.get(f"observer {exc.code}", 0) + 1
            )
        except OSError as exc:
            tally.error(f"observer {room}: {exc!r}")
            await trio.sleep(0.5)


async def _churn(urls: list[str], rooms: list[str], i: int, tally: Tally) -> None:
    rng = random.Random(i)
    last_seen: dict[str, str] = {}
    unacked: dict[str, tuple[str, str]] = {}  # cid -> (room, text)
    serial = itertools.count()
    for round_ in itertools.count():
        room = rng.choice(rooms)
        try:
            client = await Client.open(urls[round_ % len(urls)], f"churn{i}")
        except (OSError, Closed) as exc:
            tally.error(f"churner {i} connect: {exc!r}")
            await trio.sleep(0.5)
            continue
        tally.count("connects")
        abrupt = rng.random() < 0.5
        try:
            since = last_seen.get(room)
            await client.send(type="join", room=room, **({"since": since} if since else {}))
            if since:
                tally.count("resumes")
            for event in await client.until("joined"):
                _seen(event, last_seen)
            for cid, (r, text) in list(unacked.items()):
                if r == room:
                    await client.send(type="send", room=r, text=text, cid=cid)
                    tally.count("resent")
            for _ in range(rng.randint(1, 3)):
                cid = f"c{i}-{next(serial)}"
                text = f"soak {cid}"
                unacked[cid] = (room, text)
                await client.send(type="send", room=room, text=text, cid=cid)
            with trio.move_on_after(rng.uniform(0.05, 0.5)):
                while any(r == room for r, _ in unacked.values()):
                    for event in await client.receive():
                        _seen(event, last_seen)
                        if event["type"] == "ack" and event.get("cid") in unacked:
                            r, _ = unacked.pop(event["cid"])
                            tally.acked[r].add(event["id"])
                        elif event["type"] == "error":
                            tally.error(f"churner {i}: {event}")
        except trio.TooSlowError:
            tally.error(f"churner {i}: no reply within {REPLY_TIMEOUT} s")
        except Closed as exc:
            tally.close_codes[f"churner {exc.code}"] = (
                tally.close_codes.get(f"churner {exc.code}", 0) + 1
            )
        finally:
            with trio.move_on_after(REPLY_TIMEOUT, shield=True):
                await (client.reset() if abrupt else client.close())
        tally.count("resets" if abrupt else "clean_closes")


def _seen(event: dict[str, Any], last_seen: dict[str, str]) -> None:
    if event["type"] == "message":
        last_seen[event["room"]] = event["id"]


# --- the hostile client ----------------------------------------------------------------


def _frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame, masked unless told otherwise (RFC 6455 §5.2)."""
    n = len(payload)
    length = (
        bytes([n])
        if n < 126
        else b"\x7e" + struct.pack("!H", n)
        if n < 65536
        else b"\x7f" + struct.pack("!Q", n)
    )
    head = bytes([(0x80 if fin else 0) | opcode, length[0] | (0x80 if masked else 0)]) + length[1:]
    if not masked:
        return head + payload
    mask = random.randbytes(4)
    return head + mask + bytes(b ^ mask[k % 4] for k, b in enumerate(payload))


def _handshake(host: str) -> bytes:
    return (
        f"GET /ws?name=hostile HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


_NESTED: Final = b'{"type":"ping","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
_CLIENT_HELLO: Final = (
    bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
)
_PING_COMMAND: Final = _frame(0x1, b'{"type":"ping"}')

#: What the hostile client sends, by name: (a valid handshake first?, the bytes, reset?).
HOSTILE: Final[dict[str, tuple[bool, bytes, bool]]] = {
    "not_http": (False, b"\x00" * 64 + b"\r\n\r\n", False),
    "plain_get": (False, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False),
    "no_key": (
        False,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        False,
    ),
    "wrong_version": (False, _handshake("127.0.0.1").replace(b"Version: 13", b"Version: 8"), False),
    "tls_hello": (False, _CLIENT_HELLO, False),
    "unmasked_frame": (True, _frame(0x1, b'{"type":"ping"}', masked=False), False),
    "reserved_opcode": (True, _frame(0x3, b"x"), False),
    "big_ping": (True, _frame(0x9, b"p" * 200), False),
    "bad_close_code": (True, _frame(0x8, struct.pack("!H", 999)), False),
    "bad_utf8": (True, _frame(0x1, b"\xff\xfe"), False),
    "continuation_first": (True, _frame(0x0, b"x"), False),
    "nested_json": (True, _frame(0x1, _NESTED), False),
    "ping_after_close": (True, _frame(0x2, b"bin") + _frame(0x9, b"late"), False),
    "flood": (True, _PING_COMMAND * 200, False),
    "half_frame_reset": (True, _frame(0x1, b'{"type":"ping"}')[:5], True),
}


async def _hostile(urls: list[str], rate: float, tally: Tally) -> None:
    for k, name in enumerate(itertools.cycle(HOSTILE)):
        handshake_first, data, reset = HOSTILE[name]
        parts = urllib.parse.urlsplit(urls[k // len(HOSTILE) % len(urls)])
        try:
            stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
        except OSError as exc:
            tally.error(f"hostile {name}: connect: {exc!r}")
            await trio.sleep(1 / rate)
            continue
        try:
            with trio.move_on_after(HOSTILE_READ * 4):
                if handshake_first:
                    await stream.send_all(_handshake(parts.netloc))
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = await stream.receive_some()
                        if not chunk:
                            raise trio.BrokenResourceError
                        head += chunk
                await stream.send_all(data)
                if not reset:
                    with trio.move_on_after(HOSTILE_READ):
                        while await stream.receive_some():
                            pass
            tally.hostile[name] = tally.hostile.get(name, 0) + 1
        except trio.BrokenResourceError:
            tally.hostile[name] = tally.hostile.get(name, 0) + 1  # the server hung up first
        finally:
            if reset:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            await stream.aclose()
        await trio.sleep(1 / rate)


# --- a minimal client ------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (``code`` 1006: without a close frame)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Client:
    """A chat client on a raw socket and wsproto: it can drop its connection abruptly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.text: list[str] = []

    @classmethod
    async def open(cls, url: str, name: str) -> Client:
        parts = urllib.parse.urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
        client = cls(stream)
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                await client._write(Request(host=parts.netloc, target=f"{parts.path}?name={name}"))
                while True:
                    data = await client._read()
                    client.ws.receive_data(data)
                    for event in client.ws.events():
                        if isinstance(event, AcceptConnection):
                            return client
                        if isinstance(event, RejectConnection):
                            raise Closed(event.status_code)
        except BaseException:
            await stream.aclose()
            raise

    async def _write(self, event: Any) -> None:
        try:
            await self.stream.send_all(self.ws.send(event))
        except trio.BrokenResourceError:
            raise Closed(1006) from None

    async def _read(self) -> bytes:
        try:
            data = await self.stream.receive_some()
        except trio.BrokenResourceError:
            data = b""
        if not data:
            raise Closed(1006)
        return data

    async def send(self, **command: Any) -> None:
        await self._write(TextMessage(data=json.dumps(command)))

    async def receive(self) -> list[dict[str, Any]]:
        """The events of the next bytes to arrive (maybe none); answers pings."""
        self.ws.receive_data(await self._read())
        events: list[dict[str, Any]] = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self.text.append(event.data)
                if event.message_finished:
                    text, self.text = "".join(self.text), []
                    events += [json.loads(line) for line in text.split("\n")]
            elif isinstance(event, Ping):
                await self._write(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    with contextlib.suppress(Closed):
                        await self._write(event.response())
                raise Closed(event.code)
        return events

    async def until(self, type_: str) -> list[dict[str, Any]]:
        """Every event up to and including the first of ``type_``."""
        seen: list[dict[str, Any]] = []
        with trio.fail_after(REPLY_TIMEOUT):
            while not any(e["type"] == type_ for e in seen):
                seen += await self.receive()
        return seen

    async def close(self) -> None:
        """Close cleanly: a close frame, then read until the server's close and EOF."""
        try:
            await self._write(CloseConnection(code=1000))
            with trio.move_on_after(REPLY_TIMEOUT):
                while True:
                    await self.receive()
        except Closed:
            pass
        finally:
            await self.stream.aclose()

    async def reset(self) -> None:
        """Drop the connection with a TCP reset: no close frame, no FIN."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


# --- measuring -------------------------------------------------------------------------


def _fds(server: Server) -> int:
    total = 0
    for pid in server.pids():
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).num_fds()
    return total


def _fd_kinds(server: Server) -> dict[str, int]:
    """The server's descriptors by what they are: sockets, pipes, or the file's name."""
    kinds: dict[str, int] = {}
    for pid in server.pids():
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    kind = target.split(":")[0] if ":[" in target else Path(target).name
                    kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _sample(server: Server, tally: Tally, t0: float) -> dict[str, float]:
    return {
        "t": time.monotonic() - t0,
        "rss_mb": server.rss_bytes() / 2**20,
        "fds": _fds(server),
        "acked": sum(len(a) for a in tally.acked.values()),
        "hostile": sum(tally.hostile.values()),
    }


async def _sample_forever(
    server: Server, tally: Tally, samples: list[dict[str, float]], t0: float, every: float
) -> None:
    while True:
        samples.append(_sample(server, tally, t0))
        await trio.sleep(every)


async def _settle(server: Server, fds_start: int) -> int:
    """The server's descriptors once they are back near the start, or after `SETTLE` s."""
    with trio.move_on_after(SETTLE):
        while _fds(server) > fds_start + FD_SLACK:  # noqa: ASYNC110 (another process's state)
            await trio.sleep(0.2)
    return _fds(server)


async def _history(http: httpx.AsyncClient, room: str) -> set[str]:
    ids: set[str] = set()
    before: str | None = None
    while True:
        params = {"limit": "200", **({"before": before} if before else {})}
        resp = await http.get(f"/api/rooms/{room}/messages", params=params)
        resp.raise_for_status()
        page = resp.json()
        ids.update(m["id"] for m in page["messages"])
        if not page["more"] or not page["messages"]:
            return ids
        before = page["messages"][0]["id"]


def _slope(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` per minute."""
    if len(samples) < 2:
        return float("nan")
    ts = [s["t"] / 60 for s in samples]
    ys = [s[key] for s in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


async def _progress(tally: Tally, samples: list[dict[str, float]], t0: float, total: float) -> None:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("soak", total=total)
        while True:
            last = samples[-1] if samples else {"rss_mb": 0.0, "fds": 0}
            bar.update(
                task,
                completed=min(total, time.monotonic() - t0),
                description=(
                    f"soak: {sum(len(a) for a in tally.acked.values()):,} acked, "
                    f"{tally.counts.get('connects', 0):,} connects, "
                    f"{sum(tally.hostile.values()):,} hostile, "
                    f"RSS {last['rss_mb']:.1f} MB, {last['fds']:.0f} fds"
                ),
            )
            await trio.sleep(0.5)


# --- the report ------------------------------------------------------------------------


def _problems(run: dict[str, Any]) -> list[str]:
    problems = []
    if not run["server_alive"]:
        problems.append("the server stopped")
    if run["lost"]:
        problems.append(f"{run['lost']} acked messages lost")
    if run["fds_end"] > run["fds_start"] + FD_SLACK:
        problems.append(
            f"descriptors not back: {run['fds_start']} at the start, {run['fds_end']} at the end"
        )
    if not run["acked"]:
        problems.append("no message was acked")
    return problems


def _print_summary(run: dict[str, Any], problems: list[str]) -> None:
    c = run["counts"]
    print_table(
        f"soak: {run['label']}, {run['churn_seconds']:.0f} s of churn",
        ["figure", "value"],
        [
            ["connects (resumes)", f"{c.get('connects', 0):,} ({c.get('resumes', 0):,})"],
            ["clean closes / resets", f"{c.get('clean_closes', 0):,} / {c.get('resets', 0):,}"],
            ["hostile attempts", sum(run["hostile"].values())],
            ["acked messages", run["acked"]],
            [
                "lost (history / observers)",
                f"{run['lost_from_history']} / {run['lost_to_observers']}",
            ],
            ["RSS start → end, MB", f"{run['rss_start_mb']:.1f} → {run['rss_end_mb']:.1f}"],
            ["RSS slope after warm-up, MB/min", run["rss_slope_mb_per_min"]],
            ["fds start → end", f"{run['fds_start']} → {run['fds_end']}"],
            ["fds slope after warm-up, /min", run["fds_slope_per_min"]],
            ["client errors", c.get("errors", 0)],
        ],
    )
    for text in run["errors"][:5]:
        console.print(f"[yellow]{text}[/]")
    for problem in problems:
        console.print(f"[red]FAIL: {problem}[/]")


def _plot(results: Results, run: dict[str, Any]) -> None:
    samples = run["samples"]
    if not samples:
        return
    pyplot = plt()
    fig, (rss, fds) = pyplot.subplots(2, 1, figsize=(8, 5), dpi=100, sharex=True)
    ts = [s["t"] / 60 for s in samples]
    rss.plot(ts, [s["rss_mb"] for s in samples], color="C0")
    rss.set_ylabel("RSS, MB")
    rss.set_title(f"soak: {run['label']} (slopes after warm-up)", fontsize=10)
    fds.plot(ts, [s["fds"] for s in samples], color="C1")
    fds.set_ylabel("open fds")
    fds.set_xlabel("minutes")
    for ax, slope, unit in (
        (rss, run["rss_slope_mb_per_min"], "MB/min"),
        (fds, run["fds_slope_per_min"], "/min"),
    ):
        ax.axvspan(0, run["warmup_seconds"] / 60, color="0.9", label="warm-up")
        ax.axvline(run["churn_seconds"] / 60, color="0.5", linestyle="--", label="churn ends")
        ax.annotate(
            f"slope {slope:+.3g} {unit}", (0.99, 0.05), xycoords="axes fraction", ha="right"
        )
    rss.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(results.figure(""))
    pyplot.close(fig)


if __name__ == "__main__":
    main()
