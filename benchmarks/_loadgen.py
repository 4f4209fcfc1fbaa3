"""The load generator: many WebSocket clients per process, several processes per run.

Each worker process runs one asyncio loop holding hundreds or thousands of connections of a
minimal WebSocket client (`WsConn`, an ``asyncio.Protocol`` with no task per connection, so
the client stays cheap compared with the servers it measures). It speaks two dialects:

- ``chat``: trio-chat's wire protocol (``welcome``, ``join``/``joined``, ``send``, ``ack``;
  server frames may hold several JSON objects separated by ``\\n``), also spoken by the
  Python ``websockets`` peer;
- ``socketio``: the Socket.IO v5 / Engine.IO v4 protocol over a plain WebSocket
  (``0`` open, ``40`` connect, ``42[...]`` events, ``43<id>[...]`` acks, ``2``/``3`` ping/pong).

Latency: the sender puts ``@@<step>:<monotonic ns>@@`` in the message text; a receiver
finds every marker in a frame with one regex (dialect-agnostic, and batched frames just hold
several) and records ``now - sent`` into a per-step bucket counter. CLOCK_MONOTONIC is one
clock for every process on the host. Buckets keep 11 significant bits (about 0.05 %) and are
turned into an HdrHistogram only when the parent collects, off the hot path.

Saturation: every worker reports its own CPU time and the worst event-loop lag seen by a
50 ms ticker; the parent marks results where the load generator was the bottleneck.

The parent talks to workers through a `multiprocessing` pipe: `LoadPool` sends commands
and gathers replies; see `_Worker.handle` for the commands.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import re
import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from multiprocessing.connection import Connection

MARK = re.compile(rb"@@(\d+):(\d+)@@")
ACK_CID = re.compile(rb'"cid":\s*"(c\d+)"')
SIO_ACK = re.compile(rb"^43(\d+)")
JOINED = re.compile(rb'"type":\s*"joined"')
#: Latencies are recorded in microseconds, up to one minute.
HIST_MAX_US = 60_000_000
LAG_TICK = 0.05


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n == 0:
        return key
    keystream = (key * (n // 4 + 1))[:n]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")
    return key + masked.to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _mask(payload)


@dataclass
class StepData:
    count: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    per_conn: dict[str, int] = field(default_factory=dict)

    def record(self, lat_us: int) -> None:
        self.count += 1
        if lat_us >= 2048:
            shift = lat_us.bit_length() - 11
            lat_us = (lat_us >> shift) << shift
        elif lat_us < 1:
            lat_us = 1
        b = self.buckets
        b[lat_us] = b.get(lat_us, 0) + 1

    def histogram(self) -> HdrHistogram:
        h = new_histogram()
        for value, count in self.buckets.items():
            h.record_value(min(value, HIST_MAX_US), count)
        return h


class WsConn(asyncio.Protocol):
    """One client connection; the parser and both dialects, no task of its own."""

    def __init__(
        self, worker: _Worker, host: str, path: str, dialect: str, name: str, room: str | None
    ) -> None:
        self.worker = worker
        self.host = host
        self.path = path
        self.dialect = dialect
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_ready = False
        #: Set for the rest of one data_received call once the fast path hands over.
        self.fast_off = False
        self.closed = False
        self.expected_close = False
        self.node: str | None = None
        self.room: str | None = None
        #: Set before the connection exists: the welcome may be read before
        #: ``create_connection`` returns to its caller.
        self.join_room = room
        #: Receivers record latencies; a pure publisher does not count its own echo.
        self.measure = True
        self.pending: dict[str, int] = {}
        self.on_ack: Callable[[WsConn], None] | None = None
        self.cid_seq = 0

    # --- transport side -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during setup: {exc}"))
        elif not self.expected_close:
            self.worker.unexpected_closes += 1

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            del buf[: end + 4]
            self.upgraded = True
        if (
            self.is_ready
            and self.measure
            and not self.pending
            and not self.fast_off
            and not self.fragments
        ):
            self._fast_frames(buf, now)
            return
        pos = 0
        size = len(buf)
        view = memoryview(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            payload = view[pos + head : pos + head + n].tobytes()
            pos += head + n
            opcode = b0 & 0x0F
            if opcode in (1, 2, 0):
                if not b0 & 0x80:
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join([*self.fragments, payload])
                    self.fragments.clear()
                self.on_text(payload, now)
            elif opcode == 9:
                self._write(encode_frame(10, payload))
            elif opcode == 8:
                self.expected_close = self.expected_close or self.worker.closing
                if not self.expected_close:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    self.worker.note_error(f"server closed {code} {payload[2:]!r}")
                self._write(encode_frame(8, payload[:2]))
                if self.transport is not None:
                    self.transport.close()
                break
        view.release()
        self.fast_off = False
        if pos:
            del buf[:pos]

    def _fast_frames(self, buf: bytearray, now: int) -> None:
        """Steady-state receiver: walk frame headers only, then find every marker of all
        complete text frames with one regex call over the buffer (no per-frame copy).
        A marker lies inside one payload, so header bytes between payloads cannot form one
        (payloads start with ``{`` or a Socket.IO digit, never ``@@<digits>:``)."""
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            if b0 != 0x81:
                # Control or fragmented frame: let the general parser take it from here.
                self._count_markers(buf, pos, now)
                del buf[:pos]
                self.fast_off = True
                self.data_received(b"")
                return
            if n == 1 and buf[pos + 2] == 0x32 and self.dialect == "socketio":
                self._write(encode_frame(1, b"3"))
            pos += head + n
        if pos:
            self._count_markers(buf, pos, now)
            if self.dialect == "chat" and buf.find(b'"error"', 0, pos) >= 0:
                for line in bytes(buf[:pos]).split(b"\n"):
                    if b'"error"' in line:
                        line = line[line.find(b"{") :]
                        self.worker.note_error(line[:200].decode(errors="replace"))
            del buf[:pos]

    def _count_markers(self, buf: bytearray, end: int, now: int) -> None:
        self._record(MARK.findall(buf, 0, end), now)

    def _record(self, found: list[tuple[bytes, bytes]], now: int) -> None:
        """Count the latency of every marker found, into its step's buckets."""
        if not found:
            return
        steps = self.worker.steps
        name = self.name
        last = b""
        data = None
        for step_b, sent_b in found:
            if step_b != last:
                last = step_b
                data = steps.get(int(step_b))
                if data is None:
                    data = steps[int(step_b)] = StepData()
            assert data is not None
            lat = (now - int(sent_b)) // 1000
            if lat >= 2048:
                shift = lat.bit_length() - 11
                lat = (lat >> shift) << shift
            buckets = data.buckets
            buckets[lat] = buckets.get(lat, 0) + 1
            data.count += 1
            # Per receiver and step, to tell duplicate deliveries from extra sends.
            data.per_conn[name] = data.per_conn.get(name, 0) + 1

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.expected_close = True
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.write(encode_frame(8, (1000).to_bytes(2, "big")))
            self.transport.close()

    # --- dialects ---------------------------------------------------------------------------
    def on_text(self, payload: bytes, now: int) -> None:
        # The hot path of the whole load generator: keep it to C-level scans.
        if not self.is_ready:
            self._setup(payload)
            return
        found = MARK.findall(payload) if self.measure else None
        if found:
            self._record(found, now)
        elif self.dialect == "socketio":
            if payload == b"2":
                self._write(encode_frame(1, b"3"))
                return
        elif b'"error"' in payload:
            for line in payload.split(b"\n"):
                if b'"error"' in line:
                    self.worker.note_error(line[:200].decode(errors="replace"))
        if self.pending:
            self._acks(payload, now)

    def _acks(self, payload: bytes, now: int) -> None:
        if self.dialect == "socketio":
            m = SIO_ACK.match(payload)
            cids = [b"c" + m[1]] if m else []
        else:
            cids = []
            if b'ack"' in payload:
                for line in payload.split(b"\n"):
                    if b'"ack"' in line:
                        m2 = ACK_CID.search(line)
                        if m2:
                            cids.append(m2[1])
        for raw in cids:
            sent = self.pending.pop(raw.decode(), None)
            if sent is not None:
                self.worker.acks.record((now - sent) // 1000)
                if self.on_ack is not None:
                    self.on_ack(self)

    def _set_ready(self) -> None:
        self.is_ready = True
        self.ready.set_result(None)

    def _setup(self, payload: bytes) -> None:
        if self.dialect == "socketio":
            if payload.startswith(b"0{"):
                self._write(encode_frame(1, b"40"))
            elif payload.startswith(b"40"):
                self._set_ready()
            elif payload.startswith(b"44"):
                self._fail(f"socket.io connect refused: {payload[:200]!r}")
            elif payload == b"2":
                self._write(encode_frame(1, b"3"))
            return
        for line in payload.split(b"\n"):
            if b'"welcome"' in line and self.node is None:
                self.node = str(json.loads(line).get("node", ""))
                if self.join_room is None:
                    self._set_ready()
                    return
                self._write(
                    encode_frame(1, b'{"type":"join","room":"%s"}' % self.join_room.encode())
                )
            elif JOINED.search(line):
                self.room = self.join_room
                self._set_ready()
                return
            elif b'"error"' in line:
                self._fail(f"setup error: {line[:200]!r}")
                return

    def send_message(self, text: str, room: str, track_ack: bool) -> None:
        if self.closed:
            return
        self.cid_seq += 1
        cid = f"c{self.cid_seq}"
        if track_ack:
            self.pending[cid] = time.monotonic_ns()
        if self.dialect == "socketio":
            ack = str(self.cid_seq) if track_ack else ""
            frame = f'42{ack}["message",{{"text":"{text}","cid":"{cid}"}}]'
        else:
            frame = f'{{"type":"send","room":"{room}","text":"{text}","cid":"{cid}"}}'
        self._write(encode_frame(1, frame.encode()))


def message_text(step: int, size: int) -> str:
    head = f"@@{step}:{time.monotonic_ns()}@@"
    return head + "x" * max(0, size - len(head))


class _Worker:
    def __init__(self, conn: Connection, index: int) -> None:
        self.pipe = conn
        self.index = index
        self.conns: list[WsConn] = []
        self.steps: dict[int, StepData] = {}
        self.acks = StepData()
        self.errors: list[str] = []
        self.error_count = 0
        self.unexpected_closes = 0
        self.closing = False
        self.lag_max = 0.0
        self.sent = 0
        self.done = asyncio.Event()

    def note_error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(text)

    def reply(self, kind: str, payload: Any) -> None:
        self.pipe.send((kind, payload))

    async def lag_ticker(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            self.lag_max = max(self.lag_max, time.monotonic() - t - LAG_TICK)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        loop.add_reader(self.pipe.fileno(), lambda: inbox.put_nowait(self.pipe.recv()))
        ticker = asyncio.create_task(self.lag_ticker())
        try:
            while True:
                cmd, args = await inbox.get()
                if cmd == "exit":
                    break
                try:
                    result = await self.handle(cmd, args)
                except Exception as exc:
                    self.reply("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                else:
                    self.reply("done", result)
        finally:
            ticker.cancel()
            self.closing = True
            for c in self.conns:
                c.close()
            await asyncio.sleep(0.05)

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "connect":
            return await self.connect(**args)
        if cmd == "publish":
            return await self.publish(**args)
        if cmd == "flood":
            return await self.flood(**args)
        if cmd == "collect":
            return self.collect(args.get("steps"))
        if cmd == "close":
            self.closing = True
            for c in self.conns:
                c.close()
            self.conns.clear()
            return {"closed": True}
        raise ValueError(f"unknown command {cmd}")

    async def open_one(
        self, url: str, dialect: str, name: str, room: str | None, setup_timeout: float
    ) -> WsConn:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        if dialect == "socketio":
            path = "/socket.io/?EIO=4&transport=websocket"
        else:
            query = f"{parts.query}&name={name}" if parts.query else f"name={name}"
            path = f"{parts.path or '/'}?{query}"
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: WsConn(self, f"{host}:{port}", path, dialect, name, room), host, port
            ),
            setup_timeout,
        )
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), setup_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def connect(
        self,
        url: str,
        dialect: str,
        count: int,
        prefix: str,
        rooms: list[str] | None = None,
        concurrency: int = 64,
        setup_timeout: float = 30.0,
        node_quota: dict[str, int] | None = None,
        max_attempts: int = 0,
        measure: bool = True,
    ) -> dict[str, Any]:
        """Open ``count`` connections (joined round-robin to ``rooms``).

        With ``node_quota`` ({node id: n}), connections landing on a node whose quota is
        full are closed and retried, so receivers sit on chosen worker processes.
        """
        sem = asyncio.Semaphore(concurrency)
        quota = dict(node_quota) if node_quota else None
        opened: list[WsConn] = []
        failures: list[str] = []
        attempts = 0
        limit = max_attempts or count * 20
        seq = 0
        last_progress = time.monotonic()

        async def one(i: int) -> None:
            nonlocal attempts, seq, last_progress
            room = rooms[i % len(rooms)] if rooms else None
            while attempts < limit:
                attempts += 1
                seq += 1
                name = f"{prefix}{self.index}x{seq}"
                async with sem:
                    try:
                        conn = await self.open_one(url, dialect, name, room, setup_timeout)
                    except (OSError, TimeoutError, ConnectionError) as exc:
                        if len(failures) < 5:
                            failures.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.05)
                        continue
                if quota is not None:
                    if quota.get(conn.node or "", 0) <= 0:
                        conn.close()
                        continue
                    quota[conn.node or ""] -= 1
                conn.measure = measure
                opened.append(conn)
                if time.monotonic() - last_progress > 0.25:
                    last_progress = time.monotonic()
                    self.reply("progress", len(opened))
                return

        await asyncio.gather(*(one(i) for i in range(count)))
        self.conns.extend(opened)
        nodes: dict[str, int] = {}
        for c in opened:
            nodes[c.node or ""] = nodes.get(c.node or "", 0) + 1
        return {
            "opened": len(opened),
            "attempts": attempts,
            "failures": failures,
            "nodes": nodes,
        }

    async def publish(
        self,
        step: int,
        rate: float,
        duration: float,
        size: int = 64,
        track_ack: bool = True,
    ) -> dict[str, Any]:
        """Send ``rate`` messages/s for ``duration`` s, spread round-robin over this
        worker's connections (one publisher, or every client in many-to-many)."""
        conns = [c for c in self.conns if not c.closed]
        if not conns:
            raise RuntimeError("no open connection to publish from")
        start = time.monotonic()
        n = 0
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            due = min(int(elapsed * rate) + 1, int(duration * rate))
            while n < due:
                c = conns[n % len(conns)]
                c.send_message(message_text(step, size), c.room or "bench", track_ack)
                n += 1
            if n >= int(duration * rate):
                break
            await asyncio.sleep(max(0.0, n / rate - (time.monotonic() - start)))
        await asyncio.sleep(max(0.0, duration - (time.monotonic() - start)))
        self.sent += n
        return {"sent": n, "elapsed": time.monotonic() - start}

    async def flood(self, duration: float, window: int, size: int = 64) -> dict[str, Any]:
        """Each connection keeps ``window`` sends in flight; the next goes on each ack."""
        deadline = time.monotonic() + duration
        sent = 0

        def next_send(c: WsConn) -> None:
            nonlocal sent
            if time.monotonic() < deadline:
                c.send_message(message_text(0, size), c.room or "bench", True)
                sent += 1

        self.acks = StepData()
        for c in self.conns:
            c.on_ack = next_send
            for _ in range(window):
                next_send(c)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        for c in self.conns:
            c.on_ack = None
        # Acks of the last window still count for latency, not for the rate.
        acked_in_time = self.acks.count
        await asyncio.sleep(1.0)
        return {
            "sent": sent,
            "acked": acked_in_time,
            "acks": encode_hist(self.acks.histogram()),
            "pending": sum(len(c.pending) for c in self.conns),
        }

    def collect(self, steps: Iterable[int] | None) -> dict[str, Any]:
        wanted = list(self.steps) if steps is None else list(steps)
        out: dict[str, Any] = {}
        for s in wanted:
            data = self.steps.pop(s, None) or StepData()
            out[str(s)] = {
                "count": data.count,
                "hist": encode_hist(data.histogram()),
                "max_per_receiver": max(data.per_conn.values(), default=0),
                "receivers_seen": len(data.per_conn),
            }
        acks = self.acks
        self.acks = StepData()
        cpu = os.times()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        lag, self.lag_max = self.lag_max, 0.0
        errors, self.errors = self.errors, []
        # Since the last report, like the rest: a pool outlives a server (fanout.py), and
        # one server's closes must not fail the next one's steps.
        closes, self.unexpected_closes = self.unexpected_closes, 0
        return {
            "steps": out,
            "acks": {"count": acks.count, "hist": encode_hist(acks.histogram())},
            "cpu": cpu.user + cpu.system,
            "wall": time.monotonic(),
            "lag_max": lag,
            "open": sum(1 for c in self.conns if not c.closed),
            "unexpected_closes": closes,
            "errors": errors,
            "error_count": self.error_count,
            "maxrss_kb": ru.ru_maxrss,
        }


