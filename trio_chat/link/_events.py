"""What the cluster link tells its user: events, peer states, settings and statistics.

Pure data (frozen dataclasses and an enum), shared by the state machine (`_state`),
the trio shell (`_socket`) and the node's cluster glue.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .._errors import ConfigError

#: The largest payload one `broadcast` may carry (fragmented on the wire).
MAX_PAYLOAD: Final = 64 * 1024


class PeerStatus(enum.Enum):
    #: Authenticated packets seen, no heartbeat yet: its data waits.
    JOINING = "joining"
    #: Heard within ``suspect_after``.
    ALIVE = "alive"
    #: Silent for ``suspect_after``: pinged.
    SUSPECT = "suspect"
    #: Silent for ``dead_after``; kept so that it can come back without losing its place.
    DEAD = "dead"
    #: Said goodbye; this incarnation will not come back.
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Delivered:
    """A payload broadcast by ``origin``, delivered in order and exactly once."""

    origin: str
    payload: bytes
    #: The origin's incarnation and the sequence of the payload's last fragment.
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class PeerUp:
    node: str
    incarnation: int
    http_url: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    node: str
    #: "left", "dead" or "restarted".
    reason: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Sequences of ``origin`` that can no longer be repaired: heal them from history.

    Every message with a fragment in ``[first_seq, last_seq]`` is lost to this node.
    """

    origin: str
    incarnation: int
    first_seq: int
    last_seq: int


LinkEvent = Delivered | PeerUp | PeerDown | Gap


@dataclass(frozen=True, slots=True)
class PeerInfo:
    node: str
    incarnation: int
    http_url: str
    status: PeerStatus
    last_heard: float


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Timers (seconds) and bounds of the link."""

    heartbeat_interval: float = 1.0
    suspect_after: float = 5.0
    dead_after: float = 6.5
    ping_interval: float = 0.5
    #: LAN reordering is well under a millisecond; 20 ms avoids NAKing what is in flight.
    reorder_hold: float = 0.02
    nak_interval: float = 0.05
    nak_interval_max: float = 1.0
    #: A fragment repaired this recently is not repaired again: other receivers' NAKs of
    #: the same loss are answered by the same multicast repair.
    repair_holdoff: float = 0.02
    #: Accepted difference between a new incarnation's packet time and our clock.
    max_clock_skew: float = 30.0
    buffer_packets: int = 8192
    buffer_bytes: int = 8 * 1024 * 1024
    #: Out-of-order fragments held per sender (and the furthest ahead we accept).
    receive_window: int = 4096
    max_peers: int = 256
    max_repairs_per_nak: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.suspect_after < self.dead_after:
            raise ConfigError("need 0 < heartbeat_interval < suspect_after < dead_after")
        if min(self.buffer_packets, self.receive_window, self.max_peers) < 1:
            raise ConfigError("buffer_packets, receive_window and max_peers must be positive")
        if self.buffer_bytes < MAX_PAYLOAD:
            raise ConfigError(f"buffer_bytes must hold one {MAX_PAYLOAD}-byte payload")


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    peers: int
    buffer_packets: int
    buffer_bytes: int
    reorder_packets: int
    packets_sent: int
    #: Every datagram in; the refused ones are also in ``packets_dropped`` and one of the
    #: reasons (foreign, forged, replayed, stale, malformed, overflow).
    packets_received: int
    packets_dropped: int
    packets_foreign: int
    packets_forged: int
    packets_replayed: int
    packets_stale: int
    packets_malformed: int
    packets_overflow: int
    #: Our own packets, back through multicast loop: proves the group works on this host.
    packets_looped_back: int
    duplicates: int
    naks_sent: int
    naks_received: int
    repairs_sent: int
    gaps: int
    gap_seqs: int
    fragments_sent: int
    fragments_received: int
    messages_sent: int
    messages_delivered: int
    buffer_evictions: int
