"""What one node knows of one incarnation of another, and in-order delivery of its data.

Theory of operation
-------------------
Pure: no trio, no sockets, no clock; time enters as ``now``. The state machine
(`trio_chat.link._state`) owns the peers, their membership (status, timers, replay
window) and the counters; this module is the receiving half of the link, per sender
incarnation. Invariants:
- ``next_expected - 1`` is the last sequence delivered or given up; fragments are
  delivered in sequence order, each at most once (``pending`` holds only sequences
  ``>= next_expected``);
- a sequence is given up only when it cannot be repaired any more (the sender's
  ``low_seq`` passed it, the sender left, died or restarted), and then exactly one ``Gap``
  covers it;
- missing sequences below ``known_high`` are NAKed after ``reorder_hold``, then with
  doubling intervals; another receiver's NAK for the same loss postpones ours
  (suppression, since the repair is multicast to all of us);
- a peer's data is held until its first heartbeat says where to start: from 1 if it
  started after us (we were there for all of it), else after its ``high_seq``.

The methods return the events they produce, in order; the state machine queues and
counts them.
"""

from __future__ import annotations

from ._events import Delivered, Gap, LinkSettings, PeerStatus
from ._packet import MAX_NAK_RANGES, Data, Nak, ReplayWindow


class Peer:
    """What we know of one incarnation of another node."""

    def __init__(self, node: str, incarnation: int, now: float, settings: LinkSettings) -> None:
        self.node = node
        self.incarnation = incarnation
        self.http_url = ""
        self.status = PeerStatus.JOINING
        self.last_heard = now
        self.ping_at = now
        self.window = ReplayWindow()
        self.next_expected = 1
        self.known_high = 0
        self.pending: dict[int, Data] = {}
        self.nak_at: float | None = None
        self.nak_interval = settings.nak_interval
        self.frags: list[bytes] = []
        self.frag_first_seq = 0
        #: What this peer acked of *our* current incarnation.
        self.acked_us = 0
        self._settings = settings

    def join(self, high_seq: int, our_incarnation: int) -> None:
        """Decide where delivery starts, from the peer's first heartbeat (see above)."""
        start = 1
        if self.incarnation < our_incarnation:
            start = min([high_seq + 1, *self.pending])
        self.next_expected = start
        self.pending = {seq: d for seq, d in self.pending.items() if seq >= start}
        self.known_high = max([start - 1, *self.pending])

    def drain(self, now: float) -> list[Delivered]:
        """Deliver what is in order, then arm or disarm the NAK timer."""
        delivered: list[Delivered] = []
        progressed = False
        while self.next_expected in self.pending:
            delivered += self.deliver(self.pending.pop(self.next_expected))
            progressed = True
        if self.known_high < self.next_expected:
            self.nak_at = None
            self.nak_interval = self._settings.nak_interval
            return delivered
        if progressed:
            self.nak_interval = self._settings.nak_interval
        if self.nak_at is None:
            self.nak_at = now + self._settings.reorder_hold
        return delivered

    def deliver(self, data: Data) -> list[Delivered]:
        """Take the next fragment in order; a message is delivered with its last fragment."""
        self.next_expected = data.seq + 1
        if data.frag_index == 0:
            self.frags = [data.chunk]
            self.frag_first_seq = data.seq
        elif self.frags and data.frag_index == len(self.frags):
            self.frags.append(data.chunk)
        else:
            # The start of this message was given up in a Gap that covers it already.
            self.frags = []
            return []
        if len(self.frags) == data.frag_count:
            payload = b"".join(self.frags)
            self.frags = []
            return [Delivered(self.node, payload, self.incarnation, data.seq)]
        return []

    def skip_to(self, upto: int) -> list[Delivered | Gap]:
        """Give up everything below ``upto`` that is missing; deliver what we have."""
        events: list[Delivered | Gap] = []
        for seq in sorted(s for s in self.pending if s < upto):
            if seq > self.next_expected:
                events.append(self._gap(self.next_expected, seq - 1))
            events += self.deliver(self.pending.pop(seq))
        if upto > self.next_expected:
            events.append(self._gap(self.next_expected, upto - 1))
            self.next_expected = upto
        return events

    def nak(self, now: float) -> Nak | None:
        """The NAK of what is missing (None: nothing is), and the timer's next turn."""
        limit = min(self.known_high, self.next_expected + self._settings.receive_window - 1)
        ranges: list[tuple[int, int]] = []
        expect = self.next_expected
        for seq in sorted(s for s in self.pending if s <= limit):
            if seq > expect:
                ranges.append((expect, seq - 1))
            expect = seq + 1
            if len(ranges) == MAX_NAK_RANGES:
                break
        if expect <= limit and len(ranges) < MAX_NAK_RANGES:
            ranges.append((expect, limit))
        self.nak_at = now + self.nak_interval
        self.nak_interval = min(2 * self.nak_interval, self._settings.nak_interval_max)
        return Nak(self.node, self.incarnation, ranges) if ranges else None

    def _gap(self, first: int, last: int) -> Gap:
        if self.frags:
            # The partly received message is lost with the gap: report its start too.
            first = self.frag_first_seq
            self.frags = []
        return Gap(self.node, self.incarnation, first, last)
