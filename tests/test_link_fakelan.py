"""ClusterLinks on a fake in-memory LAN with seeded loss, duplication, delay and reordering.

Every test runs under ``autojump_clock``: timers take virtual time, the tests milliseconds.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from trio_chat.link._events import Delivered, Gap, LinkEvent, PeerDown, PeerStatus, PeerUp
from trio_chat.link._packet import Data, Nak, PacketCodec
from trio_chat.link._socket import EVENT_BUFFER, ClusterLink, LinkConfig

SECRET = b"fakelan secret, 32 bytes long..."
CLUSTER = "fakelan"
EPOCH = 1_700_000_000.0
#: (sender, receiver, datagram) -> drop it?
Filter = Callable[[str, str, bytes], bool]


def wall_clock() -> float:
    """A Unix time that follows virtual time, so that runs are reproducible."""
    return EPOCH + trio.current_time()


def wall_ms() -> int:
    return int(wall_clock() * 1000)


def message_of(datagram: bytes) -> Any:
    """The message in a datagram, opened as any cluster member could."""
    observer = PacketCodec(secret=SECRET, cluster_id=CLUSTER, node_id="observer", incarnation=1)
    return observer.open_untrusted(datagram).message


def data_of(datagram: bytes) -> Data | None:
    """The data fragment in a datagram, if it carries one."""
    message = message_of(datagram)
    return message if isinstance(message, Data) else None


def nakers(lan: FakeLan, target: str) -> set[str]:
    """The nodes that have asked ``target`` to repair a loss (sent it a NAK) so far."""
    naks = ((sender, message_of(datagram)) for _, sender, datagram in lan.log)
    return {sender for sender, nak in naks if isinstance(nak, Nak) and nak.target == target}


def node_rng(seed: int, name: str) -> random.Random:
    """The random numbers of node ``name`` in the test seeded ``seed``: the same every run.

    (A ``str`` seed is hashed with SHA-512, not ``hash()``: ``PYTHONHASHSEED`` cannot
    change it.)
    """
    return random.Random(f"{seed}:{name}")


class FakeEndpoint:
    """One node's datagram socket on the fake LAN (a ``DatagramTransport``)."""

    def __init__(self, lan: FakeLan, name: str, rng: random.Random) -> None:
        self.lan, self.name = lan, name
        #: Decides the fate (loss, duplication, delay) of what this node sends.
        self.rng = rng
        self.unplugged = False
        # Like a socket's receive buffer: what does not fit is dropped.
        self._send, self._receive = trio.open_memory_channel[bytes](10_000)

    def send_nowait(self, data: bytes) -> bool:
        if not self.unplugged:
            self.lan.transmit(self.name, data)
        return True

    async def receive(self) -> bytes:
        return await self._receive.receive()

    def deliver(self, data: bytes) -> None:
        if not self.unplugged:
            try:
                self._send.send_nowait(data)
            except trio.WouldBlock:
                self.lan.overflows += 1


