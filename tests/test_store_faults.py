"""Storage faults: a failing store degrades the node, it never stops it.

- A real full disk: a small tmpfs as the data directory, filled until SQLite reports
  ``database or disk is full`` (needs root; under CI it must run).
- A real SqliteStore whose connections fail on demand (`Faults`): writes fail at COMMIT,
  where WAL pages reach the disk, and reads fail as a corrupt page or an I/O error would.
- The commit task's backoff, under the autojump clock.
- Clients: the terminal client joins again after a refused join (the page's and the
  terminal client's resends on a real full disk are in test_browser.py and
  test_client_cli.py).

Every client runs over a real socket to the in-process server, or (for timing) over a
session on an in-memory transport.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import socket
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from trio_chat._errors import StoreError
from trio_chat.client._chat import ChatClient
from trio_chat.node._cluster import HEAL_HEADER, sign_heal_request
from trio_chat.node._history import RETRY_FIRST, RETRY_MAX
from trio_chat.node._node import Node
from trio_chat.node._store import MemoryStore, Message, SqliteStore
from trio_chat.protocol._ids import IdClock
from trio_chat.protocol._wire import (
    STORE_UNAVAILABLE,
    Ack,
    ErrorEvent,
    Event,
    Joined,
    MessageEvent,
    decode_events,
)
from trio_chat.server._session import Session

from _netns import without_worker
from conftest import TIMEOUT, Client, Server, fill, make_settings, start_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_chat.server._hub import Outgoing

ROOM: Final = "r"


# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Faults:
    """What the store's SQLite connections raise from now on (None: nothing)."""

    #: Raised by COMMIT: in WAL mode that is where a full or failing disk shows.
    write: sqlite3.Error | None = None
    #: Raised by every SELECT.
    read: sqlite3.Error | None = None
    #: Raised by ROLLBACK (an I/O error can fail it too).
    rollback: sqlite3.Error | None = None

    def store(self, path: Path) -> SqliteStore:
        """A real SqliteStore at ``path`` whose connections obey these faults."""
        faults = self

        class FaultyConnection(sqlite3.Connection):
            def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
                verb = sql.lstrip().split(None, 1)[0].upper()
                error = {
                    "COMMIT": faults.write,
                    "SELECT": faults.read,
                    "ROLLBACK": faults.rollback,
                }.get(verb)
                if error is not None:
                    raise type(error)(*error.args)
                return super().execute(sql, parameters)

        return SqliteStore(path, factory=FaultyConnection)


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
async def faulty_server(nursery: trio.Nursery, tmp_path: Path, faults: Faults) -> Server:
    store = faults.store(tmp_path / "history.sqlite3")
    return await start_server(nursery, make_settings(tmp_path), store)


async def health(server: Server) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/healthz")
    return response.status_code, response.text


async def metric_lines(server: Server) -> set[str]:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/metrics")
    return set(without_worker(response.text).splitlines())


async def history_texts(server: Server, room: str = ROOM) -> list[str]:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get(f"/api/rooms/{room}/messages", params={"limit": "200"})
    assert response.status_code == 200, response.text
    return [m["text"] for m in response.json()["messages"]]


def refusal(cid: str | None = None) -> dict[str, Any]:
    """The error frame for a command in ROOM that the store failed."""
    event = {"type": "error", "code": "store_unavailable", "message": STORE_UNAVAILABLE}
    return {**event, "room": ROOM} | ({"cid": cid} if cid is not None else {})


async def send_until_acked(client: Client, text: str, cid: str) -> dict[str, Any]:
    """Send ``cid`` as a client does: again after each ``store_unavailable``; the ack."""
    with trio.fail_after(TIMEOUT):
        while True:
            await client.send(type="send", room=ROOM, text=text, cid=cid)
            while True:
                event = await client.recv()
                if event.get("cid") == cid and event["type"] in ("ack", "error"):
                    break
            if event["type"] == "ack":
                return event
            assert event == refusal(cid)
            # The node refuses at once until its next attempt is due (RETRY_FIRST, doubling).
            await trio.sleep(RETRY_FIRST)


def test_a_failed_commit_stores_nothing_and_the_next_write_works(tmp_path: Path) -> None:
    """Even when the ROLLBACK fails too, leaving the transaction open."""
    faults = Faults(
        write=sqlite3.OperationalError("database or disk is full"),
        rollback=sqlite3.OperationalError("disk I/O error"),
    )
    store = faults.store(tmp_path / "history.sqlite3")
    clock = IdClock("n1")
    lost, kept = (
        Message(id=clock.next_id(1000 + i), room=ROOM, sender="a", text=f"m{i}", ts=0.0)
        for i in range(2)
    )
    with pytest.raises(StoreError, match=r"^OperationalError: disk I/O error$"):
        store.write([lost])
    faults.write = faults.rollback = None
    assert store.write([kept]) == {}
    assert store.latest(ROOM, 10) == [kept]
    faults.read = sqlite3.DatabaseError("database disk image is malformed")
    with pytest.raises(StoreError, match=r"^DatabaseError: database disk image is malformed$"):
        store.latest(ROOM, 10)
    store.close()


