"""Session logic without sockets: a node in-process, a transport that records frames."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from trio_chat._errors import StoreError
from trio_chat.node._node import Node
from trio_chat.node._store import MemoryStore, Message, SqliteStore
from trio_chat.protocol._codes import CLOSE_POLICY
from trio_chat.protocol._wire import (
    ErrorEvent,
    Joined,
    MessageEvent,
    Pong,
    Presence,
    decode_events,
    store_unavailable,
)
from trio_chat.server._limits import TokenBucket
from trio_chat.server._session import Session

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_chat.server._hub import Outgoing

from conftest import eventually, make_settings


class Recorder:
    remote = "test"

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.closed: int | None = None
        #: Replies wait for this, as for a client that reads (open) or does not (closed).
        self.reading = trio.Event()
        self.reading.set()

    def send_payload_nowait(self, payload: bytes) -> None:
        self.events.extend(decode_events(payload))

    def deliver_nowait(self, out: Outgoing) -> None:
        self.events.extend(decode_events(out.payload))

    async def send_reply(self, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        await self.reading.wait()
        if self.closed is None:
            self.events.extend(decode_events(payload))

    def close_nowait(self, code: int, reason: str) -> None:
        self.closed = code
        # as the real transports do: a reply waiting for the client is dropped
        self.reading.set()

    @contextlib.asynccontextmanager
    async def cancel_on_close(self) -> AsyncIterator[None]:
        yield


async def start_node(nursery: trio.Nursery, tmp_path: Path, **settings: Any) -> Node:
    node = Node(make_settings(tmp_path, ws_bind=None, **settings), "n1", MemoryStore())
    await nursery.start(node.run)
    return node


async def open_session(
    nursery: trio.Nursery, node: Node, name: str, client_id: str | None = None
) -> tuple[Session, Recorder, trio.MemorySendChannel[str]]:
    transport = Recorder()
    session = Session(node, transport, name, client_id)
    send, receive = trio.open_memory_channel[str](10)

    async def read() -> list[str]:
        return [await receive.receive()]

    async def serve() -> None:
        # the end of the channel stands for the connection closing
        with contextlib.suppress(trio.EndOfChannel):
            await session.run(read)

    nursery.start_soon(serve)
    return session, transport, send


async def test_a_message_in_history_and_still_in_the_hub_arrives_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path)
    # Committed, but not yet through the hub when the client reads history: the commit
    # task's state between its write and its publish.
    message = Message(
        id=node.ids.next_id(int(time.time() * 1000)), room="r", sender="x", text="hi", ts=0.0
    )
    node.store.write([message])
    _, alice, commands = await open_session(nursery, node, "alice")
    await commands.send(encode_event_text({"type": "join", "room": "r"}))
    await trio.testing.wait_all_tasks_blocked()
    await node.hub.publish("r", message.event())
    await trio.testing.wait_all_tasks_blocked()
    texts = [e.text for e in alice.events if getattr(e, "text", None)]
    assert texts == ["hi"]
    # and the next live message is not filtered
    later = Message(
        id=node.ids.next_id(int(time.time() * 1000)), room="r", sender="x", text="later", ts=0.0
    )
    await node.hub.publish("r", later.event())
    await node.hub.publish("r", message.event())  # a replayed id after live traffic: passes
    await trio.testing.wait_all_tasks_blocked()
    assert [e.text for e in alice.events if getattr(e, "text", None)] == ["hi", "later", "hi"]


def encode_event_text(command: dict[str, Any]) -> str:
    return json.dumps(command)


async def test_a_session_that_ends_leaves_nothing_behind(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path)
    session, _, commands = await open_session(nursery, node, "alice")
    _, bob, bob_commands = await open_session(nursery, node, "bob")
    for sender in (commands, bob_commands):
        await sender.send(encode_event_text({"type": "join", "room": "r"}))
    await trio.testing.wait_all_tasks_blocked()
    assert node.hub.statistics().subscriptions == 2
    await commands.aclose()  # alice's connection ends
    await trio.testing.wait_all_tasks_blocked()
    assert node.hub.statistics().subscriptions == 1
    assert session not in node.sessions
    assert bob.events[-1] == Presence(room="r", left="alice")


def stored(node: Node, room: str, *texts: str) -> list[Message]:
    now = int(time.time() * 1000)
    messages = [
        Message(id=node.ids.next_id(now), room=room, sender="x", text=text, ts=0.0)
        for text in texts
    ]
    node.store.write(messages)
    return messages


async def test_broadcasts_wait_until_a_slowly_read_replay_is_out(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path)
    first, *_ = stored(node, "r", "one", "two", "three")
    _, alice, commands = await open_session(nursery, node, "alice")
    alice.reading = trio.Event()  # alice's client reads nothing for now
    await commands.send(encode_event_text({"type": "join", "room": "r", "since": first.id}))
    await trio.testing.wait_all_tasks_blocked()
    live = Message(
        id=node.ids.next_id(int(time.time() * 1000)), room="r", sender="x", text="live", ts=0.0
    )
    await node.hub.publish("r", live.event())
    await trio.testing.wait_all_tasks_blocked()
    assert [type(e).__name__ for e in alice.events] == ["Welcome"]
    alice.reading.set()
    await trio.testing.wait_all_tasks_blocked()
    kinds = [getattr(e, "text", type(e).__name__) for e in alice.events]
    assert kinds == ["Welcome", "two", "three", "Joined", "live"]
    assert alice.closed is None


async def test_broadcasts_held_past_the_backlog_close_the_client_as_slow(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_node(nursery, tmp_path, backlog=1000)
    first, *_ = stored(node, "r", "one", "two")
    session, alice, commands = await open_session(nursery, node, "alice")
    alice.reading = trio.Event()  # alice's client never reads
    await commands.send(encode_event_text({"type": "join", "room": "r", "since": first.id}))
    await trio.testing.wait_all_tasks_blocked()
    for i in range(20):
        await node.hub.publish("r", Presence(room="r", joined=f"someone-{i:02d}" + "x" * 40))
        await trio.testing.wait_all_tasks_blocked()
    assert alice.closed == 4008
    assert node.statistics().slow_disconnects == 1
    # the session ended and left the room
    assert session not in node.sessions
    assert node.hub.statistics().subscriptions == 0


def test_token_bucket_counts_exactly() -> None:
    now = [100.0]
    # binary fractions of a second, so the float arithmetic is exact
    bucket = TokenBucket(8, 20, lambda: now[0])
    assert [bucket.take() for _ in range(21)] == [True] * 20 + [False]
    now[0] += 0.4375  # 3.5 tokens
    assert [bucket.take() for _ in range(4)] == [True] * 3 + [False]
    now[0] += 0.0625  # the half token left, and half another
    assert bucket.take()
    assert not bucket.take()
    now[0] += 1000  # refills to the burst, no further
    assert sum(bucket.take() for _ in range(30)) == 20
    unlimited = TokenBucket(0, 1, lambda: now[0])
    assert all(unlimited.take() for _ in range(1000))


async def test_invalid_frames_count_against_the_rate_limit_and_the_strikes(
    nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    node = await start_node(nursery, tmp_path)  # 10 frames/s, burst 20, 20 strikes
    _, alice, commands = await open_session(nursery, node, "alice")
    await trio.testing.wait_all_tasks_blocked()  # the welcome

    async def send(frames: list[str]) -> list[str]:
        alice.events.clear()
        for frame in frames:
            await commands.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        return [e.code if isinstance(e, ErrorEvent) else type(e).__name__ for e in alice.events]

    assert await send(["{not json"] * 25) == ["bad_json"] * 20 + ["rate_limited"] * 5
    mock_clock.jump(0.5)  # five tokens: valid and invalid frames take them alike
    ping = encode_event_text({"type": "ping"})
    assert await send([ping, "{bad", ping, "{}", ping, ping]) == [
        "Pong",
        "bad_json",
        "Pong",
        "unknown_type",
        "Pong",
        "rate_limited",
    ]
    # one strike so far; garbage strikes like anything else: the 20th in a row closes
    assert await send(["{not json"] * 18) == ["rate_limited"] * 18
    assert alice.closed is None
    assert await send(["{not json"]) == ["rate_limited"]
    assert alice.closed == CLOSE_POLICY
    assert node.statistics().errors == {"bad_json": 21, "unknown_type": 1, "rate_limited": 25}
    assert Pong() not in alice.events


class GatedStore(SqliteStore):
    """SQLite whose reads of a room's latest page count themselves and, once read, wait
    for a gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.latest_reads = 0
        #: Reads (1 the first) that fail as a full disk would.
        self.failing: set[int] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def latest(self, room: str, limit: int) -> list[Message]:
        self.latest_reads += 1
        messages = super().latest(room, limit)
        self.entered.set()
        self.gate.wait(10)
        if self.latest_reads in self.failing:
            raise StoreError("disk I/O error")
        return messages


