"""The cluster link's state machine: datagrams and timer ticks in, datagrams and events out.

Theory of operation
-------------------
Pure: no trio, no sockets, no clock. Time enters as ``now`` (seconds, Unix epoch) and the
shell calls ``tick(now)`` at ``next_deadline()``. Everything is multicast to the whole
group; packets come from ``_packet`` (authenticated, at most 1200 bytes).

Sending. Each broadcast is cut into fragments, one sequence number each (1, 2, ...), kept in
a retransmit buffer that always holds a contiguous range ``[low_seq, next_seq)``. The buffer
is bounded (packets and bytes): ``broadcast`` never waits; it evicts the oldest fragment.
A fragment leaves the buffer early once every live peer acked it, but not before we have
run for ``dead_after``: a peer that started before us expects our data from sequence 1,
and until then it may be alive without our having heard it yet. Heartbeats (every
``heartbeat_interval``) carry ``high_seq`` (tail loss shows as a gap), ``low_seq`` (what
is below is gone) and acks of what we delivered from each peer.

Receiving, per sender incarnation: in-order delivery, gaps and NAKs are `_peer`'s (its
theory of operation states their invariants); this module feeds it packets and timer
ticks, and queues and counts what it delivers.

Membership. A node is known after an authenticated, fresh packet and up after its first
heartbeat (``PeerUp``). Silent for ``suspect_after``: suspect, pinged every
``ping_interval``; silent for ``dead_after``: dead (``PeerDown``). A newer incarnation of a
node replaces the old one ("restarted"); an older one is refused. ``Leave`` says goodbye.

Security. Nothing unauthenticated creates or changes state: only a packet that opened
under the cluster key and, for an unknown incarnation, was fresh, creates a peer; its replay
window then refuses repeats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Final, Literal

from .._errors import BadPacket
from ._events import (
    MAX_PAYLOAD,
    Delivered,
    Gap,
    LinkEvent,
    LinkSettings,
    LinkStatistics,
    PeerDown,
    PeerInfo,
    PeerStatus,
    PeerUp,
)
from ._packet import (
    MAX_ACKS,
    Ack,
    Data,
    ForeignPacket,
    ForgedPacket,
    Heartbeat,
    Leave,
    Message,
    Nak,
    PacketCodec,
    Ping,
    is_fresh,
)
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Immediate heartbeats (answers to hellos, pings, NAKs of evicted data) are at least this
#: far apart, so a flood of requests cannot turn into a flood of heartbeats.
_MIN_HEARTBEAT_GAP: Final = 0.05
#: An ack entry's encoded size beyond its node id (array header, two 9-byte integers).
_ACK_OVERHEAD: Final = 22


_LIVE: Final = (PeerStatus.ALIVE, PeerStatus.SUSPECT)
_DropReason = Literal[
    "packets_foreign",
    "packets_forged",
    "packets_replayed",
    "packets_stale",
    "packets_malformed",
    "packets_overflow",
]


@dataclass
class _Counters:
    packets_sent: int = 0
    packets_received: int = 0
    packets_dropped: int = 0
    packets_foreign: int = 0
    packets_forged: int = 0
    packets_replayed: int = 0
    packets_stale: int = 0
    packets_malformed: int = 0
    packets_overflow: int = 0
    packets_looped_back: int = 0
    duplicates: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    repairs_sent: int = 0
    gaps: int = 0
    gap_seqs: int = 0
    fragments_sent: int = 0
    fragments_received: int = 0
    messages_sent: int = 0
    messages_delivered: int = 0
    buffer_evictions: int = 0


class _Sent:
    __slots__ = ("data", "repaired_at")

    def __init__(self, data: Data) -> None:
        self.data = data
        self.repaired_at = -math.inf


class LinkState:
    """One node's side of the cluster link.

    Args:
        codec: seals our packets and opens our peers'.
        node_id: our node id (as in the codec).
        incarnation: our incarnation (as in the codec).
        http_url: our HTTP address, advertised in heartbeats for healing.
        now: the current time; a hello is queued at once.
        settings: timers and bounds.
    """

    def __init__(
        self,
        *,
        codec: PacketCodec,
        node_id: str,
        incarnation: int,
        http_url: str,
        now: float,
        settings: LinkSettings,
    ) -> None:
        self._codec = codec
        self._node_id = node_id
        self._incarnation = incarnation
        self._http_url = http_url
        self._settings = settings
        self._peers: dict[str, Peer] = {}
        self._buffer: dict[int, _Sent] = {}
        self._buffer_bytes = 0
        self._low_seq = 1
        self._next_seq = 1
        self._outbox: list[bytes] = []
        self._events: list[LinkEvent] = []
        self._c = _Counters()
        self._ack_cursor = 0
        self._last_heartbeat = -math.inf
        self._release_after = now + settings.dead_after
        self._heartbeat_at = now
        self._send_heartbeat(now, hello=True)

    # -- outputs ------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Take the datagrams queued since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    def take_events(self) -> list[LinkEvent]:
        """Take the events produced since the last call, in order."""
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float:
        """When ``tick`` must be called next (it may be in the past)."""
        deadline = self._heartbeat_at
        s = self._settings
        for peer in self._peers.values():
            if peer.status is PeerStatus.JOINING:
                deadline = min(deadline, peer.last_heard + s.dead_after)
            elif peer.status is PeerStatus.ALIVE:
                deadline = min(deadline, peer.last_heard + s.suspect_after)
            elif peer.status is PeerStatus.SUSPECT:
                deadline = min(deadline, peer.ping_at, peer.last_heard + s.dead_after)
            if peer.nak_at is not None:
                deadline = min(deadline, peer.nak_at)
        return deadline

    def peers(self) -> list[PeerInfo]:
        """The nodes we know, sorted by node id."""
        return [
            PeerInfo(p.node, p.incarnation, p.http_url, p.status, p.last_heard)
            for p in sorted(self._peers.values(), key=lambda p: p.node)
        ]

    def statistics(self) -> LinkStatistics:
        """Counters since start, and the current peer count and buffer sizes."""
        return LinkStatistics(
            peers=sum(p.status in _LIVE for p in self._peers.values()),
            buffer_packets=len(self._buffer),
            buffer_bytes=self._buffer_bytes,
            reorder_packets=sum(len(p.pending) for p in self._peers.values()),
            **asdict(self._c),
        )

    # -- inputs -------------------------------------------------------------------------

    def broadcast(self, payload: bytes, now: float) -> None:
        """Send ``payload`` to every peer, reliably while it stays in our buffer.

        Raises:
            ValueError: the payload is larger than 64 KiB (a bug of the caller).
        """
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"link payloads are at most {MAX_PAYLOAD} bytes")
        size = self._codec.max_chunk
        count = max(1, math.ceil(len(payload) / size))
        for index in range(count):
            data = Data(self._next_seq, index, count, payload[index * size : (index + 1) * size])
            self._next_seq += 1
            self._buffer[data.seq] = _Sent(data)
            self._buffer_bytes += len(data.chunk)
            self._send(data, now)
        self._c.messages_sent += 1
        self._c.fragments_sent += count
        s = self._settings
        while len(self._buffer) > s.buffer_packets or self._buffer_bytes > s.buffer_bytes:
            self._pop_oldest()
            self._c.buffer_evictions += 1

    def leave(self, now: float) -> None:
        """Queue the goodbye packet; nothing else may be sent after it."""
        self._send(Leave(self._next_seq - 1), now)

    def tick(self, now: float) -> None:
        """Run the timers that are due: heartbeats, failure detection, NAKs."""
        s = self._settings
        if now >= self._heartbeat_at:
            self._send_heartbeat(now, hello=False)
        # Each test compares ``now`` with the very sum ``next_deadline`` returns: a tick at
        # that deadline must act, or the shell would wake up again at once, forever.
        for peer in list(self._peers.values()):
            dead = now >= peer.last_heard + s.dead_after
            if peer.status is PeerStatus.JOINING and dead:
                del self._peers[peer.node]
                continue
            if peer.status in _LIVE and dead:
                self._end(peer, PeerStatus.DEAD, "dead", now)
            elif peer.status in _LIVE and now >= peer.last_heard + s.suspect_after:
                peer.status = PeerStatus.SUSPECT
                if now >= peer.ping_at:
                    peer.ping_at = now + s.ping_interval
                    self._send(Ping(peer.node, peer.incarnation), now)
            if peer.nak_at is not None and now >= peer.nak_at:
                self._send_nak(peer, now)

    def receive_datagram_untrusted(self, data: bytes, now: float) -> None:
        """Handle one datagram from the network; bad ones are dropped and counted."""
        self._c.packets_received += 1
        if self._codec.is_own_untrusted(data):
            # One of ours, looped back: not worth decrypting (a datagram per message).
            self._c.packets_looped_back += 1
            return
        try:
            packet = self._codec.open_untrusted(data)
        except ForeignPacket:
            self._drop("packets_foreign")
            return
        except ForgedPacket:
            self._drop("packets_forged")
            return
        except BadPacket:
            self._drop("packets_malformed")
            return
        header, message = packet.header, packet.message
        if header.node_id == self._node_id:
            if header.incarnation == self._incarnation:
                self._c.packets_looped_back += 1
            else:
                self._drop("packets_stale")
            return
        peer = self._peers.get(header.node_id)
        if peer is None or header.incarnation > peer.incarnation:
            peer = self._admit(header.node_id, header.incarnation, packet.sent_ms, now)
            if peer is None:
                return
        elif header.incarnation < peer.incarnation:
            self._drop("packets_stale")
            return
        if not peer.window.accept(header.counter):
            self._drop("packets_replayed")
            return
        if peer.status is PeerStatus.LEFT:
            self._drop("packets_stale")
            return
        peer.last_heard = now
        if peer.status is PeerStatus.SUSPECT:
            peer.status = PeerStatus.ALIVE
        elif peer.status is PeerStatus.DEAD:
            # Back from a partition with the same incarnation: it resumes where it was.
            peer.status = PeerStatus.ALIVE
            self._events.append(PeerUp(peer.node, peer.incarnation, peer.http_url))
        self._handle(peer, message, now)

    # -- receiving ----------------------------------------------------------------------

    def _drop(self, reason: _DropReason) -> None:
        self._c.packets_dropped += 1
        setattr(self._c, reason, getattr(self._c, reason) + 1)

    def _admit(self, node: str, incarnation: int, sent_ms: int, now: float) -> Peer | None:
        """Create the state of an incarnation we have not seen, if it may be trusted."""
        skew = self._settings.max_clock_skew
        if not is_fresh(sent_ms, now, skew) or incarnation / 1000 > now + skew:
            self._drop("packets_stale")
            return None
        old = self._peers.pop(node, None)
        if old is not None and old.status in _LIVE:
            self._emit(old.skip_to(old.known_high + 1))
            self._events.append(PeerDown(node, "restarted"))
        if old is None and len(self._peers) >= self._settings.max_peers:
            gone = [p for p in self._peers.values() if p.status not in _LIVE]
            if not gone:
                self._drop("packets_overflow")
                return None
            del self._peers[min(gone, key=lambda p: p.last_heard).node]
        peer = self._peers[node] = Peer(node, incarnation, now, self._settings)
        return peer

    def _handle(self, peer: Peer, message: Message, now: float) -> None:
        if isinstance(message, Data):
            self._on_data(peer, message, now)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(peer, message, now)
        elif isinstance(message, Nak):
            self._on_nak(message, now)
        elif isinstance(message, Ping):
            if message.target == self._node_id and message.incarnation == self._incarnation:
                self._heartbeat_soon(now)
        elif peer.status is PeerStatus.JOINING:
            del self._peers[peer.node]
        else:
            peer.known_high = max(peer.known_high, message.high_seq)
            self._end(peer, PeerStatus.LEFT, "left", now)

    def _on_data(self, peer: Peer, data: Data, now: float) -> None:
        self._c.fragments_received += 1
        if data.seq < peer.next_expected or data.seq in peer.pending:
            self._c.duplicates += 1
            return
        if len(peer.pending) >= self._settings.receive_window or (
            peer.status is not PeerStatus.JOINING
            and data.seq >= peer.next_expected + self._settings.receive_window
        ):
            self._drop("packets_overflow")
            return
        peer.pending[data.seq] = data
        if peer.status is not PeerStatus.JOINING:
            peer.known_high = max(peer.known_high, data.seq)
            self._emit(peer.drain(now))

    def _on_heartbeat(self, peer: Peer, hb: Heartbeat, now: float) -> None:
        peer.http_url = hb.http_url
        if peer.status is PeerStatus.JOINING:
            peer.join(hb.high_seq, self._incarnation)
            peer.status = PeerStatus.ALIVE
            self._events.append(PeerUp(peer.node, peer.incarnation, peer.http_url))
        if hb.hello:
            self._heartbeat_soon(now)
        peer.known_high = max(peer.known_high, hb.high_seq)
        if hb.low_seq > peer.next_expected:
            self._emit(peer.skip_to(hb.low_seq))
        for ack in hb.acks:
            if ack.node == self._node_id and ack.incarnation == self._incarnation:
                peer.acked_us = max(peer.acked_us, ack.delivered)
        self._release(now)
        self._emit(peer.drain(now))

    def _on_nak(self, nak: Nak, now: float) -> None:
        if nak.target != self._node_id or nak.incarnation != self._incarnation:
            # Someone else's NAK: if it covers our first missing sequence, the repair it
            # asks for will reach us too, so we hold ours back.
            other = self._peers.get(nak.target)
            if (
                other is not None
                and other.incarnation == nak.incarnation
                and other.nak_at is not None
                and any(first <= other.next_expected <= last for first, last in nak.ranges)
            ):
                other.nak_at = max(other.nak_at, now + other.nak_interval)
            return
        self._c.naks_received += 1
        budget = self._settings.max_repairs_per_nak
        for first, last in nak.ranges:
            if first < self._low_seq:
                # Evicted: our next heartbeat's low_seq tells them it is gone for good.
                self._heartbeat_soon(now)
            for seq in range(max(first, self._low_seq), min(last, self._next_seq - 1) + 1):
                if budget == 0:
                    return
                sent = self._buffer[seq]
                if now - sent.repaired_at >= self._settings.repair_holdoff:
                    sent.repaired_at = now
                    budget -= 1
                    self._c.repairs_sent += 1
                    d = sent.data
                    self._send(Data(d.seq, d.frag_index, d.frag_count, d.chunk, True), now)

    def _emit(self, events: Sequence[Delivered | Gap]) -> None:
        """Queue what a peer's delivery produced, in order, and count it."""
        for event in events:
            if isinstance(event, Delivered):
                self._c.messages_delivered += 1
            else:
                self._c.gaps += 1
                self._c.gap_seqs += event.last_seq - event.first_seq + 1
            self._events.append(event)

    def _end(self, peer: Peer, status: PeerStatus, reason: str, now: float) -> None:
        self._emit(peer.skip_to(peer.known_high + 1))
        peer.status = status
        peer.nak_at = None
        self._events.append(PeerDown(peer.node, reason))
        self._release(now)

    # -- sending ------------------------------------------------------------------------

    def _send(self, message: Message, now: float) -> None:
        self._outbox.append(self._codec.seal(message, now=now))
        self._c.packets_sent += 1

    def _pop_oldest(self) -> None:
        sent = self._buffer.pop(self._low_seq)
        self._buffer_bytes -= len(sent.data.chunk)
        self._low_seq += 1

    def _release(self, now: float) -> None:
        """Free what every live peer has acked; with no live peer, keep what we can."""
        if now < self._release_after:
            return
        acks = [p.acked_us for p in self._peers.values() if p.status in _LIVE]
        upto = min(acks, default=0)
        while self._low_seq <= upto and self._low_seq < self._next_seq:
            self._pop_oldest()

    def _heartbeat_soon(self, now: float) -> None:
        self._heartbeat_at = min(
            self._heartbeat_at, max(now, self._last_heartbeat + _MIN_HEARTBEAT_GAP)
        )

    def _send_heartbeat(self, now: float, *, hello: bool) -> None:
        high, low = self._next_seq - 1, self._low_seq
        room = self._codec.body_budget - self._codec.encoded_size(
            int(now * 1000), Heartbeat(self._http_url, high, low, hello, [])
        )
        # Acks rotate through the peers when they do not all fit in one packet.
        joined = [p for p in self._peers.values() if p.status in _LIVE]
        acks: list[Ack] = []
        for i in range(len(joined)):
            peer = joined[(self._ack_cursor + i) % len(joined)]
            room -= len(peer.node.encode()) + _ACK_OVERHEAD
            if room < 0 or len(acks) == MAX_ACKS:
                break
            acks.append(Ack(peer.node, peer.incarnation, peer.next_expected - 1))
        self._ack_cursor += len(acks)
        self._send(Heartbeat(self._http_url, high, low, hello, acks), now)
        self._last_heartbeat = now
        self._heartbeat_at = now + self._settings.heartbeat_interval

    def _send_nak(self, peer: Peer, now: float) -> None:
        nak = peer.nak(now)
        if nak is not None:
            self._c.naks_sent += 1
            self._send(nak, now)