# --------------------------------------------------------------------------- a real full disk


async def test_a_full_disk_refuses_sends_and_recovers_without_a_restart(
    nursery: trio.Nursery, small_disk: Path, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(small_disk))
    node = server.node
    url = server.chat_socket_url
    async with connect(url, "alice") as alice, connect(url, "bob") as bob:
        await alice.join(ROOM)
        await bob.join(ROOM)
        await alice.chat(ROOM, "before", "a-1")
        filler = fill(small_disk)

        await alice.send(type="send", room=ROOM, text="during", cid="a-2")
        assert await alice.expect("error") == refusal("a-2")
        assert await health(server) == (503, "degraded: store\n")
        lines = await metric_lines(server)
        assert "trio_chat_store_up 0" in lines
        assert 'trio_chat_store_failures_total{op="write"} 0' not in lines

        # Reads still work on a full disk: others join, get history, see each other.
        async with connect(url, "carol") as carol:
            replay, joined = await carol.join(ROOM)
            assert [m["text"] for m in replay] == ["before"]
            assert joined["members"] == ["alice", "bob", "carol"]
            assert await history_texts(server) == ["before"]
            await carol.send(type="ping")
            await carol.expect("pong")

        filler.unlink()
        ack = await send_until_acked(alice, "during", "a-2")
        assert not ack.get("duplicate")
        assert await health(server) == (200, "ok\n")
        assert "trio_chat_store_up 1" in await metric_lines(server)
        # Stored once: the same cid again is answered with the first one's id.
        await alice.send(type="send", room=ROOM, text="during", cid="a-2")
        assert await alice.next_of("ack") == {**ack, "duplicate": True}
        assert await history_texts(server) == ["before", "during"]
        # Bob saw nothing of the refused send, then the stored one, once.
        texts = []
        while len(texts) < 2:
            event = await bob.recv()
            if event["type"] == "message":
                texts.append(event["text"])
        assert texts == ["before", "during"]
        assert server.node is node  # the same node throughout: no restart


# --------------------------------------------------------------------------- failing writes


async def test_a_failed_write_acks_nothing_and_the_retry_is_stored_once(
    faulty_server: Server, faults: Faults, connect: Any
) -> None:
    server = faulty_server
    url = server.chat_socket_url
    async with connect(url, "alice") as alice, connect(url, "bob") as bob:
        await alice.join(ROOM)
        await bob.join(ROOM)
        await alice.chat(ROOM, "before", "a-1")
        faults.write = sqlite3.OperationalError("database or disk is full")

        await alice.send(type="send", room=ROOM, text="during", cid="a-2")
        assert await alice.expect("error") == refusal("a-2")
        # Refused at once while the next attempt is not due, or at that attempt.
        await alice.send(type="send", room=ROOM, text="again", cid="a-3")
        assert await alice.expect("error") == refusal("a-3")
        assert await health(server) == (503, "degraded: store\n")
        faults.write = sqlite3.OperationalError("database is locked")
        await alice.send(type="send", room=ROOM, text="locked", cid="a-4")
        assert await alice.expect("error") == refusal("a-4")

        faults.write = None
        ack = await send_until_acked(alice, "during", "a-2")
        assert not ack.get("duplicate")
        assert await health(server) == (200, "ok\n")
        assert await history_texts(server) == ["before", "during"]
        await bob.expect("message", text="before")
        await bob.expect("message", text="during")  # never "again" or "locked"
        lines = await metric_lines(server)
        assert "trio_chat_store_up 1" in lines
        assert 'trio_chat_errors_total{code="store_unavailable"}' in {
            line.rpartition(" ")[0] for line in lines
        }


async def test_other_nodes_messages_in_a_failed_commit_are_kept_and_retried(
    faulty_server: Server, faults: Faults, connect: Any
) -> None:
    server = faulty_server
    node = server.node
    async with connect(server.chat_socket_url, "bob") as bob:
        await bob.join(ROOM)
        faults.write = sqlite3.OperationalError("disk I/O error")
        peer = IdClock("peer-1")
        remote = Message(
            id=peer.next_id(int(time.time() * 1000)),
            room=ROOM,
            sender="dora",
            text="from a peer",
            ts=time.time(),
        )
        await node.history.deliver_remote([remote])
        # No client sends: the commit task retries on its own, with backoff.
        with trio.fail_after(TIMEOUT):
            while node.statistics().store_failures.get("write", 0) < 3:  # noqa: ASYNC110
                await trio.sleep(RETRY_FIRST)
        assert await health(server) == (503, "degraded: store\n")
        faults.write = None
        await bob.expect("message", id=remote.id, text="from a peer")
        assert await history_texts(server) == ["from a peer"]
        assert await health(server) == (200, "ok\n")