async def test_joins_share_a_read_of_the_latest_page_that_begins_after_they_subscribed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    store = GatedStore(tmp_path / "history.sqlite3")
    node = Node(make_settings(tmp_path, ws_bind=None), "n1", store)
    await nursery.start(node.run)
    stored(node, "r", "one", "two")
    _, alice, alice_commands = await open_session(nursery, node, "alice")
    await alice_commands.send(encode_event_text({"type": "join", "room": "r"}))
    await trio.to_thread.run_sync(store.entered.wait)
    # alice's read has begun: those who join now need one that begins after them.
    stored(node, "r", "three")
    late = [await open_session(nursery, node, name) for name in ("bob", "carol", "dave")]
    for _, _, commands in late:
        await commands.send(encode_event_text({"type": "join", "room": "r"}))
    await trio.testing.wait_all_tasks_blocked()
    store.gate.set()
    # The gate's thread ends outside trio: no task event marks it.
    await eventually(lambda: all(any(type(e) is Joined for e in t.events) for _, t, _ in late))
    texts = [e.text for e in alice.events if type(e) is MessageEvent]
    assert texts == ["one", "two"]
    for _, transport, _ in late:
        assert [e.text for e in transport.events if type(e) is MessageEvent] == [
            "one",
            "two",
            "three",
        ]
    assert store.latest_reads == 2


async def test_when_a_shared_read_fails_its_reader_is_refused_and_the_others_read_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    store = GatedStore(tmp_path / "history.sqlite3")
    store.failing = {2}
    node = Node(make_settings(tmp_path, ws_bind=None), "n1", store)
    await nursery.start(node.run)
    stored(node, "r", "one")
    sessions = {name: await open_session(nursery, node, name) for name in ("alice", "bob", "carol")}
    join = encode_event_text({"type": "join", "room": "r"})
    await sessions["alice"][2].send(join)
    await trio.to_thread.run_sync(store.entered.wait)
    # bob's read waits for alice's to end; carol shares bob's.
    for name in ("bob", "carol"):
        await sessions[name][2].send(join)
    await trio.testing.wait_all_tasks_blocked()
    store.gate.set()
    refused = store_unavailable("r", None)
    await eventually(lambda: refused in sessions["bob"][1].events)
    for name in ("alice", "carol"):
        await eventually(lambda n=name: any(type(e) is Joined for e in sessions[n][1].events))
        texts = [e.text for e in sessions[name][1].events if type(e) is MessageEvent]
        assert texts == ["one"]
    assert not any(type(e) is Joined for e in sessions["bob"][1].events)
    assert store.latest_reads == 3