class FakeLan:
    """A multicast segment: every datagram goes to every endpoint, including its sender.

    Each node draws the fate of its datagrams from a `random.Random` of its own, seeded
    from ``seed`` and its name: trio runs ready tasks in no fixed order, so with one
    generator for the whole LAN, the draws a datagram got would depend on how the other
    nodes' tasks happened to be scheduled, and a failure might not come back on a rerun.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        max_delay: float = 0.0,
    ) -> None:
        self._nursery = nursery
        self.seed = seed
        self.loss, self.duplicate, self.max_delay = loss, duplicate, max_delay
        self.endpoints: dict[str, FakeEndpoint] = {}
        self.filter: Filter = lambda sender, receiver, data: False
        #: (virtual time, sender, datagram) of every transmission.
        self.log: list[tuple[float, str, bytes]] = []
        #: (sender, receiver) -> virtual time of the last datagram that arrived.
        self.last_arrival: dict[tuple[str, str], float] = {}
        self.overflows = 0
        self._transmitted = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (checked at each transmission)."""
        while not condition():
            await self._transmitted.wait()

    def endpoint(self, name: str) -> FakeEndpoint:
        self.endpoints[name] = FakeEndpoint(self, name, node_rng(self.seed, name))
        return self.endpoints[name]

    def transmit(self, sender: str, data: bytes) -> None:
        self.log.append((trio.current_time(), sender, data))
        self._transmitted.set()
        self._transmitted = trio.Event()
        rng = self.endpoints[sender].rng
        for receiver in list(self.endpoints.values()):
            if self.filter(sender, receiver.name, data):
                continue
            copies = 2 if rng.random() < self.duplicate else 1
            for _ in range(copies):
                if receiver.name != sender and rng.random() < self.loss:
                    continue
                if self.max_delay:
                    delay = rng.uniform(0, self.max_delay)
                    self._nursery.start_soon(self._arrive, delay, sender, receiver, data)
                else:  # In order, as on a quiet LAN (tasks could be run in any order).
                    self._arrive_now(sender, receiver, data)

    def inject(self, data: bytes) -> None:
        """A datagram from outside the cluster (an attacker, another cluster)."""
        for receiver in self.endpoints.values():
            receiver.deliver(data)

    async def _arrive(self, delay: float, sender: str, receiver: FakeEndpoint, data: bytes) -> None:
        await trio.sleep(delay)
        self._arrive_now(sender, receiver, data)

    def _arrive_now(self, sender: str, receiver: FakeEndpoint, data: bytes) -> None:
        self.last_arrival[sender, receiver.name] = trio.current_time()
        receiver.deliver(data)


@dataclass
class Node:
    name: str
    link: ClusterLink
    endpoint: FakeEndpoint
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    consume: bool = True
    events: list[tuple[float, LinkEvent]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def delivered(self, origin: str) -> list[bytes]:
        return [
            e.payload for _, e in self.events if isinstance(e, Delivered) and e.origin == origin
        ]

    def of(self, kind: type[LinkEvent]) -> list[LinkEvent]:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    def crash(self) -> None:
        """Stop dead: nothing more leaves this node, not even a goodbye."""
        self.endpoint.unplugged = True
        self.scope.cancel()


async def start_node(
    nursery: trio.Nursery,
    lan: FakeLan,
    name: str,
    *,
    incarnation: int | None = None,
    consume: bool = True,
    **config: Any,
) -> Node:
    endpoint = lan.endpoint(name)
    settings = {"secret": SECRET, "cluster_id": CLUSTER, **config}
    link = ClusterLink(
        LinkConfig(
            node_id=name,
            incarnation=incarnation or wall_ms(),
            http_url=f"http://{name}",
            **settings,
        ),
        transport=endpoint,
        wall_clock=wall_clock,
    )
    node = Node(name, link, endpoint, consume=consume)

    async def consume_events() -> None:
        async for event in link.events:
            node.events.append((trio.current_time(), event))
            node.changed.set()
            node.changed = trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with node.scope:
            async with trio.open_nursery() as inner:
                await inner.start(link.run)
                if node.consume:
                    inner.start_soon(consume_events)
                task_status.started()

    await nursery.start(run)
    return node


async def test_lossy_lan_delivers_every_message_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: dict[str, list[bytes]] = defaultdict(list)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=2, loss=0.2, duplicate=0.05, max_delay=0.01)
            nodes = [await start_node(nursery, lan, f"n{i}") for i in range(4)]
            # Delivery is promised from a peer's first heartbeat on (docs/cluster.md).
            for node in nodes:
                await node.wait_for(lambda n=node: len(n.of(PeerUp)) == 3)

            async def talk(node: Node) -> None:
                rng = node_rng(1, node.name)
                for i in range(60):
                    size = 5000 if i % 10 == 3 else rng.randrange(1, 300)
                    payload = b"%s:%d:" % (node.name.encode(), i) + rng.randbytes(size)
                    sent[node.name].append(payload)
                    node.link.broadcast(payload)
                    await trio.sleep(rng.uniform(0, 0.05))

            async with trio.open_nursery() as talkers:
                for node in nodes:
                    talkers.start_soon(talk, node)
            for receiver in nodes:
                for origin in nodes:
                    if origin is not receiver:
                        await receiver.wait_for(
                            lambda r=receiver, o=origin: len(r.delivered(o.name)) == 60
                        )
            nursery.cancel_scope.cancel()
    for receiver in nodes:
        assert receiver.of(Gap) == []
        assert receiver.of(PeerDown) == []
        for origin in nodes:
            if origin is not receiver:
                assert receiver.delivered(origin.name) == sent[origin.name]
    totals = [n.link.statistics().link for n in nodes]
    assert sum(s.naks_sent for s in totals) > 0
    assert sum(s.repairs_sent for s in totals) > 0
    assert sum(s.duplicates for s in totals) > 0
    assert all(s.packets_forged == s.packets_foreign == 0 for s in totals)