def encode_hist(h: HdrHistogram) -> str:
    return h.encode().decode() if h.get_total_count() else ""


def decode_hist_into(target: HdrHistogram, encoded: str) -> None:
    if encoded:
        target.add(HdrHistogram.decode(encoded.encode()))


def worker_main(conn: Connection, index: int, cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_Worker(conn, index).run())


class WorkerError(RuntimeError):
    pass


class LoadPool:
    """Worker processes of the load generator, driven from the (synchronous) parent."""

    def __init__(self, count: int, cpus: list[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(count):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i, cpus), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)
        self.cpu_mark: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return len(self.pipes)

    def send(self, index: int, cmd: str, args: dict[str, Any] | None = None) -> None:
        self.pipes[index].send((cmd, args or {}))

    def wait(
        self,
        indices: Iterable[int],
        on_progress: Callable[[int, Any], None] | None = None,
        timeout: float = 600.0,
    ) -> list[Any]:
        from multiprocessing.connection import wait as mp_wait

        idx = list(indices)
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(idx):
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"load workers did not answer within {timeout:.0f} s")
            ready = mp_wait([self.pipes[i] for i in idx if i not in results], min(left, 0.2))
            for pipe in ready:
                i = self.pipes.index(pipe)  # type: ignore[arg-type]
                try:
                    kind, payload = pipe.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise WorkerError(f"load worker {i} died") from None
                if kind == "progress":
                    if on_progress:
                        on_progress(i, payload)
                elif kind == "error":
                    raise WorkerError(f"load worker {i}: {payload}")
                else:
                    results[i] = payload
            if on_progress:
                on_progress(-1, None)
        return [results[i] for i in idx]

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | list[dict[str, Any]] | None = None,
        indices: Iterable[int] | None = None,
        on_progress: Callable[[int, Any], None] | None = None,
        timeout: float = 600.0,
    ) -> list[Any]:
        idx = list(range(len(self))) if indices is None else list(indices)
        for n, i in enumerate(idx):
            self.send(i, cmd, args[n] if isinstance(args, list) else args)
        return self.wait(idx, on_progress, timeout)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("exit", {}))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)
