"""Cluster fan-out: receivers spread over 2-4 worker processes joined by the multicast link.

Starts ``hypercorn --workers N`` with ``TRIO_CHAT_CLUSTER=host`` (multicast on loopback,
TTL 0). The chat socket port is shared with SO_REUSEPORT, so the kernel spreads connections
over the workers; each connection learns its worker from the ``node`` field of ``welcome``,
and the load generator keeps connecting (closing the misplaced ones) until the publisher
sits on one worker, ``--local`` receivers on the same worker, and R remote receivers are
spread evenly over the others. Reports p50/p99 latency of local vs cross-process
deliveries at a fixed rate, then the delivered throughput of a stepped ramp.

Example: ``python benchmarks/cluster.py --workers 2 --receivers 1000``
"""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING, Any

from _harness import (
    LoadTracker,
    Results,
    base_parser,
    connect_clients,
    console,
    pinning,
    plt,
    print_table,
    start_server,
)
from _loadgen import LoadPool
from _steps import fixed_then_ramp

if TYPE_CHECKING:
    from _harness import Server


def discover_nodes(pool: LoadPool, url: str, workers: int) -> list[str]:
    """Node ids of the server's workers, found by opening probe connections."""
    seen: set[str] = set()
    for _ in range(6):
        reply = pool.call(
            "connect",
            {"url": url, "dialect": "chat", "count": 8 * workers, "prefix": "probe"},
            indices=[0],
        )[0]
        pool.call("close", indices=[0])
        seen.update(n for n in reply["nodes"] if n)
        if len(seen) >= workers:
            break
    return sorted(seen)


def link_metrics(server: Server, scrapes: int = 12) -> dict[str, float]:
    """The ``trio_chat_cluster_*`` counters of /metrics, highest value seen per counter.

    Each scrape reaches whichever worker the kernel picks on the shared HTTP port, so this
    is the worst worker seen (its ``worker`` label is set aside).
    """
    worst: dict[str, float] = {}
    for _ in range(scrapes):
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.http_port}/metrics", timeout=2
            ) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("trio_chat_cluster_"):
                name, _, value = line.rpartition(" ")
                key = name.partition("{")[0].removeprefix("trio_chat_cluster_")
                worst[key] = max(worst.get(key, 0.0), float(value))
    return worst


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours"])
    p.add_argument("--workers", type=int, default=2, help="hypercorn worker processes (2-4)")
    p.add_argument("--receivers", type=int, default=1000, help="receivers on the other workers")
    p.add_argument("--local", type=int, default=100, help="receivers on the publisher's worker")
    p.add_argument("--fixed-rate", type=float, default=10.0)
    p.add_argument("--fixed-seconds", type=float, default=10.0)
    p.add_argument("--start-rate", type=float, default=10.0)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--max-minutes", type=float, default=3.0)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    if not 2 <= args.workers <= 8:
        raise SystemExit("--workers must be 2..8")
    pin, load_cpus = pinning(args.pin)
    results = Results("cluster", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    # Worker 0: publisher (and probes); 1: local receivers; 2..: remote receivers.
    pool = LoadPool(2 + max(1, args.load_procs), load_cpus)
    remote_workers = list(range(2, len(pool)))
    server = start_server("ours", results.logs, pin=pin, workers=args.workers, cluster="host")
    try:
        console.rule(f"{server.label}: cluster fan-out")
        nodes = discover_nodes(pool, server.url, args.workers)
        console.print(f"worker nodes seen: {nodes}")
        if len(nodes) < 2:
            raise SystemExit(
                f"only {len(nodes)} worker node(s) answered on the chat socket; "
                "is SO_REUSEPORT shared by the workers?"
            )
        home, others = nodes[0], nodes[1:]
        per_node = spread(args.receivers, len(others))
        quotas: list[dict[str, int]] = [{} for _ in remote_workers]
        for node, n in zip(others, per_node, strict=True):
            for k, share in enumerate(spread(n, len(remote_workers))):
                quotas[k][node] = share
        connect_clients(
            pool,
            server,
            args.receivers,
            "x",
            ["bench"],
            indices=remote_workers,
            node_quota=quotas,
        )
        if args.local:
            connect_clients(
                pool,
                server,
                args.local,
                "l",
                ["bench"],
                indices=[1],
                node_quota=[{home: args.local}],
            )
        connect_clients(
            pool, server, 1, "pub", ["bench"], indices=[0], measure=False, node_quota=[{home: 1}]
        )
        tracker = LoadTracker(pool)
        total = args.receivers + args.local
        common: dict[str, Any] = {
            "receivers": total,
            "publishers": [0],
            "load_cpus": load_cpus,
            "size": args.size,
            "groups": {"local": ([1], args.local), "remote": (remote_workers, args.receivers)},
        }
        fixed, steps, best = fixed_then_ramp(
            pool, tracker, server, args, common, f"{args.workers} workers"
        )
        link = link_metrics(server)
        pool.call("close")
    finally:
        server.stop()
        pool.close()
    run = {
        "server": "ours",
        "label": server.label,
        "workers": args.workers,
        "nodes": nodes,
        "fixed": fixed,
        "ramp": steps,
        "max_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "client_bound": bool(steps and steps[-1]["load_saturated"]),
        "link_metrics_worst_worker": link,
    }
    results.add(run)
    rows = []
    for group in ("local", "remote"):
        g = fixed[group]
        rows.append(
            [
                group,
                g["receivers"],
                100 * g["delivered_frac"],
                g["p50_ms"],
                g["p99_ms"],
                g["p999_ms"],
            ]
        )
    print_table(
        f"cluster x{args.workers} at {args.fixed_rate:g} msg/s "
        f"(server {fixed['server_us_per_delivery']:.1f} µs CPU/delivery over all workers; "
        f"max {run['max_deliveries_per_s']:,.0f} deliveries/s"
        + (", client-bound" if run["client_bound"] else "")
        + ")",
        ["receivers", "count", "delivered %", "p50 ms", "p99 ms", "p99.9 ms"],
        rows,
    )
    if link:
        console.print(
            "cluster link counters (worst worker seen): "
            + ", ".join(f"{k}={v:g}" for k, v in sorted(link.items()))
        )
    plot(results, run)
    console.print(f"JSON and plots in {results.folder}")


def plot(results: Results, run: dict[str, Any]) -> None:
    if not run["ramp"]:
        return
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4), dpi=100)
    for group, style in (("local", "--"), ("remote", "-")):
        xs = [s["deliveries_per_s"] for s in run["ramp"]]
        ys = [s[group]["p99_ms"] for s in run["ramp"]]
        ax.plot(xs, ys, style, marker="o", label=f"{group} receivers p99")
    ax.axhline(200, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("deliveries/s (all receivers)")
    ax.set_ylabel("p99 latency, ms")
    ax.set_title(f"trio-chat, {run['workers']} workers over the multicast link", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results.figure(""))
    pyplot.close(fig)


if __name__ == "__main__":
    main()
