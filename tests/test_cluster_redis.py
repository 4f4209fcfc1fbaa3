"""The Redis engine (`RedisBus`) with a real ``redis-server``, nodes in one process.

Each node is a real `Node` with a memory store, its bus a `RedisBus` on a redis-server
this test starts on a free port in its temporary directory (persistence off, or AOF for
the restart test). Real time: Redis does not run on trio's clock. The heal fetch is
answered from the peers' stores (as in tests/test_cluster_inprocess.py); the HTTP fetch
is the multicast engine's (node/_peer_http.py), tested through real processes.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import coredis
import httpx
import msgspec
import pytest
import trio
from test_session import Recorder, open_session

from trio_chat.app._metrics import render_metrics
from trio_chat.node._cluster import RemoteMessage
from trio_chat.node._node import Node
from trio_chat.node._redis import PREFIX, RedisBus
from trio_chat.node._redis_diag import run_redis_check
from trio_chat.node._redis_stream import pack
from trio_chat.node._store import MemoryStore, Message, SqliteStore, Store
from trio_chat.protocol._ids import IdClock
from trio_chat.protocol._wire import Ack, Joined, MessageEvent, Presence

from _netns import metric
from _server_process import free_port
from conftest import Server, eventually, make_settings, start_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from trio_chat.server._session import Session

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs Debian's redis-server"
)

ROOM = "general"
SECRET = b"a cluster secret for the redis tests"
# Short, so that a dead node leaves within a test's patience.
TTL = 1.5
#: How long the restart test keeps Redis stopped (issue 13).
OUTAGE = 5.0


class RedisServer:
    """``redis-server`` on a free port in ``folder``, stopped and started at will."""

    def __init__(self, folder: Path, *, aof: bool, password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.aof = aof
        self.password = password
        #: More redis-server options (TLS ports and files).
        self.options: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else []
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + (persistence or ["--appendonly", "no"])
            + ["--dir", str(self.folder)]
            + (["--requirepass", self.password] if self.password else [])
            + self.options,
            stdout=subprocess.DEVNULL,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    # -NOAUTH: up, and wants a password.
                    if s.recv(100).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, aof=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_aof(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, aof=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class StoreBus(RedisBus):
    """The Redis bus, with the heal fetch answered from the peers' stores."""

    cluster: dict[str, ChatNode]
    name: str

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        await trio.lowlevel.checkpoint()
        peers = [n for n in self.cluster.values() if n.alive and n.name != self.name]
        peers.sort(key=lambda n: n.name != origin)
        for peer in peers:
            return peer.node.store.from_origin(origin, after, limit)
        return []


@dataclasses.dataclass
class ChatNode:
    name: str
    node: Node
    bus: StoreBus
    nursery: trio.Nursery
    scope: trio.CancelScope
    alive: bool = True

    async def client(self, name: str) -> tuple[Session, Recorder, trio.MemorySendChannel[str]]:
        return await open_session(self.nursery, self.node, name)

    def crash(self) -> None:
        """Stop dead: its key stays in Redis until it expires."""
        self.alive = False
        self.scope.cancel()


