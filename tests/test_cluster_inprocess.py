"""The node's side of the cluster, in one process: `Node`s over the link on a `FakeLan`.

Each node is a real `Node` (history, names, presence, cluster) with a memory store, its
bus a `MulticastBus` over a `ClusterLink` on the fake LAN, and its clients real
`Session`s over a recording transport. Everything runs under ``autojump_clock``: the
link's heartbeats and failure detection take virtual seconds, the tests milliseconds.

The bus's heal fetch is injected (`LanBus.fetch`): it answers from the peer's store as
its ``/api/cluster/messages`` would, so no HTTP server is needed. The HTTP fetch itself
is exercised by tests/test_cluster_processes.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, cast

import msgspec
import trio
import trio.testing
from test_link_fakelan import CLUSTER, SECRET, FakeLan, data_of, wall_clock, wall_ms
from test_session import Recorder, open_session

from trio_chat.link._events import MAX_PAYLOAD as LINK_MAX_PAYLOAD
from trio_chat.link._events import PeerStatus
from trio_chat.link._socket import ClusterLink, LinkConfig
from trio_chat.node._bus import MAX_PAYLOAD
from trio_chat.node._cluster import Broadcaster, Snapshot, decode_body
from trio_chat.node._multicast import MulticastBus
from trio_chat.node._node import Node
from trio_chat.node._store import MemoryStore, Message
from trio_chat.protocol._names import owner_digest
from trio_chat.protocol._wire import Deleted, Joined, Members, MessageEvent, Presence
from trio_chat.server._auth import Identity

from conftest import eventually, make_settings

if TYPE_CHECKING:
    from pathlib import Path

    from trio_chat.node._bus import Bus
    from trio_chat.server._session import Session

ROOM = "general"


class LanBus(MulticastBus):
    """The multicast bus, with the heal fetch answered from the peers' stores."""

    def __init__(self, link: ClusterLink, name: str, cluster: dict[str, ChatNode]) -> None:
        super().__init__(link, SECRET)
        self._name = name
        self._cluster = cluster
        #: (origin, after) of each fetch.
        self.fetches: list[tuple[str, str]] = []

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        await trio.lowlevel.checkpoint()
        self.fetches.append((origin, after))
        peers = [n for n in self._cluster.values() if n.alive and n.name != self._name]
        # As MulticastBus.fetch: the origin first, it has everything it sent.
        peers.sort(key=lambda n: n.name != origin)
        for peer in peers:
            return peer.node.store.from_origin(origin, after, limit)
        return []


@dataclasses.dataclass
class ChatNode:
    name: str
    node: Node
    bus: LanBus
    nursery: trio.Nursery
    scope: trio.CancelScope
    lan: FakeLan
    alive: bool = True

    async def client(
        self, name: str, client_id: str | None = None
    ) -> tuple[Session, Recorder, trio.MemorySendChannel[str]]:
        return await open_session(self.nursery, self.node, name, client_id)

    def crash(self) -> None:
        """Stop dead: no goodbye, no presence update leaves it."""
        self.alive = False
        self.lan.endpoints[self.name].unplugged = True
        self.scope.cancel()


