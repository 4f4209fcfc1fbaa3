"""Join storm: N clients connect and join one room as fast as they can.

For each N (``--sizes``, default 1,000, 2,000, 4,000 and 8,000) every server starts fresh,
the load processes open N connections at once (64 handshakes in flight per process) and,
on our server, each joins the same room. Reported per N: the time until the last client
has its ``joined`` (ours) or is connected (the peers: their plain connect time, as the
issue asks), the server CPU spent, how long the server stays busy afterwards (work the
joins left queued, e.g. presence still being written), and for ours the broadcast
deliveries the hub made (presence events, head counts): N^2/2 when every join is told to
every member.

``--baseline REV`` adds a row for our server as it was at git revision ``REV`` (its
``trio_chat`` package, extracted under the results folder, run by the same command), so
before and after come from the same run. Our server runs as ``make run`` runs it: SQLite
store, host cluster on. RLIMIT_NOFILE is raised to its hard limit.

Example: ``python benchmarks/join_storm.py --servers ours,websockets,socketio``;
``--smoke`` runs 200 and 400 clients.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from _harness import (
    LABELS,
    ROOT,
    Results,
    Server,
    base_parser,
    connect_clients,
    console,
    parse_servers,
    pinning,
    plt,
    print_table,
    raise_nofile,
    run_servers,
    start_server,
)
from _loadgen import LoadPool
from _steps import settle

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

ROOM = "storm"
SMOKE_SIZES = "200,400"
BASELINE = "ours-before"


def extract_baseline(rev: str, folder: Path) -> Path:
    """``trio_chat`` as it was at ``rev``, in a folder to put first on PYTHONPATH."""
    target = folder / f"baseline-{rev}"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "trio_chat"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def deliveries(server: Server) -> int | None:
    """Broadcast deliveries our hub made (presence, counts), from ``/metrics``; None for
    the peers."""
    if server.kind not in ("ours", BASELINE):
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("trio_chat_messages_out_total "):
                return int(float(line.split()[1]))
    return None


def storm(pool: LoadPool, start: Callable[[], Server], n: int, joins: bool) -> dict[str, Any]:
    """One fresh server, ``n`` clients at once; the figures of that storm."""
    server = start()
    try:
        console.rule(f"{server.label}: {n:,} clients" + (f" joining {ROOM!r}" if joins else ""))
        cpu0 = server.cpu_seconds()
        t0 = time.monotonic()
        connect_clients(pool, server, n, "j", [ROOM] if joins else None)
        seconds = time.monotonic() - t0
        cpu = server.cpu_seconds() - cpu0
        busy_after = settle(server)
        cpu_total = server.cpu_seconds() - cpu0
        delivered = deliveries(server)
        still_open = sum(r["open"] for r in pool.call("collect", {"steps": []}))
        pool.call("close")
        server.check_alive()
    finally:
        server.stop()
    return {
        "clients": n,
        "joins": joins,
        "seconds": seconds,
        "server_cpu_s": cpu,
        "server_cpu_total_s": cpu_total,
        "busy_after_s": busy_after,
        "deliveries": delivered,
        "still_open": still_open,
        "label": server.label,
    }


def plot(path: Path, runs: list[dict[str, Any]], sizes: list[int]) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4), dpi=100)
    for kind in dict.fromkeys(r["server"] for r in runs):
        mine = sorted((r["clients"], r["seconds"]) for r in runs if r["server"] == kind)
        label = next(r["label"] for r in runs if r["server"] == kind)
        ax.plot([x for x, _ in mine], [y for _, y in mine], marker="o", label=label)
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("clients (ours: all joining one room; peers: connecting)")
    ax.set_ylabel("seconds until the last one is in")
    ax.set_title("Join storm (lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours", "websockets", "socketio"])
    p.add_argument("--sizes", default="1000,2000,4000,8000", help="comma-separated client counts")
    p.add_argument("--smoke", action="store_true", help=f"small sizes only ({SMOKE_SIZES})")
    p.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also measure our server as of this git revision (row 'ours-before')",
    )
    args = p.parse_args()
    sizes = [int(s) for s in (SMOKE_SIZES if args.smoke else args.sizes).split(",") if s]
    nofile = raise_nofile()
    if nofile < max(sizes) + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {max(sizes)} connections")
    kinds = parse_servers(args.servers)
    pin, load_cpus = pinning(args.pin)
    results = Results("join_storm", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    baseline_env: dict[str, str] | None = None
    if args.baseline:
        src = extract_baseline(args.baseline, results.folder)
        baseline_env = {"PYTHONPATH": str(src)}
        LABELS[BASELINE] = f"trio-chat before ({args.baseline})"
        kinds = [BASELINE, *kinds]
    pool = LoadPool(max(args.load_procs, 1), load_cpus)

    def body(kind: str) -> None:
        ours = kind in ("ours", BASELINE)

        def start() -> Server:
            server = start_server(
                "ours" if kind == BASELINE else kind,
                results.logs,
                pin=pin,
                store=args.store,
                cluster=args.cluster,
                extra_env=baseline_env if kind == BASELINE else None,
            )
            server.kind = kind
            return server

        for n in sizes:
            run = storm(pool, start, n, joins=ours) | {"server": kind}
            results.add(run)
            console.print(
                f"{run['label']}: {n:,} in {run['seconds']:.2f} s, "
                f"server CPU {run['server_cpu_s']:.2f} s, busy {run['busy_after_s']:.0f} s after"
            )

    try:
        run_servers(kinds, body)
    finally:
        pool.close()
    runs: list[dict[str, Any]] = results.data["runs"]
    ref = {r["clients"]: r["seconds"] for r in runs if r["server"] == "websockets"}
    print_table(
        "join storm: seconds until every client is in (ours: joined one room)",
        [
            "server",
            "clients",
            "seconds",
            "x websockets",
            "server CPU s",
            "busy after s",
            "deliveries",
        ],
        [
            [
                r["label"],
                r["clients"],
                r["seconds"],
                r["seconds"] / ref[r["clients"]] if r["clients"] in ref else float("nan"),
                r["server_cpu_s"],
                r["busy_after_s"],
                "-" if r["deliveries"] is None else r["deliveries"],
            ]
            for r in runs
        ],
    )
    if runs:
        plot(results.figure(""), runs, sizes)
    console.print(f"JSON and plot in {results.folder}")


if __name__ == "__main__":
    main()
