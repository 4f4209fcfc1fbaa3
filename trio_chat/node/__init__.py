"""The node: its state and tasks (history, names, presence), the store, identity and the cluster logic."""

from __future__ import annotations

from ._cluster import Cluster as Cluster
from ._cluster import cluster_secret as cluster_secret
from ._cluster import link_config as link_config
from ._identity import NodeIdentity as NodeIdentity
from ._identity import claim_identity as claim_identity
from ._node import Node as Node
from ._node import open_store as open_store
from ._store import MemoryStore as MemoryStore
from ._store import Message as Message
from ._store import SqliteStore as SqliteStore
from ._store import Store as Store

__all__ = [
    "Cluster",
    "MemoryStore",
    "Message",
    "Node",
    "NodeIdentity",
    "SqliteStore",
    "Store",
    "claim_identity",
    "cluster_secret",
    "link_config",
    "open_store",
]