async def start_chat_node(
    nursery: trio.Nursery,
    lan: FakeLan,
    cluster: dict[str, ChatNode],
    tmp_path: Path,
    name: str,
    *,
    store: MemoryStore | None = None,
    presence_names_max: int = 200,
    **link: Any,
) -> ChatNode:
    config = LinkConfig(
        secret=SECRET,
        cluster_id=CLUSTER,
        node_id=name,
        incarnation=wall_ms(),
        http_url=f"http://{name}",
        **link,
    )
    bus = LanBus(
        ClusterLink(config, transport=lan.endpoint(name), wall_clock=wall_clock), name, cluster
    )
    settings = make_settings(tmp_path / name, ws_bind=None, presence_names_max=presence_names_max)
    node = Node(settings, name, store or MemoryStore(), bus)

    async def run(task_status: trio.TaskStatus[ChatNode]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(node.run)
                task_status.started(ChatNode(name, node, bus, inner, scope, lan))
                await trio.sleep_forever()

    chat_node: ChatNode = await nursery.start(run)
    cluster[name] = chat_node
    return chat_node


async def all_up(nodes: list[ChatNode]) -> None:
    """Every node has heard every other (the link delivers from the first heartbeat)."""
    names = {n.name for n in nodes}
    await eventually(
        lambda: all(
            {p.node for p in n.bus.link.peers() if p.status is PeerStatus.ALIVE} == names - {n.name}
            for n in nodes
        )
    )


def texts(recorder: Recorder) -> list[str]:
    return [e.text for e in recorder.events if isinstance(e, MessageEvent)]


async def join(send: trio.MemorySendChannel[str], recorder: Recorder, room: str = ROOM) -> Joined:
    await send.send(json.dumps({"type": "join", "room": room}))
    await eventually(lambda: any(isinstance(e, Joined) for e in recorder.events))
    return next(e for e in recorder.events if isinstance(e, Joined))


async def test_a_message_is_stored_and_delivered_once_on_every_node(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # Lost and duplicated datagrams: the link repairs and dedupes them.
            lan = FakeLan(nursery, seed=11, loss=0.2, duplicate=0.2, max_delay=0.005)
            nodes = [
                await start_chat_node(nursery, lan, cluster, tmp_path, f"n{i}") for i in range(3)
            ]
            await all_up(nodes)
            clients = [await nodes[i].client(f"user{i}") for i in range(3)]
            for _, recorder, send in clients:
                await join(send, recorder)
            _, _, alice = clients[0]
            for i in range(20):
                await alice.send(json.dumps({"type": "send", "room": ROOM, "text": f"m{i}"}))
                await trio.sleep(0.05)
            sent = [f"m{i}" for i in range(20)]
            for _, recorder, _ in clients:
                await eventually(lambda r=recorder: len(texts(r)) >= 20)
            # Nothing more is on its way: a second copy would have arrived by now.
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    for node, (_, recorder, _) in zip(nodes, clients, strict=True):
        assert texts(recorder) == sent
        assert [m.text for m in node.node.store.latest(ROOM, 100)] == sent
        assert node.node.statistics().duplicates == 0


async def test_presence_merges_across_nodes_and_a_dead_peers_members_leave(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=12, loss=0.1)
            a, b, c = [await start_chat_node(nursery, lan, cluster, tmp_path, n) for n in "abc"]
            await all_up([a, b, c])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            # Peers' members in the order their presence arrived, which varies.
            await eventually(lambda: sorted(c.node.members(ROOM)) == ["alice", "bob"])
            carol_session, carol_rec, carol = await c.client("carol")
            members = (await join(carol, carol_rec)).members
            assert members[0] == "carol"
            assert sorted(members[1:]) == ["alice", "bob"]
            # A name in a room on a peer is taken here too.
            second, _, _ = await c.client("alice")
            assert second.name == "alice-2"
            await eventually(lambda: "carol" in a.node.members(ROOM))
            b.crash()
            # Dead after ~6.5 virtual seconds of silence: its members leave everywhere.
            await eventually(lambda: Presence(room=ROOM, left="bob") in carol_rec.events)
            assert c.node.members(ROOM) == ["carol", "alice"]
            assert a.node.members(ROOM) == ["alice", "carol"]
            assert Presence(room=ROOM, left="bob") in alice_rec.events
            assert carol_session.name == "carol"
            nursery.cancel_scope.cancel()
    # Each arrival was announced once on each other node.
    assert carol_rec.events.count(Presence(room=ROOM, joined="bob")) == 0
    assert alice_rec.events.count(Presence(room=ROOM, joined="bob")) == 1
    assert alice_rec.events.count(Presence(room=ROOM, joined="carol")) == 1


async def test_a_room_big_across_nodes_counts_and_lists_again_when_a_dead_peers_members_leave(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=14, loss=0.1)
            a, b = [
                await start_chat_node(nursery, lan, cluster, tmp_path, n, presence_names_max=2)
                for n in "ab"
            ]
            await all_up([a, b])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            await eventually(lambda: sorted(a.node.members(ROOM)) == ["alice", "bob"])
            _, carol_rec, carol = await a.client("carol")
            # Three names across the cluster: over the limit on both nodes.
            joined = await join(carol, carol_rec)
            assert (joined.members, joined.count) == ([], 3)
            await eventually(lambda: Members(room=ROOM, count=3) in bob_rec.events)
            await eventually(lambda: Members(room=ROOM, count=3) in alice_rec.events)
            b.crash()
            # bob's node is dead: 2 names, still big; carol leaves too: the list comes back.
            await eventually(lambda: Members(room=ROOM, count=2) in alice_rec.events)
            await carol.aclose()
            listed = Members(room=ROOM, count=1, names=["alice"])
            await eventually(lambda: listed in alice_rec.events)
            nursery.cancel_scope.cancel()
    assert Presence(room=ROOM, joined="carol") not in alice_rec.events + bob_rec.events
    assert Presence(room=ROOM, left="bob") not in alice_rec.events


#: A page's retry secret (``?client_id=``), and somebody else's.
ALICE_SECRET = "alice-tab-secret-0123456789"
OTHER_SECRET = "someone-else-secret-0123456"


async def test_a_client_whose_node_died_keeps_its_name_on_another_before_detection(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=13)
            a, c = [await start_chat_node(nursery, lan, cluster, tmp_path, n) for n in "ac"]
            await all_up([a, c])
            _, alice_rec, alice = await a.client("alice", ALICE_SECRET)
            _, dave_rec, dave = await a.client("dave")
            _, carol_rec, carol = await c.client("carol")
            for send, recorder in [(alice, alice_rec), (dave, dave_rec), (carol, carol_rec)]:
                await join(send, recorder)
            # b starts later: it learns a's members, and their owners, from a's snapshot.
            b = await start_chat_node(nursery, lan, cluster, tmp_path, "b")
            await all_up([a, b, c])
            await eventually(lambda: {"alice", "dave"} <= b.node.presence.remote_names())
            _, bob_rec, bob = await b.client("bob")
            await join(bob, bob_rec)
            await eventually(lambda: "bob" in c.node.members(ROOM))

            a.crash()
            # Her page's first retry reaches b well before b declares a dead (~6.5 s).
            intruder, _, _ = await b.client("alice", OTHER_SECRET)
            anonymous, _, _ = await b.client("alice")
            moved, moved_rec, moved_send = await b.client("alice", ALICE_SECRET)
            assert "alice" in b.node.presence.remote_names()  # her old session, still there
            assert (intruder.name, anonymous.name, moved.name) == ("alice-2", "alice-3", "alice")
            assert (await join(moved_send, moved_rec)).members.count("alice") == 1

            # a is declared dead: dave leaves; alice, here on b now, stays.
            for recorder in (bob_rec, carol_rec, moved_rec):
                await eventually(lambda r=recorder: Presence(room=ROOM, left="dave") in r.events)
                assert Presence(room=ROOM, left="alice") not in recorder.events
            assert sorted(b.node.members(ROOM)) == ["alice", "bob", "carol"]
            assert sorted(c.node.members(ROOM)) == ["alice", "bob", "carol"]
            assert moved.name == "alice"
            # Her name is hers alone now: another client asking for it gets a suffix.
            latecomer, _, _ = await c.client("alice", OTHER_SECRET)
            assert latecomer.name == "alice-2"
            nursery.cancel_scope.cancel()


class OldPresence(msgspec.Struct, tag="p", array_like=True):
    """`RemotePresence` as the version before owners declared it."""

    room: str
    name: str
    joined: bool


class OldSnapshot(msgspec.Struct, tag="s", array_like=True):
    """`Snapshot` as the version before owners declared it."""

    rooms: dict[str, list[str]]


class Captured:
    """A bus that keeps what it is given to send."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.payloads.append(payload)


async def test_presence_works_with_peers_of_the_version_before_owners(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # What we send, a peer of that version decodes (the owners are ignored).
    bus = Captured()
    out = Broadcaster(cast("Bus", bus))
    out.send_presence(ROOM, "alice", joined=True, owner=owner_digest(ALICE_SECRET))
    out.send_snapshot({ROOM: ["alice"]}, {"alice": owner_digest(ALICE_SECRET)})
    old = msgspec.msgpack.Decoder(OldPresence | OldSnapshot)
    assert [old.decode(p) for p in bus.payloads] == [
        OldPresence(ROOM, "alice", joined=True),
        OldSnapshot({ROOM: ["alice"]}),
    ]
    # What it sends, we take: its members have no owner, so their names are taken
    # from everyone.
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=15)
            a, b = [await start_chat_node(nursery, lan, cluster, tmp_path, n) for n in "ab"]
            await all_up([a, b])
            a.bus.send(msgspec.msgpack.encode(OldPresence(ROOM, "alice", joined=True)))
            a.bus.send(msgspec.msgpack.encode(OldSnapshot({ROOM: ["alice", "dave"]})))
            await eventually(lambda: b.node.presence.remote_names() == {"alice", "dave"})
            claimant, _, _ = await b.client("alice", ALICE_SECRET)
            assert claimant.name == "alice-2"
            nursery.cancel_scope.cancel()


class Quiet:
    """A member that only needs to be counted: a name, maybe an owner, no frames kept."""

    def __init__(self, name: str, owner: bytes = b"") -> None:
        self.name = name
        self.owner = owner

    def deliver_nowait(self, out: object) -> None:
        pass


def big_presence() -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """A node's members: one room of 5,000, 200 rooms of 20, some names in two rooms."""
    rooms = {"lobby": [f"member-{i:05d}-{'x' * 16}" for i in range(5000)]}
    for r in range(200):
        rooms[f"room-{r:03d}"] = [f"member-{r * 20 + i:05d}-{'x' * 16}" for i in range(20)]
    owners = {name: owner_digest(name) for name in rooms["lobby"][::3]}
    return rooms, owners


def test_a_presence_too_big_for_one_payload_goes_in_parts_that_add_up() -> None:
    assert MAX_PAYLOAD == LINK_MAX_PAYLOAD
    rooms, owners = big_presence()
    bus = Captured()
    Broadcaster(cast("Bus", bus)).send_snapshot(rooms, owners)
    assert len(bus.payloads) > 3
    assert all(len(p) <= MAX_PAYLOAD for p in bus.payloads)
    parts = [decode_body(p) for p in bus.payloads]
    assert [cast("Snapshot", p).more for p in parts] == [True] * (len(parts) - 1) + [False]
    got: dict[str, list[str]] = {}
    got_owners: dict[str, bytes] = {}
    for part in cast("list[Snapshot]", parts):
        for room, names in part.rooms.items():
            got.setdefault(room, []).extend(names)
        got_owners.update(part.owners)
    assert got == rooms
    assert got_owners == owners


async def test_a_peer_learns_a_presence_too_big_for_one_payload(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    rooms, owners = big_presence()
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=21)
            a = await start_chat_node(nursery, lan, cluster, tmp_path, "a")
            members = {}
            for room, names in rooms.items():
                for name in names:
                    member = members.setdefault(name, Quiet(name, owners.get(name, b"")))
                    a.node.presence.subscribe(room, member)  # type: ignore[arg-type]
                    a.node.presence.announce(room, member)  # type: ignore[arg-type]
            # b starts later: all it knows of a's members comes in a's snapshot, in parts.
            b = await start_chat_node(nursery, lan, cluster, tmp_path, "b")
            await all_up([a, b])
            await eventually(lambda: sorted(b.node.members("lobby")) == sorted(rooms["lobby"]))
            assert sorted(b.node.members("room-199")) == sorted(rooms["room-199"])
            assert len(b.node.presence.remote_names()) == len(members)
            # The periodic snapshot that follows (in parts too) changes nothing, and a's
            # node runs on (a payload it could not send would have stopped it, and this
            # nursery with it).
            await trio.sleep(20)
            assert len(b.node.presence.remote_names()) == len(members)
            assert sorted(b.node.members("lobby")) == sorted(rooms["lobby"])
            nursery.cancel_scope.cancel()


async def test_a_snapshot_whose_first_parts_were_lost_is_not_applied(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=22)
            a, b = [await start_chat_node(nursery, lan, cluster, tmp_path, n) for n in "ab"]
            await all_up([a, b])
            whole = [
                Snapshot({ROOM: ["alice"]}, more=True),
                Snapshot({ROOM: ["bob"], "other": ["carol"]}, more=True, part=1),
                Snapshot({ROOM: ["dave"]}, part=2),
            ]
            # As if a gap took part 0: the rest makes no snapshot (dave alone, alice
            # and bob gone, would be wrong).
            for part in whole[1:]:
                a.bus.send(msgspec.msgpack.encode(part))
            a.bus.send(msgspec.msgpack.encode(OldPresence(ROOM, "erin", joined=True)))
            await eventually(lambda: b.node.presence.remote_names() == {"erin"})
            for part in whole:
                a.bus.send(msgspec.msgpack.encode(part))
            await eventually(
                lambda: b.node.presence.remote_names() == {"alice", "bob", "carol", "dave"}
            )
            assert sorted(b.node.members(ROOM)) == ["alice", "bob", "dave"]
            nursery.cancel_scope.cancel()


async def test_a_name_leaves_a_room_with_the_last_of_its_clients_sessions(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=14)
            a, b, c = [await start_chat_node(nursery, lan, cluster, tmp_path, n) for n in "abc"]
            await all_up([a, b, c])
            _, alice_rec, alice = await a.client("alice", ALICE_SECRET)
            _, carol_rec, carol = await c.client("carol")
            await join(alice, alice_rec)
            await join(carol, carol_rec)
            await eventually(lambda: "alice" in b.node.presence.remote_names())
            # The same client on b while its session on a lives (a duplicated tab, or a
            # move its old host has not noticed yet): its own name.
            twin, twin_rec, twin_send = await b.client("alice", ALICE_SECRET)
            assert twin.name == "alice"
            await join(twin_send, twin_rec)
            await eventually(lambda: b.node.presence.remote_names() == {"alice", "carol"})

            # Her session on a ends: alice is still in the room, on b.
            await alice.aclose()
            _, dave_rec, dave = await a.client("dave")
            # a's payloads arrive in order: whoever hears dave join heard alice leave.
            assert "alice" in (await join(dave, dave_rec)).members
            for recorder in (carol_rec, twin_rec):
                await eventually(lambda r=recorder: Presence(room=ROOM, joined="dave") in r.events)
            for recorder in (carol_rec, twin_rec, dave_rec):
                assert Presence(room=ROOM, left="alice") not in recorder.events
            for node in (a, b, c):
                assert node.node.members(ROOM).count("alice") == 1

            # Her last session leaves: now everyone is told.
            await twin_send.send(json.dumps({"type": "leave", "room": ROOM}))
            for recorder in (carol_rec, dave_rec):
                await eventually(lambda r=recorder: Presence(room=ROOM, left="alice") in r.events)
            for node in (a, b, c):
                assert "alice" not in node.node.members(ROOM)
            nursery.cancel_scope.cancel()


async def test_a_gap_is_healed_from_a_peer_through_the_bus(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=13)
            # A retransmit buffer of 16 packets: what b misses beyond it is gone from the link.
            a = await start_chat_node(nursery, lan, cluster, tmp_path, "a", buffer_packets=16)
            b = await start_chat_node(nursery, lan, cluster, tmp_path, "b")
            await all_up([a, b])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            await eventually(lambda: a.node.members(ROOM) == ["alice", "bob"])
            # b stays alive (heartbeats pass) but receives none of a's data for a while.
            lan.filter = lambda s, r, d: s == "a" and r == "b" and data_of(d) is not None
            for i in range(40):
                await alice.send(json.dumps({"type": "send", "room": ROOM, "text": f"m{i}"}))
                # Within the client rate limit (20 a second).
                await trio.sleep(0.06)
            await eventually(lambda: len(texts(alice_rec)) == 40)
            lan.filter = lambda s, r, d: False
            await eventually(lambda: len(texts(bob_rec)) >= 40)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    sent = [f"m{i}" for i in range(40)]
    assert sorted(texts(bob_rec), key=lambda t: int(t[1:])) == sent
    assert sorted(m.text for m in b.node.store.latest(ROOM, 100)) == sorted(sent)
    assert b.node.cluster is not None
    # The first heal is the catch-up when a came up; then the gaps the link gave up on.
    assert b.bus.fetches[0] == ("a", "")
    assert len(b.bus.fetches) == b.node.cluster.gaps_healed >= 2
    assert {origin for origin, _ in b.bus.fetches} == {"a"}
    # At least what a's 16-packet buffer evicted came through the bus alone.
    assert b.node.cluster.healed_messages >= 24


async def test_a_restarted_peer_catches_up_what_it_missed(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cluster: dict[str, ChatNode] = {}
    b_store = MemoryStore()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=14)
            a = await start_chat_node(nursery, lan, cluster, tmp_path, "a")
            b = await start_chat_node(nursery, lan, cluster, tmp_path, "b", store=b_store)
            await all_up([a, b])
            _, alice_rec, alice = await a.client("alice")
            await join(alice, alice_rec)
            await alice.send(json.dumps({"type": "send", "room": ROOM, "text": "before"}))
            await eventually(lambda: len(b_store.latest(ROOM, 10)) == 1)
            b.crash()
            for text in ["while", "b", "was", "down"]:
                await alice.send(json.dumps({"type": "send", "room": ROOM, "text": text}))
            await eventually(lambda: len(texts(alice_rec)) == 5)
            # The same store, a newer incarnation: as a worker restarted by its supervisor.
            b2 = await start_chat_node(nursery, lan, cluster, tmp_path, "b", store=b_store)
            await all_up([a, b2])
            await eventually(lambda: len(b_store.latest(ROOM, 10)) == 5)
            _, bob_rec, bob = await b2.client("bob")
            await join(bob, bob_rec)
            nursery.cancel_scope.cancel()
    assert texts(bob_rec) == ["before", "while", "b", "was", "down"]
    # It asked only for what followed the newest message of a's it had stored.
    assert b2.bus.fetches == [("a", b_store.latest(ROOM, 10)[0].id)]


async def test_a_tombstone_and_a_disconnect_reach_every_node(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Each node has its own store: the tombstone is stored on each, not just told."""
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=13, loss=0.2, duplicate=0.2, max_delay=0.005)
            nodes = [
                await start_chat_node(nursery, lan, cluster, tmp_path, f"n{i}") for i in range(3)
            ]
            await all_up(nodes)
            clients = [await nodes[i].client(f"user{i}") for i in range(3)]
            for node, (session, recorder, send) in zip(nodes, clients, strict=True):
                # As the transports do: a registered session is one the node can close.
                node.node.register(session)
                await join(send, recorder)
            _, _, alice = clients[0]
            await alice.send(json.dumps({"type": "send", "room": ROOM, "text": "oops"}))
            for _, recorder, _ in clients:
                await eventually(lambda r=recorder: texts(r) == ["oops"])
            (message,) = nodes[0].node.store.latest(ROOM, 5)
            admin, _, admin_send = clients[1]
            # An admin token's claims, as jwt mode's hello would give them (tests/test_auth.py
            # covers the token itself); the room rule of open mode lets it see every room.
            admin.identity = Identity(sub="user1", name="user1", rooms=(), admin=True, exp=0.0)
            await admin_send.send(json.dumps({"type": "delete", "room": ROOM, "id": message.id}))
            deleted = Deleted(room=ROOM, id=message.id)
            for _, recorder, _ in clients:
                await eventually(lambda r=recorder: deleted in r.events)
            for node in nodes:
                await eventually(lambda n=node: n.node.store.latest(ROOM, 5)[0].deleted)
            # Deleted already, here too: nothing is stored or sent again.
            assert not await nodes[2].node.delete(ROOM, message.id)
            assert nodes[2].node.disconnect("user0") == 0
            await eventually(lambda: clients[0][1].closed == 4003)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    for (_, recorder, _), node in zip(clients, nodes, strict=True):
        assert recorder.events.count(deleted) == 1
        (stored,) = node.node.store.latest(ROOM, 5)
        assert (stored.deleted, stored.text) == (True, "")
    assert clients[1][1].closed is None
    assert clients[2][1].closed is None