async def start_chat_node(
    nursery: trio.Nursery,
    url: str,
    cluster: dict[str, ChatNode],
    tmp_path: Path,
    name: str,
    *,
    store: Store | None = None,
    stream_max: int = 1000,
    prefix: str | None = None,
    **options: Any,
) -> ChatNode:
    settings = make_settings(tmp_path / name, ws_bind=None, rate_limit=0)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = store or MemoryStore()
    bus = StoreBus(
        url,
        node_id=name,
        incarnation=int(trio.current_time() * 1000),
        http_url=f"http://{name}",
        secret=SECRET,
        store=store,
        state_dir=settings.data_dir,
        stream_max=stream_max,
        prefix=prefix or f"test-{tmp_path.name}",
        presence_ttl=TTL,
        **options,
    )
    bus.cluster, bus.name = cluster, name
    node = Node(settings, name, store, bus)

    async def run(task_status: trio.TaskStatus[ChatNode]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(node.run)
                task_status.started(ChatNode(name, node, bus, inner, scope))
                await trio.sleep_forever()

    chat_node: ChatNode = await nursery.start(run)
    cluster[name] = chat_node
    return chat_node


async def all_up(nodes: list[ChatNode]) -> None:
    names = {n.name for n in nodes}
    await eventually(lambda: all(set(n.bus.peers()) == names - {n.name} for n in nodes))


def texts(recorder: Recorder) -> list[str]:
    return [e.text for e in recorder.events if isinstance(e, MessageEvent)]


async def join(send: trio.MemorySendChannel[str], recorder: Recorder) -> Joined:
    await send.send(json.dumps({"type": "join", "room": ROOM}))
    await eventually(lambda: any(isinstance(e, Joined) for e in recorder.events))
    return next(e for e in recorder.events if isinstance(e, Joined))


async def say(send: trio.MemorySendChannel[str], text: str) -> None:
    await send.send(json.dumps({"type": "send", "room": ROOM, "text": text, "cid": text}))


def acked(recorder: Recorder) -> set[str]:
    return {e.cid for e in recorder.events if isinstance(e, Ack) and e.cid}


def by_sender(recorder: Recorder) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for event in recorder.events:
        if isinstance(event, MessageEvent):
            seen[event.sender].append(event.text)
    return dict(seen)


async def test_every_message_reaches_every_node_once_in_per_sender_order(
    redis: RedisServer, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nodes = [
                await start_chat_node(nursery, redis.url, cluster, tmp_path, f"n{i}")
                for i in range(3)
            ]
            await all_up(nodes)
            clients = [await n.client(f"user{i}") for i, n in enumerate(nodes)]
            for _, recorder, send in clients:
                await join(send, recorder)
            for i in range(30):
                for k, (_, _, send) in enumerate(clients[:2]):
                    await say(send, f"u{k}-{i}")
            expected = {f"user{k}": [f"u{k}-{i}" for i in range(30)] for k in range(2)}
            for _, recorder, _ in clients:
                await eventually(lambda r=recorder: len(texts(r)) >= 60)
            # A second copy would come by the next read: wait for every node's reader to
            # be past everything sent.
            await eventually(lambda: all(n.bus.statistics()["redis_queued"] == 0 for n in nodes))
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    for node, (_, recorder, _) in zip(nodes, clients, strict=True):
        assert by_sender(recorder) == expected
        assert len(node.node.store.latest(ROOM, 100)) == 60
        assert node.node.statistics().duplicates == 0
        stats = node.bus.statistics()
        assert stats["redis_connected"] == 1
        assert stats["redis_heals"] == 0


async def test_presence_merges_and_a_silent_node_leaves_within_the_ttl(
    redis: RedisServer, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b, c = [
                await start_chat_node(nursery, redis.url, cluster, tmp_path, n) for n in "abc"
            ]
            await all_up([a, b, c])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            await eventually(lambda: sorted(c.node.members(ROOM)) == ["alice", "bob"])
            _, carol_rec, carol = await c.client("carol")
            members = (await join(carol, carol_rec)).members
            assert sorted(members) == ["alice", "bob", "carol"]
            await eventually(lambda: "carol" in a.node.members(ROOM))
            b.crash()
            crashed = trio.current_time()
            await eventually(lambda: Presence(room=ROOM, left="bob") in carol_rec.events)
            # Its key expires after TTL; the next heartbeat (TTL / 3) sees it gone.
            assert trio.current_time() - crashed < TTL + TTL / 3 + 1
            await eventually(lambda: Presence(room=ROOM, left="bob") in alice_rec.events)
            assert sorted(a.node.members(ROOM)) == ["alice", "carol"]
            nursery.cancel_scope.cancel()


async def test_messages_sent_while_redis_is_down_are_acked_and_arrive_once_after(
    redis_aof: RedisServer, tmp_path: Path
) -> None:
    """Redis stopped for `OUTAGE` s mid-stream (AOF on): every node chats on, then all
    three have every message once."""
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # a keeps 4 messages in memory (the rest come back from its store), b and c all.
            nodes = [
                await start_chat_node(nursery, redis_aof.url, cluster, tmp_path, "a", queue_max=4),
                await start_chat_node(nursery, redis_aof.url, cluster, tmp_path, "b"),
                await start_chat_node(nursery, redis_aof.url, cluster, tmp_path, "c"),
            ]
            await all_up(nodes)
            clients = [await n.client(f"u{n.name}") for n in nodes]
            (_, a_rec, a_send), (_, b_rec, b_send), (_, c_rec, c_send) = clients
            for _, rec, send in clients:
                await join(send, rec)
            await say(a_send, "before")
            await eventually(lambda: texts(b_rec) == texts(c_rec) == ["before"])
            # Mid-stream: c's burst is still being added when Redis stops.
            burst = [f"c-burst-{i}" for i in range(20)]
            for text in burst:
                await say(c_send, text)
            await eventually(lambda: bool(acked(c_rec)))
            redis_aof.stop()
            stopped = trio.current_time()
            await eventually(lambda: not any(n.bus.statistics()["redis_connected"] for n in nodes))
            down = [f"down-{i}" for i in range(10)]
            for text in down:
                await say(a_send, text)
                await say(b_send, "b-" + text)
                await say(c_send, "c-" + text)
            # Acked locally while Redis is away.
            await eventually(lambda: set(down) <= acked(a_rec))
            await eventually(lambda: {"b-" + t for t in down} <= acked(b_rec))
            await eventually(lambda: {"c-" + t for t in down} | set(burst) <= acked(c_rec))
            a_stats, b_stats = nodes[0].bus.statistics(), nodes[1].bus.statistics()
            assert (a_stats["redis_queued"], a_stats["redis_spilled"]) == (2, 8)
            assert (b_stats["redis_queued"], b_stats["redis_spilled"]) == (10, 0)
            # The outage itself, not a wait for something: Redis stays away this long.
            await trio.sleep_until(stopped + OUTAGE)
            redis_aof.start()
            await eventually(lambda: all(n.bus.statistics()["redis_connected"] for n in nodes))
            await eventually(lambda: all(len(texts(r)) == 51 for _, r, _ in clients))
            await eventually(lambda: all(n.bus.statistics()["redis_queued"] == 0 for n in nodes))
            # A second copy would come by the next read: let every reader pass the end.
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    expected = {
        "ua": ["before", *down],
        "ub": ["b-" + t for t in down],
        "uc": [*burst, *("c-" + t for t in down)],
    }
    for node, (_, rec, _) in zip(nodes, clients, strict=True):
        assert by_sender(rec) == expected
        # Once in each store too (a burst entry added twice, by a pipeline cut short by the
        # stop and sent again, is deduplicated by its id).
        assert len(node.node.store.latest(ROOM, 100)) == 51
        assert node.bus.statistics()["redis_reconnects"] >= 1


async def test_a_node_behind_the_trimmed_tail_heals_from_its_peers(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # MAXLEN ~ 10: Redis trims whole blocks of 100 entries, so 300 are enough.
            # One message an entry, as at a low rate (a burst would share entries).
            a = await start_chat_node(
                nursery, redis.url, cluster, tmp_path, "a", stream_max=10, write_batch=1
            )
            b = await start_chat_node(nursery, redis.url, cluster, tmp_path, "b", stream_max=10)
            await all_up([a, b])
            _, rec, send = await a.client("alice")
            await join(send, rec)
            await say(send, "first")
            await eventually(lambda: len(b.node.store.latest(ROOM, 10)) == 1)
            b_store = b.node.store
            assert isinstance(b_store, MemoryStore)
            b.crash()
            sent = [f"m{i}" for i in range(300)]
            for text in sent:
                await say(send, text)
            await eventually(lambda: set(sent) <= acked(rec))
            await eventually(lambda: a.bus.statistics()["redis_queued"] == 0)
            # Back, with its store and its stream position: the stream lost m0 and more.
            b = await start_chat_node(
                nursery, redis.url, cluster, tmp_path, "b", store=b_store, stream_max=10
            )
            await eventually(lambda: len(b_store.latest(ROOM, 1000)) == 301)
            await eventually(lambda: b.node.cluster.statistics()["gaps_healed"] >= 1)
            # The catch-up when b sees a again can heal it all before the trim check
            # (a round trip at connect) has counted.
            await eventually(lambda: b.bus.statistics()["redis_heals"] == 1)
            # What /metrics serves (the server's route renders exactly this).
            assert metric(render_metrics(b.node), "trio_chat_redis_heals") == 1
            nursery.cancel_scope.cancel()
    assert [m.text for m in b_store.latest(ROOM, 1000)] == ["first", *sent]
    assert "the Redis stream was trimmed past this node's position" in caplog.text


async def test_entries_that_are_not_ours_are_skipped_with_an_error(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever else writes to the stream, a node logs it, counts it and reads on."""
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a = await start_chat_node(nursery, redis.url, cluster, tmp_path, "a")
            b = await start_chat_node(nursery, redis.url, cluster, tmp_path, "b")
            await all_up([a, b])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            stream = f"test-{tmp_path.name}:messages"
            junk: list[dict[bytes, bytes]] = [
                {b"o": b"x", b"d": b"\xc1 not msgpack"},
                {b"no origin": b"at all"},
                {b"o": b"x", b"d": msgspec.msgpack.encode(7)},
                {b"o": b"\xff\xfe", b"d": msgspec.msgpack.encode([b"x"])},
            ]
            async with coredis.Redis.from_url(redis.url) as client:
                for fields in junk:
                    await client.xadd(stream, dict(fields))
            await say(alice, "after the junk")
            await eventually(lambda: texts(bob_rec) == ["after the junk"])
            stats = b.bus.statistics()
            assert (stats["redis_malformed"], stats["redis_reconnects"]) == (4, 0)
            nursery.cancel_scope.cancel()
    assert "skipped the malformed Redis stream entry" in caplog.text


async def test_what_one_read_brings_is_one_commit_in_order(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A peer's entry of 100 messages: one commit and one hub item here, not 100."""
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            b = await start_chat_node(nursery, redis.url, cluster, tmp_path, "b")
            _, bob_rec, bob = await b.client("bob")
            await join(bob, bob_rec)
            clock = IdClock("z")
            sent = [
                Message(id=clock.next_id(1000 + i), room=ROOM, sender="zoe", text=f"z{i}", ts=0.0)
                for i in range(100)
            ]
            payloads = [msgspec.msgpack.encode(RemoteMessage(m)) for m in sent]
            (fields,) = pack(b"z", payloads)
            commits = b.node.statistics().commits
            async with coredis.Redis.from_url(redis.url) as client:
                await client.xadd(f"test-{tmp_path.name}:messages", dict(fields))
            await eventually(lambda: len(texts(bob_rec)) == 100)
            assert b.node.statistics().commits == commits + 1
            nursery.cancel_scope.cancel()
    assert texts(bob_rec) == [m.text for m in sent]


class CountingStore(SqliteStore):
    """The SQLite store, counting the messages written through it."""

    written = 0

    def write(self, messages: list[Message]) -> dict[str, str]:
        self.written += len(messages)
        return super().write(messages)


async def test_a_worker_does_not_write_again_what_a_sibling_wrote_to_their_file(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Two workers of one host (``<host id>-<slot>``) share the SQLite file: what one
    committed and sent, the other broadcasts without a second write."""
    cluster: dict[str, ChatNode] = {}
    path = tmp_path / "history.sqlite3"
    stores = [CountingStore(path), CountingStore(path)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = [
                await start_chat_node(nursery, redis.url, cluster, tmp_path, f"h1-{i}", store=s)
                for i, s in enumerate(stores)
            ]
            await all_up([a, b])
            # Each caught up on the other first: a heal writes what it brings.
            await eventually(
                lambda: all(n.node.cluster.statistics()["gaps_healed"] >= 1 for n in (a, b))
            )
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            sent = [f"m{i}" for i in range(20)]
            for text in sent:
                await say(alice, text)
            await eventually(lambda: texts(bob_rec) == sent)
            nursery.cancel_scope.cancel()
    assert [store.written for store in stores] == [20, 0]
    assert [m.text for m in stores[1].latest(ROOM, 100)] == sent


async def redis_metric(server: Server, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(server.http_url + "/metrics")).text
    value = metric(text, f"trio_chat_redis_{name}")
    assert value is not None, text
    return value


async def test_a_server_serves_while_redis_is_unreachable_and_connects_when_it_comes(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_chat.cluster")
    redis = RedisServer(tmp_path, aof=False)
    url = f"redis://:pw-not-for-logs@127.0.0.1:{redis.port}/0"
    settings = make_settings(
        tmp_path, cluster="redis", redis_url=url, cluster_secret=SECRET, http_url="http://x"
    )
    server = await start_server(nursery, settings)
    async with httpx.AsyncClient() as client:
        assert (await client.get(server.http_url + "/metrics")).status_code == 200
    await eventually(lambda: "is unreachable" in caplog.text)
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    # Said once at WARNING; the retries at DEBUG.
    assert unreachable[0].levelno == logging.WARNING
    assert "TRIO_CHAT_REDIS_URL" in unreachable[0].getMessage()
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in unreachable[0].getMessage()
    assert await redis_metric(server, "connected") == 0
    # Every counter of the issue is there from the start, at zero while never connected.
    for name in ("stream_lag_ms", "queued", "spilled", "heals"):
        assert await redis_metric(server, name) == 0
    redis.password = "pw-not-for-logs"
    redis.start()
    try:
        await eventually(lambda: server.node.cluster.bus.statistics()["redis_connected"] == 1)
        assert await redis_metric(server, "connected") == 1
        assert await redis_metric(server, "reconnects") >= 1
    finally:
        redis.stop()
    assert "pw-not-for-logs" not in caplog.text


async def refused(
    nursery: trio.Nursery,
    tmp_path: Path,
    url: str,
    caplog: pytest.LogCaptureFixture,
    says: str,
) -> tuple[Server, str]:
    """A server in Redis mode on ``url``, once it logged the one ERROR that ``says`` it,
    naming TRIO_CHAT_REDIS_URL; and that line."""
    settings = make_settings(tmp_path, cluster="redis", redis_url=url, cluster_secret=SECRET)
    server = await start_server(nursery, settings)
    await eventually(lambda: says in caplog.text)
    (record,) = [r for r in caplog.records if says in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "TRIO_CHAT_REDIS_URL" in record.getMessage()
    return server, record.getMessage()


async def test_a_wrong_redis_password_is_a_clear_error_and_the_server_stays_up(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis = RedisServer(tmp_path, aof=False, password="the-right-one")
    redis.start()
    try:
        url = f"redis://:the-wrong-one@127.0.0.1:{redis.port}/0"
        server, _ = await refused(nursery, tmp_path, url, caplog, "refused the credentials")
        assert "the-wrong-one" not in caplog.text
        assert await redis_metric(server, "connected") == 0
    finally:
        redis.stop()


async def test_the_cluster_command_shows_the_redis_state(
    redis: RedisServer, tmp_path: Path
) -> None:
    out = io.StringIO()
    assert await run_redis_check(redis.url, out) == 1
    assert "no live node" in out.getvalue()
    cluster: dict[str, ChatNode] = {}
    async with trio.open_nursery() as nursery:
        node = await start_chat_node(nursery, redis.url, cluster, tmp_path, "n1", prefix=PREFIX)
        _, rec, send = await node.client("alice")
        await join(send, rec)
        await say(send, "hello")
        await eventually(lambda: node.bus.statistics()["redis_queued"] == 0 and bool(acked(rec)))
        out = io.StringIO()
        assert await run_redis_check(redis.url, out) == 0
        nursery.cancel_scope.cancel()
    report = out.getvalue()
    assert "connected; stream trio-chat:messages: 1 entries" in report
    assert "node n1: incarnation" in report
    assert "HTTP http://n1" in report
    unreachable = RedisServer(tmp_path, aof=False)
    out = io.StringIO()
    assert await run_redis_check(unreachable.url, out) == 2
    assert "unreachable" in out.getvalue()
    guarded = RedisServer(tmp_path / "guarded", aof=False, password="right")
    guarded.folder.mkdir()
    guarded.start()
    try:
        out = io.StringIO()
        url = f"redis://:wrong-pw@127.0.0.1:{guarded.port}/0"
        assert await run_redis_check(url, out) == 2
    finally:
        guarded.stop()
    assert "refused the credentials in TRIO_CHAT_REDIS_URL" in out.getvalue()
    assert "wrong-pw" not in out.getvalue()
