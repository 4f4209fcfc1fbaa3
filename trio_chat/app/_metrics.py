"""``/metrics``: the node's statistics in the Prometheus text format.

Every sample carries a ``worker`` label, the node id (``<host id>-<slot>``): with
``--workers N`` each scrape reaches one worker at random, and without the label its
counters would replace the previous worker's, so that a counter seemed to jump up and
down. Labelled, every worker's series stays its own; ``sum without (worker) (...)`` in
PromQL gives the deployment's totals (docs/deploy.md, "Operations").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node._node import Node


def render_metrics(node: Node) -> str:
    """Render every counter and gauge of ``node`` (and its hub and link)."""
    stats = node.statistics()
    hub = node.hub.statistics()
    lines: list[str] = []
    worker = f'worker="{_label_value(node.node_id)}"'

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP trio_chat_{name} {help_text}")
        lines.append(f"# TYPE trio_chat_{name} {kind}")
        lines.extend(f"trio_chat_{name}{{{worker}{labels}}} {value:g}" for labels, value in samples)

    metric("connections", "gauge", "Connected clients.", [("", stats.connections)])
    metric("rooms", "gauge", "Rooms with local members.", [("", hub.rooms)])
    metric(
        "subscriptions", "gauge", "Room memberships of local clients.", [("", hub.subscriptions)]
    )
    metric("messages_in_total", "counter", "Messages clients sent.", [("", stats.messages_in)])
    metric(
        "messages_out_total", "counter", "Broadcast deliveries to clients.", [("", hub.deliveries)]
    )
    metric("frames_total", "counter", "Broadcast frames encoded (once each).", [("", hub.frames)])
    metric(
        "duplicates_total",
        "counter",
        "Retried sends answered with their first ack.",
        [("", stats.duplicates)],
    )
    metric("store_commits_total", "counter", "Store transactions.", [("", stats.commits)])
    metric("store_messages_total", "counter", "Messages committed.", [("", stats.committed)])
    metric(
        "store_up",
        "gauge",
        "1 while the store accepts writes; 0 from a failed write to the next good one.",
        [("", 1 if stats.store_up else 0)],
    )
    metric(
        "store_failures_total",
        "counter",
        "Store operations that failed (disk full, I/O error, locked, corrupt), by operation.",
        [(f',op="{op}"', stats.store_failures.get(op, 0)) for op in ("read", "write")],
    )
    metric(
        "slow_disconnects_total",
        "counter",
        "Clients closed with 4008 (slow).",
        [("", stats.slow_disconnects)],
    )
    metric(
        "accept_failures_total",
        "counter",
        "Chat socket accept() failures for want of descriptors or memory (each backs off 100 ms).",
        [("", node.chat_socket.statistics().accept_failures)],
    )
    metric(
        "errors_total",
        "counter",
        "Error frames and refusals, by code.",
        [(f',code="{code}"', n) for code, n in sorted(stats.errors.items())],
    )
    metric(
        "client_failures_total",
        "counter",
        "Unexpected exceptions that closed one client (and nothing else), by place and type.",
        [
            (f',where="{where}",type="{kind}"', n)
            for (where, kind), n in sorted(node.failures.statistics().contained.items())
        ],
    )
    if node.cluster is not None:
        for name, value in node.cluster.statistics().items():
            # The Redis engine's own counters keep their name: trio_chat_redis_*.
            redis = name.startswith("redis_")
            metric(
                name if redis else f"cluster_{name}",
                "gauge" if name in _CLUSTER_GAUGES else "counter",
                f"{'Redis engine' if redis else 'Cluster link'}: {name.replace('_', ' ')}.",
                [("", value)],
            )
    return "\n".join(lines) + "\n"


def _label_value(text: str) -> str:
    """``text`` escaped for a label value (a served node id is ``<hex>-<n>``; tests use any)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_CLUSTER_GAUGES = {
    "peers",
    "buffer_packets",
    "buffer_bytes",
    "reorder_packets",
    "rcvbuf",
    "redis_connected",
    "redis_queued",
    "redis_stream_lag_ms",
}
