"""ClusterLinks on a fake in-memory LAN with seeded loss, duplication, delay and reordering.

Every test runs under ``autojump_clock``: timers take virtual time, the tests milliseconds.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from trio_chat._link import EVENT_BUFFER, ClusterLink, LinkConfig
from trio_chat._link_packet import Data, PacketCodec
from trio_chat._link_state import Delivered, Gap, LinkEvent, PeerDown, PeerStatus, PeerUp

SECRET = b"fakelan secret, 32 bytes long..."
CLUSTER = "fakelan"
#: (sender, receiver, datagram) -> drop it?
Filter = Callable[[str, str, bytes], bool]


def wall_ms() -> int:
    """An incarnation that follows virtual time, as the links' clocks do."""
    return int((time.time() + trio.current_time()) * 1000)


def data_of(datagram: bytes) -> Data | None:
    """The data fragment in a datagram, opened as any cluster member could."""
    observer = PacketCodec(secret=SECRET, cluster_id=CLUSTER, node_id="observer", incarnation=1)
    message = observer.open_untrusted(datagram).message
    return message if isinstance(message, Data) else None


class FakeEndpoint:
    """One node's datagram socket on the fake LAN (a ``DatagramTransport``)."""

    def __init__(self, lan: FakeLan, name: str) -> None:
        self.lan, self.name = lan, name
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
    """A multicast segment: every datagram goes to every endpoint, including its sender."""

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
        self._rng = random.Random(seed)
        self.loss, self.duplicate, self.max_delay = loss, duplicate, max_delay
        self.endpoints: dict[str, FakeEndpoint] = {}
        self.filter: Filter = lambda sender, receiver, data: False
        #: (virtual time, sender, datagram) of every transmission.
        self.log: list[tuple[float, str, bytes]] = []
        #: (sender, receiver) -> virtual time of the last datagram that arrived.
        self.last_arrival: dict[tuple[str, str], float] = {}
        self.overflows = 0

    def endpoint(self, name: str) -> FakeEndpoint:
        self.endpoints[name] = FakeEndpoint(self, name)
        return self.endpoints[name]

    def transmit(self, sender: str, data: bytes) -> None:
        self.log.append((trio.current_time(), sender, data))
        for receiver in list(self.endpoints.values()):
            if self.filter(sender, receiver.name, data):
                continue
            copies = 2 if self._rng.random() < self.duplicate else 1
            for _ in range(copies):
                if receiver.name != sender and self._rng.random() < self.loss:
                    continue
                delay = self._rng.uniform(0, self.max_delay)
                self._nursery.start_soon(self._arrive, delay, sender, receiver, data)

    def inject(self, data: bytes) -> None:
        """A datagram from outside the cluster (an attacker, another cluster)."""
        for receiver in self.endpoints.values():
            receiver.deliver(data)

    async def _arrive(self, delay: float, sender: str, receiver: FakeEndpoint, data: bytes) -> None:
        await trio.sleep(delay)
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
    rng = random.Random(1)
    sent: dict[str, list[bytes]] = defaultdict(list)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            lan = FakeLan(nursery, seed=2, loss=0.2, duplicate=0.05, max_delay=0.01)
            nodes = [await start_node(nursery, lan, f"n{i}") for i in range(4)]

            async def talk(node: Node) -> None:
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
            await trio.sleep(1.5)
            old = c.link.statistics().link
            c.crash()
            await trio.sleep(2.0)
            lan.filter = lambda s, r, d: False
            c2 = await start_node(nursery, lan, "c", incarnation=wall_ms())
            await a.wait_for(lambda: len(a.of(PeerUp)) == 3)
            c2.link.broadcast(b"after")
            a.link.broadcast(b"welcome back")
            await a.wait_for(lambda: a.delivered("c") == [b"before", b"after"])
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
