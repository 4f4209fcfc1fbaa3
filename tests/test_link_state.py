"""The cluster link's state machine, driven synchronously with a hand-moved clock."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_chat._errors import ConfigError
from trio_chat.link._events import (
    MAX_PAYLOAD,
    Delivered,
    Gap,
    LinkEvent,
    LinkSettings,
    PeerDown,
    PeerStatus,
    PeerUp,
)
from trio_chat.link._packet import MAX_PACKET_SIZE, Data, Heartbeat, PacketCodec
from trio_chat.link._state import LinkState

SECRET = b"0123456789abcdef0123456789abcdef"
START = 1_700_000_000.0
#: (sender, receiver, datagram) -> drop it?
Dropper = Callable[[str, str, bytes], bool]


def never(_sender: str, _receiver: str, _data: bytes) -> bool:
    return False


class Net:
    """Nodes wired together in memory; every datagram reaches every node (and loops back)."""

    def __init__(self, settings: LinkSettings | None = None) -> None:
        self.now = START
        self.settings = settings or LinkSettings()
        self.nodes: dict[str, LinkState] = {}
        self.events: dict[str, list[LinkEvent]] = {}
        self.drop: Dropper = never
        self.wire: list[tuple[str, bytes]] = []

    def add(self, name: str, incarnation: int | None = None, **settings: float) -> LinkState:
        incarnation = incarnation or int(self.now * 1000)
        codec = PacketCodec(secret=SECRET, cluster_id="test", node_id=name, incarnation=incarnation)
        self.nodes[name] = LinkState(
            codec=codec,
            node_id=name,
            incarnation=incarnation,
            http_url=f"http://{name}",
            now=self.now,
            settings=replace(self.settings, **settings),
        )
        self.events.setdefault(name, [])
        self.flush()
        return self.nodes[name]

    def flush(self) -> None:
        """Carry datagrams until none are left (each hop at the same instant)."""
        moving = True
        while moving:
            moving = False
            for name, node in list(self.nodes.items()):
                for data in node.datagrams_to_send():
                    moving = True
                    self.wire.append((name, data))
                    for other, receiver in list(self.nodes.items()):
                        if not self.drop(name, other, data):
                            receiver.receive_datagram_untrusted(data, self.now)
            for name, node in self.nodes.items():
                self.events[name].extend(node.take_events())

    def run_until(self, until: float) -> None:
        """Advance the clock, ticking each node at its deadlines."""
        while True:
            due = min(node.next_deadline() for node in self.nodes.values())
            if due > until:
                break
            self.now = max(self.now, due)
            for node in list(self.nodes.values()):
                if node.next_deadline() <= self.now:
                    node.tick(self.now)
            self.flush()
        self.now = until

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def delivered(self, name: str, origin: str | None = None) -> list[bytes]:
        return [
            e.payload
            for e in self.events[name]
            if isinstance(e, Delivered) and origin in (None, e.origin)
        ]

    def of(self, name: str, kind: type[LinkEvent]) -> list[LinkEvent]:
        return [e for e in self.events[name] if isinstance(e, kind)]


def two_nodes() -> Net:
    net = Net()
    net.add("a")
    net.now += 0.001
    net.add("b")
    net.run_for(0.1)  # a answers b's hello 50 ms after its own.
    return net


def test_hello_makes_peers_up_at_once() -> None:
    net = two_nodes()
    assert net.of("a", PeerUp) == [PeerUp("b", int((START + 0.001) * 1000), "http://b")]
    assert net.of("b", PeerUp) == [PeerUp("a", int(START * 1000), "http://a")]
    assert [p.status for p in net.nodes["a"].peers()] == [PeerStatus.ALIVE]


def test_in_order_exactly_once_with_fragments() -> None:
    net = two_nodes()
    big = random.Random(0).randbytes(MAX_PAYLOAD)
    for payload in (b"one", big, b"", b"three"):
        net.nodes["a"].broadcast(payload, net.now)
    net.flush()
    assert net.delivered("b") == [b"one", big, b"", b"three"]
    stats = net.nodes["a"].statistics()
    assert stats.messages_sent == 4
    assert stats.fragments_sent > 60
    assert all(len(data) <= MAX_PACKET_SIZE for _, data in net.wire)
    with pytest.raises(ValueError, match="at most"):
        net.nodes["a"].broadcast(bytes(MAX_PAYLOAD + 1), net.now)


def test_lost_fragments_are_repaired_after_the_reorder_hold() -> None:
    net = two_nodes()
    lost = {3, 4}
    net.drop = lambda s, r, d: r == "b" and _seq(d) in lost and not _is_repair(d)
    for i in range(6):
        net.nodes["a"].broadcast(b"m%d" % i, net.now)
    net.flush()
    assert net.delivered("b") == [b"m0", b"m1"]
    net.run_for(0.015)
    assert net.nodes["b"].statistics().naks_sent == 0
    net.run_for(0.01)
    assert net.delivered("b") == [b"m%d" % i for i in range(6)]
    assert net.nodes["b"].statistics().naks_sent == 1
    assert net.nodes["a"].statistics().repairs_sent == 2


def test_tail_loss_is_found_by_the_heartbeat() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: r == "b" and _seq(d) == 1 and not _is_repair(d)
    net.nodes["a"].broadcast(b"last words", net.now)
    net.flush()
    assert net.delivered("b") == []
    net.run_for(1.1)
    assert net.delivered("b") == [b"last words"]


def test_naks_back_off_while_the_loss_persists() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: r == "b" and _seq(d) == 1  # Repairs too.
    net.nodes["a"].broadcast(b"x", net.now)
    net.nodes["a"].broadcast(b"y", net.now)
    net.flush()
    start = net.now
    # Reorder hold 20 ms, then 50, 100, 200, 400 ms between NAKs.
    for offset, naks in [
        (0.019, 0),
        (0.021, 1),
        (0.069, 1),
        (0.071, 2),
        (0.169, 2),
        (0.171, 3),
        (0.369, 3),
        (0.371, 4),
        (0.769, 4),
        (0.771, 5),
    ]:
        net.run_until(start + offset)
        assert net.nodes["b"].statistics().naks_sent == naks, offset


def test_another_receivers_nak_suppresses_ours() -> None:
    net = two_nodes()
    net.add("c")
    net.run_for(0.1)
    net.drop = lambda s, r, d: (
        (r in "bc" and _seq(d) == 1 and not _is_repair(d)) or (r == "c" and _seq(d) == 2)
    )
    net.nodes["a"].broadcast(b"x", net.now)
    net.nodes["a"].broadcast(b"y", net.now)
    net.flush()
    late = next(d for _, d in net.wire if _seq(d) == 2)
    net.run_for(0.005)
    net.nodes["c"].receive_datagram_untrusted(late, net.now)  # c sees the loss 5 ms after b.
    net.flush()
    net.run_for(0.1)
    assert [net.nodes[n].statistics().naks_sent for n in "bc"] == [1, 0]
    assert net.nodes["a"].statistics().repairs_sent == 1
    assert net.delivered("b") == net.delivered("c") == [b"x", b"y"]


def test_duplicates_are_delivered_once_and_replays_refused() -> None:
    net = two_nodes()
    net.nodes["a"].broadcast(b"once", net.now)
    net.flush()
    data = net.wire[-1][1]
    net.nodes["b"].receive_datagram_untrusted(data, net.now)
    assert net.delivered("b") == [b"once"]
    assert net.nodes["b"].statistics().packets_replayed == 1


def test_acks_in_heartbeats_free_the_senders_buffer() -> None:
    net = two_nodes()
    for i in range(10):
        net.nodes["a"].broadcast(b"%d" % i, net.now)
    net.flush()
    net.run_for(6.0)
    # Kept while a peer older than us may still be unheard of; released by the next acks.
    assert net.nodes["a"].statistics().buffer_packets == 10
    net.run_for(1.0)
    assert net.nodes["a"].statistics().buffer_packets == 0


def test_eviction_makes_a_gap_and_delivery_continues() -> None:
    net = Net(LinkSettings(buffer_packets=4))
    net.add("a")
    net.add("b")
    net.drop = lambda s, r, d: r == "b" and _seq(d) in (2, 3)
    for i in range(1, 9):
        net.nodes["a"].broadcast(b"%d" % i, net.now)
        assert net.nodes["a"].statistics().buffer_packets <= 4
    net.flush()
    net.run_for(2.0)
    assert net.of("b", Gap) == [Gap("a", int(START * 1000), 2, 3)]
    assert net.delivered("b") == [b"1", b"4", b"5", b"6", b"7", b"8"]
    assert net.nodes["a"].statistics().buffer_evictions == 4


def test_failure_detection_timings() -> None:
    net = two_nodes()
    net.run_for(0.5)
    last_heard = net.nodes["b"].peers()[0].last_heard
    del net.nodes["a"]  # Crashed: no goodbye.
    net.run_until(last_heard + 5.0 - 0.001)
    assert net.nodes["b"].peers()[0].status is PeerStatus.ALIVE
    net.run_until(last_heard + 5.0)
    assert net.nodes["b"].peers()[0].status is PeerStatus.SUSPECT
    net.run_until(last_heard + 6.5 - 0.001)
    assert net.of("b", PeerDown) == []
    assert net.nodes["b"].statistics().packets_sent >= 3  # Pings at 5.0, 5.5, 6.0.
    net.run_until(last_heard + 6.5)
    assert net.of("b", PeerDown) == [PeerDown("a", "dead")]
    assert net.nodes["b"].statistics().peers == 0


def test_a_ping_is_answered_and_clears_the_suspicion() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: s == "a"
    last_heard = net.nodes["b"].peers()[0].last_heard
    net.run_until(last_heard + 5.0)
    assert net.nodes["b"].peers()[0].status is PeerStatus.SUSPECT
    net.drop = never
    # a's next scheduled heartbeat is later than this: the answer to the second ping wins.
    net.run_until(last_heard + 5.5)
    assert net.nodes["b"].peers()[0].status is PeerStatus.ALIVE
    assert net.of("b", PeerDown) == []


def test_leave_reports_the_unrepairable_tail() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: r == "b" and _seq(d) == 3
    for i in range(3):
        net.nodes["a"].broadcast(b"%d" % i, net.now)
    net.nodes["a"].leave(net.now)
    net.flush()
    assert net.events["b"][-4:] == [
        Delivered("a", b"0", int(START * 1000), 1),
        Delivered("a", b"1", int(START * 1000), 2),
        Gap("a", int(START * 1000), 3, 3),
        PeerDown("a", "left"),
    ]


def test_a_restart_is_a_new_incarnation() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: r == "b" and _seq(d) == 2
    for i in range(2):
        net.nodes["a"].broadcast(b"old %d" % i, net.now)
    net.run_for(1.0)  # A heartbeat tells b that seq 2 exists; its repairs are lost too.
    del net.nodes["a"]
    net.now += 0.3
    net.drop = never
    new = net.add("a")
    new.broadcast(b"new", net.now)
    net.flush()
    old_inc, new_inc = int(START * 1000), int(net.now * 1000)
    assert net.events["b"][1:] == [
        Delivered("a", b"old 0", old_inc, 1),
        Gap("a", old_inc, 2, 2),
        PeerDown("a", "restarted"),
        PeerUp("a", new_inc, "http://a"),
        Delivered("a", b"new", new_inc, 1),
    ]


def test_a_node_returning_from_a_partition_resumes_where_it_was() -> None:
    net = two_nodes()
    net.drop = lambda s, r, d: {s, r} == {"a", "b"}
    net.nodes["a"].broadcast(b"during", net.now)
    net.run_for(7.0)
    assert net.of("a", PeerDown) == [PeerDown("b", "dead")]
    assert net.of("b", PeerDown) == [PeerDown("a", "dead")]
    net.drop = never
    net.run_for(1.1)
    assert net.delivered("b") == [b"during"]
    assert net.of("b", PeerUp)[-1] == PeerUp("a", int(START * 1000), "http://a")


def test_older_incarnations_and_stale_packets_are_refused() -> None:
    net = two_nodes()
    old = PacketCodec(secret=SECRET, cluster_id="test", node_id="a", incarnation=1)
    net.nodes["b"].receive_datagram_untrusted(old.seal(Data(1, 0, 1, b"x"), now=net.now), net.now)
    stranger = PacketCodec(secret=SECRET, cluster_id="test", node_id="z", incarnation=5)
    hello = Heartbeat("", 0, 1, True, [])
    net.nodes["b"].receive_datagram_untrusted(stranger.seal(hello, now=net.now - 60), net.now)
    stats = net.nodes["b"].statistics()
    assert (stats.packets_stale, stats.packets_dropped, stats.peers) == (2, 2, 1)
    assert net.delivered("b") == []


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="suspect_after"):
        LinkSettings(suspect_after=8.0)
    with pytest.raises(ConfigError, match="buffer_bytes"):
        LinkSettings(buffer_bytes=100)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=1300), max_size=5))
def test_random_datagrams_are_only_dropped(datagrams: list[bytes]) -> None:
    net = two_nodes()
    for data in datagrams:
        net.nodes["b"].receive_datagram_untrusted(data, net.now)
    stats = net.nodes["b"].statistics()
    assert stats.packets_dropped == len(datagrams)
    assert net.nodes["b"].take_events() == []


@settings(max_examples=200)
@given(st.integers(0, 30), st.integers(0, 1200), st.integers(0, 255), st.integers(0, 1300))
def test_mutated_datagrams_are_dropped_or_harmless(
    which: int, position: int, value: int, cut: int
) -> None:
    net = two_nodes()
    net.wire.clear()  # Keep only packets b has received.
    net.nodes["a"].broadcast(bytes(3000), net.now)
    net.run_for(1.0)
    original = net.wire[which % len(net.wire)][1]
    mutated = bytearray(original)
    mutated[position % len(mutated)] = value
    before = net.nodes["b"].statistics()
    net.nodes["b"].receive_datagram_untrusted(bytes(mutated[:cut]), net.now)
    after = net.nodes["b"].statistics()
    # Every mutation is refused; an unchanged packet is a replay or our own loopback.
    assert after.packets_dropped + after.packets_looped_back == (
        before.packets_dropped + before.packets_looped_back + 1
    )
    assert net.nodes["b"].take_events() == []


def _opened(data: bytes) -> Data | Heartbeat | None:
    message = PacketCodec(
        secret=SECRET, cluster_id="test", node_id="observer", incarnation=1
    ).open_untrusted(data)
    return message.message if isinstance(message.message, Data | Heartbeat) else None


def _seq(data: bytes) -> int:
    message = _opened(data)
    return message.seq if isinstance(message, Data) else 0


def _is_repair(data: bytes) -> bool:
    message = _opened(data)
    return isinstance(message, Data) and message.repair
