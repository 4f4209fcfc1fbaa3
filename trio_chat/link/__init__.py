"""The multicast cluster link: pure packet codec, events and state machine; the trio socket shell."""

from __future__ import annotations

from ._diag import run_cluster_check as run_cluster_check
from ._events import Delivered as Delivered
from ._events import Gap as Gap
from ._events import LinkEvent as LinkEvent
from ._events import LinkSettings as LinkSettings
from ._events import LinkStatistics as LinkStatistics
from ._events import PeerDown as PeerDown
from ._events import PeerInfo as PeerInfo
from ._events import PeerStatus as PeerStatus
from ._events import PeerUp as PeerUp
from ._packet import PacketCodec as PacketCodec
from ._socket import ClusterLink as ClusterLink
from ._socket import LinkConfig as LinkConfig
from ._socket import MulticastTransport as MulticastTransport
from ._socket import new_incarnation as new_incarnation
from ._state import LinkState as LinkState

__all__ = [
    "ClusterLink",
    "Delivered",
    "Gap",
    "LinkConfig",
    "LinkEvent",
    "LinkSettings",
    "LinkState",
    "LinkStatistics",
    "MulticastTransport",
    "PacketCodec",
    "PeerDown",
    "PeerInfo",
    "PeerStatus",
    "PeerUp",
    "new_incarnation",
    "run_cluster_check",
]
