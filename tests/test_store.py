"""History: the two store engines, group commit, resume at the replay/live boundary,
idempotent retries, and bad history parameters.

The engine tests are synchronous and need no server. The rest run the real server
in-process on 127.0.0.1 (``start_server`` from conftest) with trio-websocket clients.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_chat.node._store import MemoryStore, Message, SqliteStore, Store
from trio_chat.protocol._ids import IdClock

from conftest import make_settings, start_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Client, Server

ROOM: Final = "general"


# --------------------------------------------------------------------------- engines


def _open(kind: str, folder: Path) -> Store:
    return SqliteStore(folder / "history.sqlite3") if kind == "sqlite" else MemoryStore()


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = _open(request.param, tmp_path)
    yield opened
    opened.close()


def _messages(
    n: int, room: str = ROOM, node: str = "abc123-0", start_ms: int = 1000
) -> list[Message]:
    clock = IdClock(node)
    return [
        Message(
            id=clock.next_id(start_ms + i // 3),
            room=room,
            sender="alice",
            text=f"m{i}",
            ts=float(i),
        )
        for i in range(n)
    ]


def _ids(messages: list[Message]) -> list[str]:
    return [m.id for m in messages]


def test_write_is_idempotent(store: Store) -> None:
    msgs = _messages(5)
    store.write(msgs[:3])
    store.write([msgs[1], msgs[1], *msgs[2:]])  # twice in one batch, again in a later one
    same_id = Message(id=msgs[0].id, room=ROOM, sender="mallory", text="other", ts=9.0)
    store.write([same_id])
    assert store.latest(ROOM, 100) == msgs


def test_latest_after_before_order_and_bounds(store: Store) -> None:
    msgs = _messages(10)
    others = _messages(10, room="random", node="def456-0")
    shuffled = msgs + others
    random.Random(0).shuffle(shuffled)
    for i in range(0, len(shuffled), 4):
        store.write(shuffled[i : i + 4])
    ids = _ids(msgs)
    assert _ids(store.latest(ROOM, 3)) == ids[-3:]
    assert _ids(store.latest(ROOM, 100)) == ids
    assert store.latest("empty", 10) == []
    assert _ids(store.after(ROOM, ids[2], 3)) == ids[3:6]
    assert _ids(store.after(ROOM, ids[2], 100)) == ids[3:]
    assert store.after(ROOM, ids[-1], 10) == []
    assert _ids(store.after(ROOM, "0", 100)) == ids
    assert _ids(store.before(ROOM, ids[5], 2)) == ids[3:5]
    assert _ids(store.before(ROOM, ids[5], 100)) == ids[:5]
    assert store.before(ROOM, ids[0], 10) == []
    assert store.before(ROOM, None, 4) == store.latest(ROOM, 4)
    # an id between two stored ones bounds the same way
    between = ids[4][:-1] + "~"
    assert _ids(store.after(ROOM, between, 2)) == ids[5:7]
    assert _ids(store.before(ROOM, between, 2)) == ids[3:5]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_latest_with_limit_zero_is_empty(kind: str, tmp_path: Path) -> None:
    """``TRIO_CHAT_HISTORY_ON_JOIN=0`` is a valid setting: a join then replays nothing."""
    store = _open(kind, tmp_path)
    try:
        store.write(_messages(3))
        assert store.latest(ROOM, 0) == []
    finally:
        store.close()


def test_contains(store: Store) -> None:
    msgs = _messages(3)
    other = _messages(1, room="random", node="def456-0")
    store.write(msgs + other)
    assert store.contains(ROOM, msgs[1].id)
    assert not store.contains(ROOM, other[0].id)  # stored, but in another room
    assert not store.contains(ROOM, msgs[1].id[:-1] + "x")
    assert not store.contains("random", msgs[1].id)


def test_a_taken_dedupe_key_is_reported_not_stored(store: Store) -> None:
    def sent(n: int, dedupe: str) -> Message:
        return Message(
            id=f"{n:016x}-n-0",
            room=ROOM,
            sender="a",
            text=f"t{n}",
            ts=float(n),
            cid="c",
            dedupe=dedupe,
        )

    first, retry, other = sent(1, "alice\0c"), sent(2, "alice\0c"), sent(3, "bob\0c")
    assert store.write([first]) == {}
    # a retry in a later transaction, and one in the same transaction as its first
    assert store.write([retry, other]) == {retry.id: first.id}
    again = sent(4, "carol\0c")
    assert store.write([again, sent(5, "carol\0c")]) == {sent(5, "carol\0c").id: again.id}
    assert [m.id for m in store.latest(ROOM, 10)] == [first.id, other.id, again.id]
    assert store.write([first]) == {}  # the same message again (a cluster repeat) is no retry


def test_from_origin(store: Store) -> None:
    mine = _messages(6, node="aaa-0") + _messages(4, room="random", node="aaa-0", start_ms=2000)
    theirs = _messages(5, node="bbb-0")
    store.write(theirs + mine)
    expected = sorted(_ids(mine))
    assert _ids(store.from_origin("aaa-0", "", 100)) == expected
    assert _ids(store.from_origin("aaa-0", expected[3], 4)) == expected[4:8]
    assert _ids(store.from_origin("bbb-0", "", 2)) == _ids(theirs)[:2]
    assert store.from_origin("ccc-0", "", 10) == []
    assert mine[0].origin == "aaa-0"


def test_sqlite_file_survives_reopen(tmp_path: Path) -> None:
    msgs = _messages(20)
    first = SqliteStore(tmp_path / "h.sqlite3")
    first.write(msgs[:15])
    first.close()
    again = SqliteStore(tmp_path / "h.sqlite3")
    try:
        again.write(msgs[10:])  # overlaps what is already there
        assert again.latest(ROOM, 100) == msgs
    finally:
        again.close()


def test_a_file_from_before_uid_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(
            "CREATE TABLE messages (id TEXT PRIMARY KEY, room TEXT NOT NULL,"
            " sender TEXT NOT NULL, text TEXT NOT NULL, ts REAL NOT NULL, cid TEXT,"
            " dedupe TEXT, origin TEXT NOT NULL) WITHOUT ROWID;"
            "INSERT INTO messages VALUES ('0000000000000001-n1', 'r', 'ann', 'old', 1.0,"
            " NULL, NULL, 'n1');"
        )
    store = SqliteStore(path)
    try:
        new = Message(id="0000000000000002-n1", room="r", sender="Bo", text="new", ts=2.0, uid="b")
        store.write([new])
        assert [(m.text, m.uid) for m in store.latest("r", 10)] == [("old", None), ("new", "b")]
        # The same step gave the file its tombstones table.
        assert store.tombstone("r", "0000000000000001-n1")
    finally:
        store.close()
    reopened = SqliteStore(path)  # a migrated file opens as it is
    try:
        assert reopened.latest("r", 10)[1] == new
        assert [m.deleted for m in reopened.latest("r", 10)] == [True, False]
    finally:
        reopened.close()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_deleted_message_keeps_its_uid(kind: str, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3") if kind == "sqlite" else MemoryStore()
    message = Message(id="0000000000000001-n", room=ROOM, sender="a", text="t", ts=0.0, uid="u")
    try:
        store.write([message])
        assert store.tombstone(ROOM, message.id)
        (read,) = store.latest(ROOM, 5)
        assert (read.deleted, read.text, read.uid) == (True, "", "u")
        assert msgspec.json.decode(msgspec.json.encode(read.event())) == {
            "type": "message",
            "room": ROOM,
            "id": message.id,
            "from": "a",
            "ts": 0.0,
            "uid": "u",
            "deleted": True,
        }
    finally:
        store.close()


def test_peers_of_older_versions_decode_a_message_and_are_decoded() -> None:
    # Peers get a Message as an array: fields added later are last, with defaults.
    full = Message(
        id="0000000000000001-n", room=ROOM, sender="a", text="t", ts=0.0, deleted=True, uid="u"
    )
    as_list = msgspec.json.decode(msgspec.json.encode(full))
    assert as_list[-2:] == [True, "u"]
    before_uid = msgspec.json.encode(as_list[:-1])
    assert msgspec.json.decode(before_uid, type=Message) == msgspec.structs.replace(full, uid=None)
    before_both = msgspec.json.encode(as_list[:-2])
    assert msgspec.json.decode(before_both, type=Message) == msgspec.structs.replace(
        full, uid=None, deleted=False
    )


def test_two_sqlite_stores_share_one_file(tmp_path: Path) -> None:
    """Workers of one host persist every message they see into one file."""
    a, b = SqliteStore(tmp_path / "h.sqlite3"), SqliteStore(tmp_path / "h.sqlite3")
    try:
        msgs = _messages(6)
        a.write(msgs[:4])
        b.write(msgs[2:])
        assert a.latest(ROOM, 100) == b.latest(ROOM, 100) == msgs
    finally:
        a.close()
        b.close()


_operations = st.lists(
    st.tuples(st.integers(0, 39), st.sampled_from(["general", "random"]), st.integers(0, 2)),
    max_size=40,
)


@given(
    batches=st.lists(_operations, max_size=5), probe=st.integers(0, 40), limit=st.integers(1, 50)
)
def test_engines_agree(batches: list[list[tuple[int, str, int]]], probe: int, limit: int) -> None:
    """Any sequence of writes (duplicates, rooms, origins mixed) reads back the same."""
    ids = [f"{1000 + i:016x}-n{n}" for i in range(40) for n in range(3)]

    def message(i: int, room: str, node: int) -> Message:
        return Message(
            id=f"{1000 + i:016x}-n{node}", room=room, sender="s", text=str(i), ts=float(i)
        )

    with tempfile.TemporaryDirectory() as folder:
        engines = [SqliteStore(Path(folder) / "h.sqlite3"), MemoryStore()]
        try:
            for batch in batches:
                for engine in engines:
                    engine.write([message(*op) for op in batch])
            probe_id = ids[min(probe * 3, len(ids) - 1)]
            sql, mem = engines

            def same(fn: str, *args: Any) -> None:
                assert getattr(sql, fn)(*args) == getattr(mem, fn)(*args), (fn, args)

            for room in ("general", "random"):
                same("latest", room, limit)
                same("after", room, probe_id, limit)
                same("before", room, probe_id, limit)
                same("before", room, None, limit)
                same("contains", room, probe_id)
            same("from_origin", "n1", probe_id, limit)
        finally:
            for engine in engines:
                engine.close()


# --------------------------------------------------------------------------- the server


@pytest.fixture
async def fast_server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    """A server without rate limiting: tests here send as fast as they can."""
    return await start_server(nursery, make_settings(tmp_path, rate_limit=0.0))


async def _acks(client: Client, count: int) -> list[dict[str, Any]]:
    acks = []
    while len(acks) < count:
        acks.append(await client.next_of("ack"))
    return acks


async def test_group_commit_many_concurrent_senders(fast_server: Server, connect: Any) -> None:
    senders, each = 50, 20
    acked: dict[str, str] = {}

    async def sender(i: int, ready: trio.Event, go: trio.Event) -> None:
        async with connect(fast_server.chat_socket_url, f"s{i}") as client:
            await client.join(f"room{i}")
            ready.set()
            await go.wait()
            for n in range(each):
                await client.send(type="send", room=f"room{i}", text=f"{i}:{n}", cid=f"{i}-{n}")
            for ack in await _acks(client, each):
                acked[ack["cid"]] = ack["id"]

    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(senders):
            ready = trio.Event()
            nursery.start_soon(sender, i, ready, go)
            await ready.wait()
        go.set()
    stats = fast_server.node.statistics()
    total = senders * each
    assert len(acked) == total
    assert len(set(acked.values())) == total
    assert stats.committed == total
    assert stats.commits < stats.committed
    store = fast_server.node.store
    assert sum(len(store.latest(f"room{i}", 200)) for i in range(senders)) == total


async def test_resume_at_many_points_while_a_publisher_sends(
    fast_server: Server, connect: Any
) -> None:
    """Every message after ``since`` exactly once, in order: replay and live joined.

    Each of 100 joins reads on until 30 messages past its ``since`` (the boundary is in
    the first few): a duplicate at the boundary shows up in some joins, not in every one.
    """
    total, joins, spacing, reach = 600, 100, 5, 30
    url = fast_server.chat_socket_url
    acked: list[str] = []
    progress = trio.Condition()

    async def publisher() -> None:
        async with connect(url, "pub") as pub:
            await pub.join(ROOM)
            # Many messages in flight: commits of several messages each keep happening
            # (and fanning out) while clients join.
            window = trio.Semaphore(64)

            async def read_acks() -> None:
                while len(acked) < total:
                    ack = await pub.next_of("ack")
                    acked.append(ack["id"])
                    window.release()
                    async with progress:
                        progress.notify_all()

            async with trio.open_nursery() as inner:
                inner.start_soon(read_acks)
                for n in range(total):
                    await window.acquire()
                    await pub.send(type="send", room=ROOM, text=f"m{n}", cid=f"c{n}")

    async def resumer(j: int, since: str) -> None:
        last_text = f"m{min(acked.index(since) + reach, total - 1)}"
        async with connect(url, f"r{j}") as client:
            replay, _ = await client.join(ROOM, since=since)
            got = [m["id"] for m in replay]
            texts = [m["text"] for m in replay]
            while last_text not in texts:
                event = await client.next_of("message")
                got.append(event["id"])
                texts.append(event["text"])
            results[j] = (since, got)

    results: dict[int, tuple[str, list[str]]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        for j in range(joins):
            async with progress:
                while len(acked) < 10 + j * spacing:
                    await progress.wait()
            # the newest acked id, or one a few messages back
            since = acked[-1 - (j % 4) * 3]
            nursery.start_soon(resumer, j, since)
    assert acked == sorted(acked)
    assert len(results) == joins
    for j, (since, got) in sorted(results.items()):
        start = acked.index(since) + 1
        distinct = list(dict.fromkeys(got))
        # the replay alone may reach past ``reach``: whatever was committed by then
        assert len(distinct) >= min(reach, total - start), j
        assert distinct == acked[start : start + len(distinct)], j
        assert got == distinct, (j, [i for i in got if got.count(i) > 1])


#: Retry secrets (``?client_id=``) of the users in the cid tests.
ALICE_ID = "alice-secret-0123456789"
MALLORY_ID = "mallory-secret-0123456"


async def test_cid_retry_after_ack_across_reconnect(fast_server: Server, connect: Any) -> None:
    url = fast_server.chat_socket_url
    async with connect(url, "alice", client_id=ALICE_ID) as alice:
        await alice.join(ROOM)
        first = await alice.chat(ROOM, "hello", cid="c-1")
        assert "duplicate" not in first
    async with (
        connect(url, "alice", client_id=ALICE_ID) as alice,
        connect(url, "bob") as bob,
    ):
        await alice.join(ROOM)
        await bob.join(ROOM)
        await alice.send(type="send", room=ROOM, text="hello", cid="c-1")
        retry = await alice.next_of("ack")
        assert retry == {"type": "ack", "cid": "c-1", "id": first["id"], "duplicate": True}
        # not broadcast again: the next message bob sees is the next one sent
        await alice.chat(ROOM, "next", cid="c-2")
        event = await bob.next_of("message")
        assert event["text"] == "next"
    async with connect(url, "bob") as bob:  # another client, the same cid: a new message
        await bob.join(ROOM)
        other = await bob.chat(ROOM, "hello", cid="c-1")
        assert other["id"] != first["id"]
        assert "duplicate" not in other
    stored = fast_server.node.store.latest(ROOM, 100)
    assert [(m.sender, m.cid) for m in stored] == [
        ("alice", "c-1"),
        ("alice", "c-2"),
        ("bob", "c-1"),
    ]
    assert fast_server.node.statistics().duplicates == 1


@pytest.mark.parametrize("mallory_id", [None, MALLORY_ID])
async def test_a_cid_sent_first_under_someone_elses_name_takes_nothing_from_them(
    fast_server: Server, transport: str, connect: Any, mallory_id: str | None
) -> None:
    """Retries were keyed by name: whoever asked for "alice" first owned her cids."""
    url = fast_server.url(transport)
    async with connect(url, "alice", client_id=mallory_id) as mallory:
        await mallory.join(ROOM)
        squatted = await mallory.chat(ROOM, "not from alice", cid="c-7")
    async with connect(url, "alice", client_id=ALICE_ID) as alice:
        await alice.join(ROOM)
        mine = await alice.chat(ROOM, "from alice", cid="c-7")
        assert "duplicate" not in mine
        assert mine["id"] != squatted["id"]
        # and her own retry still dedupes
        await alice.send(type="send", room=ROOM, text="from alice", cid="c-7")
        assert (await alice.next_of("ack"))["duplicate"] is True
    stored = fast_server.node.store.latest(ROOM, 100)
    assert [(m.text, m.cid) for m in stored] == [("not from alice", "c-7"), ("from alice", "c-7")]
    # the secret is not kept: the store has a digest of it
    assert all(ALICE_ID not in (m.dedupe or "") for m in stored)


async def test_without_a_client_id_cids_dedupe_within_the_connection(
    fast_server: Server, connect: Any
) -> None:
    url = fast_server.chat_socket_url
    async with connect(url, "alice") as alice:
        await alice.join(ROOM)
        first = await alice.chat(ROOM, "hello", cid="c-1")
        assert (await alice.chat(ROOM, "hello", cid="c-1"))["duplicate"] is True
    async with connect(url, "alice") as alice:
        await alice.join(ROOM)
        again = await alice.chat(ROOM, "hello", cid="c-1")
        assert "duplicate" not in again
        assert again["id"] != first["id"]


@pytest.mark.parametrize(
    "client_id", ["short", "x" * 65, "has space in it!!", "ünïcödé-0123456789"]
)
async def test_a_bad_client_id_is_refused_and_the_connection_keeps_a_key_of_its_own(
    fast_server: Server, transport: str, connect: Any, client_id: str
) -> None:
    url = fast_server.url(transport)
    async with connect(url, "alice", client_id=client_id) as alice:
        await alice.expect("error", code="bad_client_id")
        await alice.join(ROOM)
        await alice.chat(ROOM, "hello", cid="c-1")
        assert (await alice.chat(ROOM, "hello", cid="c-1"))["duplicate"] is True
    async with connect(url, "alice", client_id=client_id) as alice:
        await alice.expect("error", code="bad_client_id")
        await alice.join(ROOM)
        assert "duplicate" not in await alice.chat(ROOM, "hello", cid="c-1")
    assert fast_server.node.statistics().errors["bad_client_id"] == 2


async def test_cid_retry_before_ack_across_reconnect(fast_server: Server, connect: Any) -> None:
    """The first send's connection is gone before its ack: the retry is stored once."""
    url = fast_server.chat_socket_url
    async with connect(url, "alice", client_id=ALICE_ID) as first:
        await first.join(ROOM)
        for n in range(20):
            await first.send(type="send", room=ROOM, text=f"t{n}", cid=f"c-{n}")
        # leave without reading a single ack
    async with connect(url, "alice", client_id=ALICE_ID) as alice:
        await alice.join(ROOM)
        acks = {}
        for n in range(20):
            await alice.send(type="send", room=ROOM, text=f"t{n}", cid=f"c-{n}")
        for ack in await _acks(alice, 20):
            acks[ack["cid"]] = ack["id"]
    stored = fast_server.node.store.latest(ROOM, 100)
    assert sorted(m.cid for m in stored if m.cid) == sorted(acks)
    assert {m.cid: m.id for m in stored} == acks