async def test_tail_loss_is_repaired_within_a_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=3)
            a, b = [await start_node(nursery, lan, n) for n in "ab"]
            await b.wait_for(lambda: bool(b.of(PeerUp)))
            lan.filter = lambda s, r, d: r == "b" and (m := data_of(d)) is not None and not m.repair
            sent_at = trio.current_time()
            a.link.broadcast(b"the last word")
            await b.wait_for(lambda: bool(b.delivered("a")))
            assert trio.current_time() - sent_at <= 1.0 + 0.02 + 1e-6  # Heartbeat + hold.
            nursery.cancel_scope.cancel()
    assert b.delivered("a") == [b"the last word"]


async def test_crashed_node_restarts_as_a_new_incarnation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=4, loss=0.1, max_delay=0.005)
            a, b, c = [await start_node(nursery, lan, n) for n in "abc"]
            await a.wait_for(lambda: len(a.of(PeerUp)) == 2)
            c.link.broadcast(b"before")
            await a.wait_for(lambda: a.delivered("c") == [b"before"])
            # "lost" never reaches anyone, repairs neither; heartbeats say it exists.
            lan.filter = lambda s, r, d: s == "c" and data_of(d) is not None
            c.link.broadcast(b"lost")
            # Whatever the loss, both others learn of it (from c's heartbeats) and ask.
            await lan.wait_for(lambda: nakers(lan, "c") == {"a", "b"})
            old = c.link.statistics().link
            c.crash()
            await trio.sleep(2.0)
            lan.filter = lambda s, r, d: False
            c2 = await start_node(nursery, lan, "c", incarnation=wall_ms())
            await a.wait_for(lambda: len(a.of(PeerUp)) == 3)
            c2.link.broadcast(b"after")
            a.link.broadcast(b"welcome back")
            for node in (a, b):
                await node.wait_for(lambda n=node: n.delivered("c") == [b"before", b"after"])
            await c2.wait_for(lambda: c2.delivered("a") == [b"welcome back"])
            nursery.cancel_scope.cancel()
    old_inc = _incarnation(a, "c", first=True)
    for node in (a, b):
        events = [e for _, e in node.events if getattr(e, "origin", getattr(e, "node", "")) == "c"]
        assert events[-4:-1] == [
            Gap("c", old_inc, 2, 2),
            PeerDown("c", "restarted"),
            PeerUp("c", _incarnation(node, "c", first=False), "http://c"),
        ]
    assert old.naks_received > 0


def _incarnation(node: Node, name: str, *, first: bool) -> int:
    ups = [e for e in node.of(PeerUp) if isinstance(e, PeerUp) and e.node == name]
    return (ups[0] if first else ups[-1]).incarnation


async def test_forged_replayed_and_foreign_packets_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        lan = FakeLan(nursery, seed=5)
        a = await start_node(nursery, lan, "a")
        since = len(lan.log)  # b never saw what a sent before b started.
        b = await start_node(nursery, lan, "b")
        other_cluster = await start_node(nursery, lan, "x", cluster_id="elsewhere")
        other_secret = await start_node(nursery, lan, "y", secret=b"y" * 32)
        await b.wait_for(lambda: bool(b.of(PeerUp)))
        a.link.broadcast(b"genuine")
        await b.wait_for(lambda: bool(b.delivered("a")))
        await trio.testing.wait_all_tasks_blocked()
        before = b.link.statistics().link
        captured = [d for _, sender, d in lan.log[since:] if sender == "a"]
        for datagram in captured:
            lan.inject(datagram)  # Replayed verbatim.
            forged = bytearray(datagram)
            forged[-5] ^= 0x40
            lan.inject(bytes(forged))
        lan.inject(b"TCL\x01 not even a header")
        await trio.testing.wait_all_tasks_blocked()
        after = b.link.statistics().link
        nursery.cancel_scope.cancel()
    assert b.delivered("a") == [b"genuine"]
    assert [e.node for e in b.of(PeerUp) if isinstance(e, PeerUp)] == ["a"]
    assert after.packets_replayed - before.packets_replayed == len(captured)
    assert after.packets_forged - before.packets_forged == len(captured)
    assert after.packets_malformed - before.packets_malformed == 1
    assert after.packets_foreign > 0  # x's and y's heartbeats.
    assert after.packets_dropped - before.packets_dropped == (
        2 * len(captured) + 1 + after.packets_foreign - before.packets_foreign
    )
    assert other_cluster.of(PeerUp) == other_secret.of(PeerUp) == []


