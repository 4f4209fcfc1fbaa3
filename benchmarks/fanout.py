"""Fan-out: R receivers in one room, one publisher.

For each server and each R: latency (p50/p99/p99.9) at a fixed 10 msg/s, then the publisher
steps its rate up (times --factor per step) until a step fails; the result is the highest
sustained deliveries/s at which ≥ 99.9 % of the messages arrived with p99 < 200 ms.
Steps where the load generator itself was saturated are marked.

Example: ``python benchmarks/fanout.py --receivers 100,1000 --servers ours,websockets``
"""

from __future__ import annotations

from typing import Any

from _harness import (
    LABELS,
    LoadTracker,
    Results,
    Server,
    base_parser,
    console,
    parse_servers,
    pinning,
    plt,
    print_table,
    run_servers,
    start_server,
)
from _loadgen import LoadPool
from _steps import fixed_then_ramp, setup_room


def run_one(
    server: Server, pool: LoadPool, receivers: int, args: Any, load_cpus: list[int] | None
) -> dict[str, Any]:
    setup = setup_room(pool, server, receivers)
    tracker = LoadTracker(pool)
    common = {
        "receivers": receivers,
        "publishers": [0],
        "load_cpus": load_cpus,
        "size": args.size,
    }
    fixed, steps, best = fixed_then_ramp(
        pool, tracker, server, args, common, f"{receivers} receivers"
    )
    pool.call("close")
    last = steps[-1] if steps else None
    return {
        "server": server.kind,
        "label": server.label,
        "receivers": receivers,
        "setup": setup,
        "fixed": fixed,
        "ramp": steps,
        "max_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "max_rate": best["rate"] if best else 0.0,
        # Where the ramp stopped because the client could not keep up, the maximum is a
        # lower bound for the server.
        "client_bound": bool(last and last["load_saturated"]),
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours", "socketio", "websockets", "ours-asgi"])
    p.add_argument("--receivers", default="100,1000", help="comma-separated R values")
    p.add_argument("--fixed-rate", type=float, default=10.0, help="msg/s of the latency window")
    p.add_argument("--fixed-seconds", type=float, default=10.0)
    p.add_argument("--start-rate", type=float, default=10.0, help="first ramp step, msg/s")
    p.add_argument("--factor", type=float, default=1.5, help="rate multiplier per ramp step")
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=14)
    p.add_argument("--max-minutes", type=float, default=3.0, help="time bound of one ramp")
    p.add_argument("--size", type=int, default=64, help="message text bytes")
    args = p.parse_args()
    kinds = parse_servers(args.servers)
    pin, load_cpus = pinning(args.pin)
    results = Results("fanout", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    pool = LoadPool(args.load_procs + 1, load_cpus)
    rows: list[list[Any]] = []
    try:
        for receivers in [int(x) for x in args.receivers.split(",")]:

            def body(kind: str, receivers: int = receivers) -> None:
                server = start_server(
                    kind, results.logs, pin=pin, store=args.store, cluster=args.cluster
                )
                try:
                    console.rule(f"{server.label}: {receivers} receivers")
                    run = run_one(server, pool, receivers, args, load_cpus)
                finally:
                    server.stop()
                results.add(run)
                f = run["fixed"]
                rows.append(
                    [
                        run["label"],
                        receivers,
                        f["p50_ms"],
                        f["p99_ms"],
                        f["p999_ms"],
                        f["server_us_per_delivery"],
                        run["max_deliveries_per_s"],
                        "client-bound: lower bound" if run["client_bound"] else "",
                    ]
                )

            run_servers(kinds, body)
    finally:
        pool.close()
    print_table(
        f"fan-out (latency at {args.fixed_rate:g} msg/s; max = ≥99.9% delivered, p99<200 ms)",
        [
            "server",
            "receivers",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "server µs/delivery",
            "max deliveries/s",
            "note",
        ],
        rows,
    )
    plot(results)
    console.print(f"JSON and plots in {results.folder}")


def plot(results: Results) -> None:
    runs = results.data["runs"]
    if not runs:
        return
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    for i, run in enumerate(runs):
        xs = [s["deliveries_per_s"] for s in run["ramp"]]
        ys = [s["p99_ms"] for s in run["ramp"]]
        if not xs:
            continue
        style = ["-", "--", ":", "-."][i % 4]
        ax.plot(
            xs,
            ys,
            style,
            marker="o",
            label=f"{LABELS.get(run['server'], run['server'])}, R={run['receivers']}",
        )
    ax.axhline(200, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("deliveries/s (one publisher, stepped rate)")
    ax.set_ylabel("p99 latency, ms")
    ax.set_title("Fan-out in one room: p99 latency vs delivered throughput", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results.figure(""))
    pyplot.close(fig)


if __name__ == "__main__":
    main()