async def test_cid_retry_while_the_first_is_in_flight(fast_server: Server, connect: Any) -> None:
    """Connections of one client (an old one not yet gone) race the same cids: one id each."""
    url = fast_server.chat_socket_url
    rounds = 10
    acks: dict[str, set[str]] = {f"race-{n}": set() for n in range(rounds)}
    async with (
        connect(url, "alice", client_id=ALICE_ID) as a1,
        connect(url, "alice", client_id=ALICE_ID) as a2,
        connect(url, "alice", client_id=ALICE_ID) as a3,
    ):
        clients = [a1, a2, a3]
        for client in clients:
            await client.join(ROOM)
        for n in range(rounds):
            for client in clients:
                await client.send(type="send", room=ROOM, text="once", cid=f"race-{n}")
        for client in clients:
            for ack in await _acks(client, rounds):
                acks[ack["cid"]].add(ack["id"])
    stored = fast_server.node.store.latest(ROOM, 100)
    assert len(stored) == rounds
    assert all(len(ids) == 1 for ids in acks.values()), acks


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ({"type": "join", "room": ROOM, "since": "nonsense"}, "bad_id"),
        ({"type": "join", "room": ROOM, "since": ""}, "bad_id"),
        ({"type": "join", "room": ROOM, "since": 12}, "bad_id"),
        ({"type": "join", "room": ROOM, "since": "0000000000000001-" + "x" * 41}, "bad_id"),
        ({"type": "history", "room": ROOM, "before": "0000000000000001"}, "bad_id"),
        ({"type": "history", "room": ROOM, "before": "ZZZZZZZZZZZZZZZZ-n"}, "bad_id"),
        ({"type": "history", "room": ROOM, "before": "0000000000000001-nobody"}, "unknown_id"),
        ({"type": "history", "room": ROOM, "limit": 10**12}, "bad_limit"),
        ({"type": "history", "room": ROOM, "limit": 201}, "bad_limit"),
        ({"type": "history", "room": ROOM, "limit": 0}, "bad_limit"),
        ({"type": "history", "room": ROOM, "limit": -5}, "bad_limit"),
        ({"type": "history", "room": ROOM, "limit": "10"}, "bad_limit"),
        ({"type": "history", "room": ROOM, "limit": 1.5}, "bad_limit"),
    ],
)
async def test_bad_history_parameters(
    fast_server: Server, connect: Any, command: dict[str, Any], code: str
) -> None:
    async with connect(fast_server.chat_socket_url, "alice") as alice:
        await alice.send(**command)
        error = await alice.expect("error", code=code)
        assert error["message"]
        await alice.send(type="ping")
        await alice.expect("pong")


