"""Server cost: server CPU per delivered message at a fixed load (the key figure).

R receivers in one room (default 1,000), one publisher at a fixed rate (default 10 msg/s);
the server's CPU time (utime + stime of its whole process tree, from /proc) over the window
divided by the deliveries the receivers counted. It stays meaningful on a noisy machine or
with a saturated client, because it counts only what the server spent.

``--smoke`` measures only our chat socket with a short window (about 20 s in all).

Example: ``python benchmarks/server_cost.py --servers ours,websockets,socketio,ours-asgi``
"""

from __future__ import annotations

from typing import Any

from _harness import (
    LABELS,
    LoadTracker,
    Results,
    bar_plot,
    base_parser,
    console,
    parse_servers,
    pinning,
    print_table,
    run_servers,
    start_server,
)
from _loadgen import LoadPool
from _steps import idle_cpu, measure_step, setup_room


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours", "websockets", "socketio", "ours-asgi"])
    p.add_argument("--receivers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="published messages/s")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--size", type=int, default=64, help="message text bytes")
    p.add_argument(
        "--smoke", action="store_true", help="ours only, 8 s window: a ~20 s check of the figure"
    )
    args = p.parse_args()
    if args.smoke:
        args.servers, args.seconds = "ours", 8.0
    kinds = parse_servers(args.servers)
    pin, load_cpus = pinning(args.pin)
    results = Results("server_cost", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    pool = LoadPool(args.load_procs + 1, load_cpus)
    rows: list[list[Any]] = []

    def body(kind: str) -> None:
        server = start_server(kind, results.logs, pin=pin, store=args.store, cluster=args.cluster)
        try:
            console.rule(f"{server.label}: {args.receivers} receivers x {args.rate:g} msg/s")
            setup = setup_room(pool, server, args.receivers)
            tracker = LoadTracker(pool)
            common: dict[str, Any] = {
                "receivers": args.receivers,
                "publishers": [0],
                "load_cpus": load_cpus,
                "size": args.size,
            }
            measure_step(pool, tracker, server, step=1, rate=args.rate, duration=2, **common)
            idle = idle_cpu(server)
            r = measure_step(
                pool,
                tracker,
                server,
                step=2,
                rate=args.rate,
                duration=args.seconds,
                **common,
                description="measuring",
            )
            pool.call("close")
        finally:
            server.stop()
        run = {"server": kind, "label": server.label, "idle_cpu_pct": idle, "setup": setup, **r}
        results.add(run)
        note = []
        if r["load_saturated"]:
            note.append("load saturated")
        if r["load_stalled"]:
            note.append("load stalled")
        if r["delivered_frac"] < 0.999:
            note.append(f"only {100 * r['delivered_frac']:.2f}% delivered")
        rows.append(
            [
                server.label,
                r["server_us_per_delivery"],
                r["server_cpu_pct"],
                idle,
                r["deliveries_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["p999_ms"],
                r["server_rss_mb"],
                ", ".join(note),
            ]
        )

    try:
        run_servers(kinds, body)
    finally:
        pool.close()
    print_table(
        f"server cost at {args.receivers:,} receivers x {args.rate:g} msg/s",
        [
            "server",
            "µs CPU/delivery",
            "server CPU %",
            "idle CPU %",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "RSS MB",
            "note",
        ],
        rows,
    )
    runs = results.data["runs"]
    if runs:
        bar_plot(
            results.figure(""),
            f"Server CPU per delivered message, {args.receivers:,} receivers x "
            f"{args.rate:g} msg/s (lower is better)",
            [LABELS.get(r["server"], r["server"]) for r in runs],
            [r["server_us_per_delivery"] for r in runs],
            "µs of server CPU per delivery",
        )
    console.print(f"JSON and plots in {results.folder}")


if __name__ == "__main__":
    main()
