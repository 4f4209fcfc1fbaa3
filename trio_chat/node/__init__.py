"""The node: its parts (history, names, presence, cluster over a bus), the store, identity."""

from __future__ import annotations

from ._bus import Bus as Bus
from ._cluster import Cluster as Cluster
from ._history import History as History
from ._identity import NodeIdentity as NodeIdentity
from ._identity import claim_identity as claim_identity
from ._multicast import MulticastBus as MulticastBus
from ._multicast import link_config as link_config
from ._names import Names as Names
from ._node import Node as Node
from ._node import open_store as open_store
from ._peer_http import cluster_secret as cluster_secret
from ._presence import Presence as Presence
from ._store import MemoryStore as MemoryStore
from ._store import Message as Message
from ._store import SqliteStore as SqliteStore
from ._store import Store as Store

__all__ = [
    "Bus",
    "Cluster",
    "History",
    "MemoryStore",
    "Message",
    "MulticastBus",
    "Names",
    "Node",
    "NodeIdentity",
    "Presence",
    "SqliteStore",
    "Store",
    "claim_identity",
    "cluster_secret",
    "link_config",
    "open_store",
]