async def _join_after_reset(client: Client, since: str) -> tuple[bool, list[str]]:
    """Join with ``since``; whether ``reset`` came first, and the replayed ids."""
    await client.send(type="join", room=ROOM, since=since)
    event = await client.recv()
    reset = event["type"] == "reset"
    if reset:
        assert event["room"] == ROOM
        event = await client.recv()
    replayed = []
    while event["type"] == "message":
        replayed.append(event["id"])
        event = await client.recv()
    assert event["type"] == "joined", event
    return reset, replayed


async def test_unknown_or_too_old_since_resets_then_sends_the_latest(
    tmp_path: Path, nursery: trio.Nursery, connect: Any
) -> None:
    settings = make_settings(tmp_path, rate_limit=0.0, history_on_join=5, resume_max=3)
    server = await start_server(nursery, settings)
    url = server.chat_socket_url
    async with connect(url, "alice") as alice:
        await alice.join(ROOM)
        ids = [(await alice.chat(ROOM, f"m{n}"))["id"] for n in range(8)]
        await alice.join("random")
        elsewhere = (await alice.chat("random", "x"))["id"]
    unknown = ["0000000000000001-nobody", ids[0][:-1] + "z", elsewhere, ids[3]]
    for since in unknown:
        async with connect(url, "bob") as bob:
            assert await _join_after_reset(bob, since) == (True, ids[-5:]), since
    async with connect(url, "bob") as bob:  # exactly at the bound: no reset
        assert await _join_after_reset(bob, ids[4]) == (False, ids[5:])
    async with connect(url, "bob") as bob:
        assert await _join_after_reset(bob, ids[-1]) == (False, [])