# --------------------------------------------------------------------------- failing reads


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.DatabaseError("database disk image is malformed"),
        sqlite3.OperationalError("disk I/O error"),
    ],
    ids=["corrupt_page", "io_error"],
)
async def test_a_failed_read_fails_that_request_only(
    faulty_server: Server, faults: Faults, connect: Any, error: sqlite3.Error
) -> None:
    server = faulty_server
    node = server.node
    url = server.chat_socket_url
    async with connect(url, "alice") as alice, connect(url, "carol") as carol:
        await alice.join(ROOM)
        await alice.chat(ROOM, "hello", "a-1")
        faults.read = error

        # A join whose replay fails: an error, and no trace of the join.
        await carol.send(type="join", room=ROOM)
        assert await carol.expect("error") == refusal()
        assert node.hub.members(ROOM) == ["alice"]
        await carol.send(type="send", room=ROOM, text="x", cid="c-1")
        await carol.expect("error", code="not_joined", cid="c-1")
        # A resume (``since``) fails the same way.
        await carol.send(type="join", room=ROOM, since=node.ids.next_id(0))
        assert await carol.expect("error") == refusal()

        # A history page: an error frame, the connection lives on.
        await alice.send(type="history", room=ROOM)
        assert await alice.expect("error") == refusal()
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            response = await http.get(f"/api/rooms/{ROOM}/messages")
        assert response.status_code == 503
        assert response.json() == {"code": "store_unavailable", "message": STORE_UNAVAILABLE}

        # Writes still work, so the node is healthy.
        await alice.chat(ROOM, "still here", "a-2")
        assert await health(server) == (200, "ok\n")
        assert 'trio_chat_store_failures_total{op="read"} 4' in await metric_lines(server)

        faults.read = None
        replay, joined = await carol.join(ROOM)
        assert [m["text"] for m in replay] == ["hello", "still here"]
        assert joined["members"] == ["alice", "carol"]
        await alice.send(type="history", room=ROOM)
        page = await alice.next_of("history")
        assert [m["text"] for m in page["messages"]] == ["hello", "still here"]


async def test_the_terminal_client_joins_again_after_a_refused_join(
    nursery: trio.Nursery, faulty_server: Server, faults: Faults
) -> None:
    out = io.StringIO()
    client = ChatClient(faulty_server.chat_socket_url, name="alice", rooms=[ROOM], out=out)
    faults.read = sqlite3.DatabaseError("database disk image is malformed")
    done = trio.Event()

    async def lines(send: trio.MemorySendChannel[str]) -> None:
        async with send:
            await done.wait()

    async def shown(pattern: str) -> None:
        with trio.fail_after(TIMEOUT):
            while not re.search(pattern, out.getvalue(), re.MULTILINE):  # noqa: ASYNC110
                await trio.sleep(RETRY_FIRST)

    nursery.start_soon(client.run_until_quit, lines)
    await shown(r"^! error store_unavailable: ")
    faults.read = None
    await shown(rf"^\* joined #{ROOM}: alice$")  # at its next retry, on the same socket
    assert out.getvalue().count("* connected") == 1
    done.set()


async def test_cluster_heal_reads_that_fail_fail_alone(
    nursery: trio.Nursery, tmp_path: Path, faults: Faults
) -> None:
    """The peers' history API answers 503; a heal and a catch-up survive the store."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Loopback only, TTL 0, a port and a secret of its own.
    settings = make_settings(
        tmp_path, cluster="host", cluster_port=port, cluster_secret=os.urandom(32)
    )
    server = await start_server(nursery, settings, faults.store(tmp_path / "history.sqlite3"))
    node = server.node
    cluster = node.cluster
    peer = Message(id=IdClock("peer-1").next_id(1000), room=ROOM, sender="dora", text="hi", ts=0.0)
    node.store.write([peer])
    faults.read = sqlite3.DatabaseError("database disk image is malformed")

    async def heal_api() -> httpx.Response:
        signature = sign_heal_request(cluster.secret, "peer-1", "", "1000", time.time())
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            return await http.get(
                "/api/cluster/messages",
                params={"origin": "peer-1", "after": "", "limit": "1000"},
                headers={HEAL_HEADER: signature},
            )

    assert (await heal_api()).status_code == 503
    healed = cluster.gaps_healed
    await cluster._heal("peer-1")  # the store fails; no peer to ask: nothing, no crash
    assert cluster.gaps_healed == healed + 1
    async with trio.open_nursery() as catching_up:
        catching_up.start_soon(cluster._catch_up, "peer-1")
        failed = node.statistics().store_failures["read"]
        with trio.fail_after(TIMEOUT):
            while node.statistics().store_failures["read"] < failed + 2:  # noqa: ASYNC110
                await trio.sleep(RETRY_FIRST)
        faults.read = None  # the catch-up, still waiting, now ends
    response = await heal_api()
    assert response.status_code == 200
    assert [m[0] for m in response.json()] == [peer.id]
    assert await health(server) == (200, "ok\n")


# --------------------------------------------------------------------------- backoff


class FlakyStore(MemoryStore):
    """A memory store whose next ``failures`` writes fail; it records when each came."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: list[float] = []

    def write(self, messages: list[Message]) -> dict[str, str]:
        self.attempts.append(trio.current_time())
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("OperationalError: disk I/O error")
        return super().write(messages)


