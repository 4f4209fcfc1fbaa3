"""Idle connections: server memory (RSS of its process tree) per idle connection.

Opens N connections (default 10,000) from several load processes, each joined to a room
(``--per-room`` connections per room, so join replies and presence stay small; Socket.IO's
tutorial server has no rooms, its sockets are simply connected), waits for the server to
settle, and reports (RSS after - RSS before) / N. RLIMIT_NOFILE is raised to its hard limit
for the servers and the load processes.

Example: ``python benchmarks/idle.py --connections 10000 --servers ours,websockets,socketio``
"""

from __future__ import annotations

import time
from typing import Any

from _harness import (
    LABELS,
    Results,
    bar_plot,
    base_parser,
    connect_clients,
    console,
    parse_servers,
    pinning,
    print_table,
    raise_nofile,
    run_servers,
    sleep_with_progress,
    start_server,
)
from _loadgen import LoadPool
from _steps import settle


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours", "websockets", "socketio", "ours-asgi"])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--per-room", type=int, default=100, help="connections per room; 0: no join")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait before reading RSS")
    p.add_argument("--warmup", type=int, default=200, help="connections opened+closed first")
    args = p.parse_args()
    # Room of the load processes too: each needs one descriptor per connection.
    nofile = raise_nofile()
    if nofile < args.connections + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {args.connections} connections")
    kinds = parse_servers(args.servers)
    pin, load_cpus = pinning(args.pin)
    results = Results("idle", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    pool = LoadPool(max(args.load_procs, 1), load_cpus)
    rows: list[list[Any]] = []
    n = args.connections
    rooms = [f"idle-{k}" for k in range(max(1, n // args.per_room))] if args.per_room else None

    def body(kind: str) -> None:
        server = start_server(kind, results.logs, pin=pin, store=args.store, cluster=args.cluster)
        try:
            console.rule(f"{server.label}: {n:,} idle connections")
            if args.warmup:
                connect_clients(pool, server, args.warmup, "w", rooms)
                pool.call("close")
                time.sleep(1.0)
            before = server.rss_bytes()
            cpu0 = server.cpu_seconds()
            t0 = time.monotonic()
            connect_clients(pool, server, n, "i", rooms)
            connect_s = time.monotonic() - t0
            connect_cpu = server.cpu_seconds() - cpu0
            settle(server)
            sleep_with_progress(args.settle, "settling")
            after = server.rss_bytes()
            cpu1 = server.cpu_seconds()
            time.sleep(2.0)
            idle_cpu_pct = 100 * (server.cpu_seconds() - cpu1) / 2.0
            still_open = sum(r["open"] for r in pool.call("collect", {"steps": []}))
            pool.call("close")
            time.sleep(2.0)
            after_close = server.rss_bytes()
        finally:
            server.stop()
        run = {
            "server": kind,
            "label": server.label,
            "connections": n,
            "still_open": still_open,
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
            "rss_after_close_mb": after_close / 2**20,
            "kb_per_connection": (after - before) / n / 1024,
            "connect_seconds": connect_s,
            "server_cpu_ms_per_connect": 1000 * connect_cpu / n,
            "idle_cpu_pct": idle_cpu_pct,
        }
        results.add(run)
        rows.append(
            [
                server.label,
                run["kb_per_connection"],
                run["rss_before_mb"],
                run["rss_after_mb"],
                run["rss_after_close_mb"],
                run["server_cpu_ms_per_connect"],
                idle_cpu_pct,
                f"{still_open:,}/{n:,}",
            ]
        )

    try:
        run_servers(kinds, body)
    finally:
        pool.close()
    print_table(
        f"idle connections: {n:,}" + (f", {args.per_room} per room" if args.per_room else ""),
        [
            "server",
            "KB/connection",
            "RSS before MB",
            "RSS after MB",
            "RSS after close MB",
            "CPU ms/connect",
            "idle CPU %",
            "open at end",
        ],
        rows,
    )
    runs = results.data["runs"]
    if runs:
        bar_plot(
            results.figure(""),
            f"Server memory per idle connection at {n:,} connections (lower is better)",
            [LABELS.get(r["server"], r["server"]) for r in runs],
            [r["kb_per_connection"] for r in runs],
            "KB RSS per connection",
        )
    console.print(f"JSON and plots in {results.folder}")


if __name__ == "__main__":
    main()