async def test_http_history_pages_and_bad_parameters(fast_server: Server, connect: Any) -> None:
    async with connect(fast_server.chat_socket_url, "alice") as alice:
        await alice.join(ROOM)
        ids = [(await alice.chat(ROOM, f"m{n}"))["id"] for n in range(7)]
    api = f"{fast_server.http_url}/api/rooms/{ROOM}/messages"
    async with httpx.AsyncClient() as http:

        async def page(**params: Any) -> tuple[list[str], bool]:
            resp = await http.get(api, params=params)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            return [m["id"] for m in body["messages"]], body["more"]

        assert await page(limit=3) == (ids[4:], True)
        assert await page(limit=3, before=ids[4]) == (ids[1:4], True)
        assert await page(limit=3, before=ids[1]) == (ids[:1], False)
        assert await page(limit=200) == (ids, False)
        assert await page() == (ids, False)
        bad = [
            ({"before": "xyz"}, 400, "bad_id"),
            ({"before": ids[0][:16]}, 400, "bad_id"),
            ({"limit": "abc"}, 400, "bad_limit"),
            ({"limit": 0}, 400, "bad_limit"),
            ({"limit": 201}, 400, "bad_limit"),
            ({"limit": 10**30}, 400, "bad_limit"),
            ({"limit": -1}, 400, "bad_limit"),
            ({"before": "0000000000000001-nobody"}, 404, "unknown_id"),
        ]
        for params, status, code in bad:
            resp = await http.get(api, params=params)
            assert (resp.status_code, resp.json()["code"]) == (status, code), params
            assert resp.json()["message"]
        resp = await http.get(f"{fast_server.http_url}/api/rooms/no%20spaces/messages")
        assert (resp.status_code, resp.json()["code"]) == (400, "bad_room")
        # the server is still fine
        assert (await http.get(f"{fast_server.http_url}/healthz")).status_code == 200
