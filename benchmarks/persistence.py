"""Persistence cost: accepted messages/s with the SQLite store vs the in-memory store.

Our server runs as ``make run`` runs it: the host cluster on (a cluster port of the run's
own; ``--cluster off`` for the older rows), SQLite first.

S senders (default 16), each alone in its own room, each keeping a window of W sends in
flight (default 8) for the whole window: the next send goes out when an ack comes back.
An ack means the message was accepted (with SQLite: committed, group commit), so acks/s is
the accepted rate. Also reports ack latency percentiles and server CPU per accepted message.

Example: ``python benchmarks/persistence.py --senders 16 --window 8 --seconds 10``
"""

from __future__ import annotations

import time
from typing import Any

from _harness import (
    Results,
    bar_plot,
    base_parser,
    connect_clients,
    console,
    percentiles,
    pinning,
    print_table,
    sleep_with_progress,
    start_server,
)
from _loadgen import LoadPool, decode_hist_into, new_histogram


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours"], store=False)
    p.add_argument("--stores", default="sqlite,memory", help="TRIO_CHAT_STORE values to compare")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--window", type=int, default=8, help="un-acked sends per sender")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", type=int, default=64, help="message text bytes")
    args = p.parse_args()
    kinds = [k for k in args.servers.split(",") if k]
    if any(k not in ("ours", "ours-asgi") for k in kinds):
        raise SystemExit("persistence measures our server only (ours, ours-asgi)")
    pin, load_cpus = pinning(args.pin)
    results = Results("persistence", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    pool = LoadPool(args.load_procs, load_cpus)
    rows: list[list[Any]] = []
    try:
        for kind in kinds:
            for store in args.stores.split(","):
                server = start_server(
                    kind,
                    results.logs,
                    pin=pin,
                    store=store,
                    cluster=args.cluster,
                )
                try:
                    console.rule(f"{server.label}, store={store}: {args.senders} senders")
                    connect_clients(pool, server, args.senders, "s", ["p"], distinct_rooms=True)
                    flood = {"window": args.window, "size": args.size}
                    pool.call("flood", flood | {"duration": 1.0})  # warm-up
                    cpu0 = server.cpu_seconds()
                    t0 = time.monotonic()
                    for i in range(len(pool)):
                        pool.send(i, "flood", flood | {"duration": args.seconds})
                    sleep_with_progress(args.seconds, f"flooding, store={store}")
                    replies = pool.wait(range(len(pool)), timeout=args.seconds + 60)
                    wall = time.monotonic() - t0
                    cpu = server.cpu_seconds() - cpu0
                    server.check_alive()
                    pool.call("close")
                finally:
                    server.stop()
                hist = new_histogram()
                for r in replies:
                    decode_hist_into(hist, r["acks"])
                acked = sum(r["acked"] for r in replies)
                run = {
                    "server": kind,
                    "store": store,
                    "label": f"{server.label}, {store}, cluster {args.cluster}",
                    "senders": args.senders,
                    "window": args.window,
                    "sent": sum(r["sent"] for r in replies),
                    "acked": acked,
                    "acks_per_s": acked / args.seconds,
                    "unacked_at_end": sum(r["pending"] for r in replies),
                    "server_cpu_pct": 100 * cpu / wall,
                    "server_us_per_accept": 1e6 * cpu / acked if acked else float("nan"),
                    **{f"ack_{k}": v for k, v in percentiles(hist).items()},
                }
                results.add(run)
                rows.append(
                    [
                        run["label"],
                        run["acks_per_s"],
                        run["ack_p50_ms"],
                        run["ack_p99_ms"],
                        run["ack_p999_ms"],
                        run["server_us_per_accept"],
                        run["server_cpu_pct"],
                        run["unacked_at_end"],
                    ]
                )
    finally:
        pool.close()
    print_table(
        f"persistence: {args.senders} senders x window {args.window}, {args.seconds:g} s",
        [
            "server, store",
            "accepted msg/s",
            "ack p50 ms",
            "ack p99 ms",
            "ack p99.9 ms",
            "µs CPU/accept",
            "server CPU %",
            "unacked",
        ],
        rows,
    )
    runs = results.data["runs"]
    if runs:
        bar_plot(
            results.figure(""),
            "Accepted messages/s (acks/s) by store (higher is better)",
            [r["label"] for r in runs],
            [r["acks_per_s"] for r in runs],
            "acks/s",
        )
    console.print(f"JSON and plots in {results.folder}")


if __name__ == "__main__":
    main()
