"""Many-to-many: N clients in one room, each sending at a fixed rate, all receiving all.

Default: 200 clients x 1 msg/s for 20 s, so 200 msg/s in and 40,000 deliveries/s out
(every client receives every message, its own included). Reports deliveries/s, the share
delivered, latency percentiles and server CPU per delivery.

Example: ``python benchmarks/many_to_many.py --clients 200 --servers ours,socketio``
"""

from __future__ import annotations

from typing import Any

from _harness import (
    LABELS,
    LoadTracker,
    Results,
    bar_plot,
    base_parser,
    connect_clients,
    console,
    parse_servers,
    pinning,
    print_table,
    run_servers,
    start_server,
)
from _loadgen import LoadPool
from _steps import measure_step, settle


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours", "socketio", "websockets", "ours-asgi"])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rate", type=float, default=1.0, help="messages/s sent by each client")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--size", type=int, default=64, help="message text bytes")
    args = p.parse_args()
    kinds = parse_servers(args.servers)
    pin, load_cpus = pinning(args.pin)
    results = Results("many_to_many", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    pool = LoadPool(args.load_procs, load_cpus)
    everyone = list(range(len(pool)))
    rows: list[list[Any]] = []

    def body(kind: str) -> None:
        server = start_server(kind, results.logs, pin=pin, store=args.store, cluster=args.cluster)
        try:
            console.rule(f"{server.label}: {args.clients} clients x {args.rate:g} msg/s")
            connect_clients(pool, server, args.clients, "m", ["bench"])
            settle(server)
            tracker = LoadTracker(pool)
            common: dict[str, Any] = {
                "receivers": args.clients,
                "publishers": everyone,
                "load_cpus": load_cpus,
                "size": args.size,
                "rate": args.rate * args.clients,
            }
            measure_step(pool, tracker, server, step=1, duration=2, **common, drain=0.5)
            r = measure_step(
                pool, tracker, server, step=2, duration=args.seconds, **common, drain=2.0
            )
            pool.call("close")
        finally:
            server.stop()
        results.add({"server": kind, "label": server.label, **r})
        note = [k for k in ("load_saturated", "load_stalled") if r[k]]
        rows.append(
            [
                server.label,
                r["deliveries_per_s"],
                100 * r["delivered_frac"],
                r["p50_ms"],
                r["p99_ms"],
                r["p999_ms"],
                r["server_us_per_delivery"],
                r["server_cpu_pct"],
                ", ".join(note),
            ]
        )

    try:
        run_servers(kinds, body)
    finally:
        pool.close()
    print_table(
        f"many-to-many: {args.clients} clients x {args.rate:g} msg/s in one room",
        [
            "server",
            "deliveries/s",
            "delivered %",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "µs CPU/delivery",
            "server CPU %",
            "note",
        ],
        rows,
    )
    runs = results.data["runs"]
    if runs:
        bar_plot(
            results.figure(""),
            f"Many-to-many, {args.clients} clients x {args.rate:g} msg/s: p99 latency",
            [LABELS.get(r["server"], r["server"]) for r in runs],
            [r["p99_ms"] for r in runs],
            "p99 latency, ms",
        )
    console.print(f"JSON and plots in {results.folder}")


if __name__ == "__main__":
    main()