async def test_the_retransmit_buffer_bound_holds_and_evictions_become_gaps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        lan = FakeLan(nursery, seed=6)
        a = await start_node(nursery, lan, "a", buffer_packets=16)
        b = await start_node(nursery, lan, "b")
        await b.wait_for(lambda: bool(b.of(PeerUp)))
        a_inc = _incarnation(b, "a", first=True)
        # b stays alive (heartbeats pass) but receives none of a's data: it acks nothing.
        lan.filter = lambda s, r, d: s == "a" and r == "b" and data_of(d) is not None
        for i in range(100):
            a.link.broadcast(b"%d" % i)
            assert a.link.statistics().link.buffer_packets <= 16
            await trio.sleep(0.01)
        lan.filter = lambda s, r, d: False
        await b.wait_for(lambda: len(b.delivered("a")) == 16)
        nursery.cancel_scope.cancel()
    assert b.of(Gap) == [Gap("a", a_inc, 1, 84)]
    assert b.delivered("a") == [b"%d" % i for i in range(84, 100)]
    assert a.link.statistics().link.buffer_evictions == 84


async def test_failure_detection_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        lan = FakeLan(nursery, seed=7)
        a, b, c = [await start_node(nursery, lan, n) for n in "abc"]
        await a.wait_for(lambda: len(a.of(PeerUp)) == 2)
        await trio.sleep(2.3)
        c.crash()
        last_heard = lan.last_arrival["c", "a"]
        await trio.sleep_until(last_heard + 5.0 - 0.001)
        assert [p.status for p in a.link.peers()] == [PeerStatus.ALIVE] * 2
        await trio.sleep_until(last_heard + 5.0 + 0.001)
        assert [p.status for p in a.link.peers()] == [PeerStatus.ALIVE, PeerStatus.SUSPECT]
        await a.wait_for(lambda: bool(a.of(PeerDown)))
        assert a.events[-1] == (pytest.approx(last_heard + 6.5), PeerDown("c", "dead"))
        # A graceful leave is seen at once.
        b.scope.cancel()
        left_at = trio.current_time()
        await a.wait_for(lambda: len(a.of(PeerDown)) == 2)
        assert a.events[-1] == (left_at, PeerDown("b", "left"))
        nursery.cancel_scope.cancel()


async def test_a_slow_consumer_gets_a_gap_instead_of_blocking_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        lan = FakeLan(nursery, seed=8)
        b = await start_node(nursery, lan, "b", consume=False)
        a = await start_node(nursery, lan, "a")
        await a.wait_for(lambda: bool(a.of(PeerUp)))
        total = EVENT_BUFFER + 50
        for i in range(total):
            a.link.broadcast(b"%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        # The link kept receiving although nobody read its events.
        assert b.link.statistics().link.messages_delivered == total
        events = [await b.link.events.receive()]
        while not (isinstance(events[-1], Gap) and events[-1].last_seq == total):
            events.append(await b.link.events.receive())
        nursery.cancel_scope.cancel()
    delivered = [e for e in events if isinstance(e, Delivered)]
    gaps = [e for e in events if isinstance(e, Gap)]
    assert isinstance(events[0], PeerUp)
    assert [e.payload for e in delivered] == [b"%d" % i for i in range(len(delivered))]
    # The first overflow is reported at once, what overflowed behind it in a second gap.
    covered = [seq for gap in gaps for seq in range(gap.first_seq, gap.last_seq + 1)]
    assert covered == list(range(len(delivered) + 1, total + 1))
    assert b.link.statistics().events_overflowed == total - len(delivered)