class Inbox:
    """A session's transport whose frames the test awaits, one event at a time."""

    remote = "test"

    def __init__(self) -> None:
        # Far more than one test's events: a full inbox would be a test bug.
        self._send, self._receive = trio.open_memory_channel[Event](1000)

    def send_payload_nowait(self, payload: bytes) -> None:
        for event in decode_events(payload):
            self._send.send_nowait(event)

    def deliver_nowait(self, out: Outgoing) -> None:
        self.send_payload_nowait(out.payload)

    async def send_reply(self, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.send_payload_nowait(payload)

    def close_nowait(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed: {code} {reason}")

    @contextlib.asynccontextmanager
    async def cancel_on_close(self) -> AsyncIterator[None]:
        yield

    async def next_of(self, kind: type[Event]) -> Event:
        while True:
            event = await self._receive.receive()
            if isinstance(event, kind):
                return event


@contextlib.asynccontextmanager
async def node_session(
    tmp_path: Path, store: FlakyStore
) -> AsyncIterator[tuple[Node, Inbox, trio.MemorySendChannel[str]]]:
    """A node on ``store`` and one session joined to ROOM; yields what the test drives."""
    node = Node(make_settings(tmp_path, ws_bind=None), "n1", store)
    inbox = Inbox()
    # A few commands in flight at most.
    commands, receive = trio.open_memory_channel[str](10)

    async def read() -> list[str]:
        return [await receive.receive()]

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        # Not startable; it has run once `Joined` arrives, below.
        nursery.start_soon(Session(node, inbox, "alice").run, read)  # noqa: ASYNC113
        await commands.send('{"type":"join","room":"r"}')
        await inbox.next_of(Joined)
        yield node, inbox, commands
        nursery.cancel_scope.cancel()


async def test_the_commit_task_retries_with_backoff(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = FlakyStore(failures=8)
    async with node_session(tmp_path, store) as (node, inbox, _):
        remote = Message(
            id=IdClock("peer-1").next_id(1000), room=ROOM, sender="dora", text="hi", ts=0.0
        )
        await node.history.deliver_remote([remote])
        assert await inbox.next_of(MessageEvent) == remote.event()
        gaps = [b - a for a, b in zip(store.attempts, store.attempts[1:], strict=False)]
        expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, RETRY_MAX, RETRY_MAX]
        assert gaps == pytest.approx(expected)
        assert node.store_up


async def test_sends_while_the_store_is_down_are_refused_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = FlakyStore(failures=1)
    async with node_session(tmp_path, store) as (node, inbox, commands):
        await commands.send('{"type":"send","room":"r","text":"one","cid":"a-1"}')
        failed = await inbox.next_of(ErrorEvent)
        assert failed == ErrorEvent("store_unavailable", STORE_UNAVAILABLE, ROOM, "a-1")
        assert not node.store_up
        down_at = trio.current_time()
        # Before the next attempt is due: refused at once, without touching the disk.
        await commands.send('{"type":"send","room":"r","text":"two","cid":"a-2"}')
        assert await inbox.next_of(ErrorEvent) == ErrorEvent(
            "store_unavailable", STORE_UNAVAILABLE, ROOM, "a-2"
        )
        assert trio.current_time() == down_at
        assert len(store.attempts) == 1
        # Once it is due, the retry goes to the store and is acked.
        await trio.sleep(RETRY_FIRST)
        await commands.send('{"type":"send","room":"r","text":"one","cid":"a-1"}')
        ack = await inbox.next_of(Ack)
        assert ack.cid == "a-1"
        assert not ack.duplicate
        assert len(store.attempts) == 2
        assert node.store_up
        assert [m.text for m in store.latest(ROOM, 10)] == ["one"]
