"""Cluster fan-out: receivers spread over 2-4 worker processes joined by the multicast link
or by Redis Streams.

Starts ``hypercorn --workers N`` with ``TRIO_CHAT_CLUSTER=host`` (multicast on loopback,
TTL 0) or, with ``--engine redis``, ``TRIO_CHAT_CLUSTER=redis`` and a ``redis-server`` this
script starts on a free 127.0.0.1 port in the results folder (persistence off); ``--engine
both`` measures one after the other in the same run. The chat socket port is shared with
SO_REUSEPORT, so the kernel spreads connections over the workers; each connection learns
its worker from the ``node`` field of ``welcome``, and the load generator keeps connecting
(closing the misplaced ones) until the publisher sits on one worker, ``--local`` receivers
on the same worker, and R remote receivers are spread evenly over the others. Reports p50/p99
latency of local vs cross-process deliveries at fixed rates (``--fixed-rate`` and
``--also-at``; the engine's overhead is remote minus local), server CPU per delivery (the
workers; redis-server on its own line), then the delivered throughput of a stepped ramp.

Example: ``python benchmarks/cluster.py --engine both --receivers 10 --local 10 --also-at 1000``
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from _harness import (
    LoadTracker,
    Results,
    base_parser,
    connect_clients,
    console,
    free_port,
    pinning,
    plt,
    print_table,
    proc_cpu_seconds,
    start_server,
)
from _loadgen import LoadPool
from _steps import measure_step, ramp_from_args

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator
    from pathlib import Path

    from _harness import Server

ENGINES = ("multicast", "redis")
#: Fixed windows use load-generator steps 2..9 (the ramp's start at 10).
MAX_FIXED = 8


@dataclass
class RedisServer:
    """A ``redis-server`` for one engine run: 127.0.0.1, a free port, no persistence."""

    proc: subprocess.Popen[bytes]
    url: str

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def running_redis(folder: Path, cpu: int | None) -> Iterator[RedisServer]:
    """Start ``redis-server`` in ``folder`` (pinned to ``cpu`` if given), stop it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "--engine redis needs redis-server on PATH (Debian: apt install redis-server)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(folder), "--logfile", str(folder / "redis-server.log")]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start; see {folder}") from None
                time.sleep(0.05)
        console.print(f"[dim]redis-server on 127.0.0.1:{port} (persistence off)[/]")
        yield RedisServer(proc, f"redis://127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def discover_nodes(pool: LoadPool, url: str, workers: int) -> list[str]:
    """Node ids of the server's workers, found by opening probe connections.

    Tries for up to 30 s: /healthz answered from one worker, the others may still start.
    """
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = pool.call(
            "connect",
            {"url": url, "dialect": "chat", "count": 8 * workers, "prefix": "probe"},
            indices=[0],
        )[0]
        pool.call("close", indices=[0])
        seen.update(n for n in reply["nodes"] if n)
        if len(seen) >= workers:
            break
        time.sleep(0.5)
    return sorted(seen)


def link_metrics(server: Server, prefix: str, scrapes: int = 12) -> dict[str, float]:
    """The ``trio_chat_<prefix>*`` counters of /metrics, highest value seen per counter.

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
            if line.startswith(f"trio_chat_{prefix}"):
                name, _, value = line.rpartition(" ")
                key = name.partition("{")[0].removeprefix("trio_chat_")
                worst[key] = max(worst.get(key, 0.0), float(value))
    return worst


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], ["ours"], cluster=False)
    p.add_argument(
        "--engine",
        choices=[*ENGINES, "both"],
        default="multicast",
        help="what joins the workers: the multicast link, Redis Streams, or both in turn",
    )
    p.add_argument("--workers", type=int, default=2, help="hypercorn worker processes (2-4)")
    p.add_argument("--receivers", type=int, default=1000, help="receivers on the other workers")
    p.add_argument("--local", type=int, default=100, help="receivers on the publisher's worker")
    p.add_argument("--fixed-rate", type=float, default=10.0)
    p.add_argument(
        "--also-at",
        type=lambda raw: [float(r) for r in raw.split(",") if r.strip()],
        default=[],
        help="further fixed-rate windows, msg/s, comma-separated (e.g. 1000)",
    )
    p.add_argument("--fixed-seconds", type=float, default=10.0)
    p.add_argument("--start-rate", type=float, default=10.0)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=12, help="ramp steps (0: no ramp)")
    p.add_argument("--max-minutes", type=float, default=3.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument(
        "--redis-cpu",
        choices=("server", "load"),
        default="server",
        help="when pinned, redis-server shares the servers' core, or the load generator's"
        " (as a Redis on a host of its own takes nothing from the chat server's cores)",
    )
    args = p.parse_args()
    if not 2 <= args.workers <= 8:
        raise SystemExit("--workers must be 2..8")
    if 1 + len(args.also_at) > MAX_FIXED:
        raise SystemExit(f"at most {MAX_FIXED} fixed-rate windows")
    pin, load_cpus = pinning(args.pin)
    results = Results("cluster", args.results)
    results.data["params"] = vars(args) | {"results": str(results.folder), "pinned": pin}
    console.print(f"results: {results.folder}")
    engines = ENGINES if args.engine == "both" else (args.engine,)
    runs = []
    for engine in engines:
        with contextlib.ExitStack() as stack:
            redis = None
            if engine == "redis":
                cpu = None if not pin or load_cpus is None else 0
                if cpu is not None and args.redis_cpu == "load":
                    cpu = load_cpus[-1]
                redis = stack.enter_context(running_redis(results.logs / "redis", cpu))
            run = measure_engine(args, engine, redis, pin, load_cpus, results)
        results.add(run)
        runs.append(run)
    report(args, runs)
    plot(results, runs)
    console.print(f"JSON and plots in {results.folder}")


def measure_engine(
    args: argparse.Namespace,
    engine: str,
    redis: RedisServer | None,
    pin: bool,
    load_cpus: list[int] | None,
    results: Results,
) -> dict[str, Any]:
    """One server (``--workers N``) joined by ``engine``: the fixed windows and the ramp."""
    # Worker 0: publisher (and probes); 1: local receivers; 2..: remote receivers.
    pool = LoadPool(2 + max(1, args.load_procs), load_cpus)
    remote_workers = list(range(2, len(pool)))
    env = {}
    if redis:
        # Peers on other hosts sign their history requests with it; here one made per run.
        env = {"TRIO_CHAT_REDIS_URL": redis.url, "TRIO_CHAT_CLUSTER_SECRET": secrets.token_hex(16)}
    server = start_server(
        "ours",
        results.logs,
        pin=pin,
        workers=args.workers,
        store=args.store,
        cluster="redis" if redis else "host",
        extra_env=env,
    )
    what = f"{args.workers} workers, {engine}"
    try:
        console.rule(f"{server.label}: cluster fan-out over {engine}")
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
        common: dict[str, Any] = {
            "receivers": args.receivers + args.local,
            "publishers": [0],
            "load_cpus": load_cpus,
            "size": args.size,
            "groups": {"local": ([1], args.local), "remote": (remote_workers, args.receivers)},
        }
        # Warm-up (not recorded): caches, first-time paths, the engine's connections.
        measure_step(pool, tracker, server, step=1, rate=10, duration=2, **common, drain=0.5)
        windows = []
        for k, rate in enumerate([args.fixed_rate, *args.also_at]):
            redis_cpu = redis.cpu_seconds() if redis else 0.0
            window = measure_step(
                pool,
                tracker,
                server,
                step=2 + k,
                rate=rate,
                duration=args.fixed_seconds,
                **common,
                description=f"{what}, fixed {rate:g} msg/s",
            )
            if redis:
                cpu = redis.cpu_seconds() - redis_cpu
                window["redis_cpu_s"] = cpu
                window["redis_us_per_delivery"] = (
                    1e6 * cpu / window["delivered"] if window["delivered"] else float("nan")
                )
            windows.append(window)
        steps, best = ramp_from_args(pool, tracker, server, args, common, what)
        link = link_metrics(server, "redis_" if redis else "cluster_")
        pool.call("close")
    finally:
        server.stop()
        pool.close()
    return {
        "server": "ours",
        "engine": engine,
        "label": server.label,
        "workers": args.workers,
        "nodes": nodes,
        "fixed": windows[0],
        "windows": windows,
        "ramp": steps,
        "max_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "client_bound": bool(steps and steps[-1]["load_saturated"]),
        "link_metrics_worst_worker": link,
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    rows = []
    for run in runs:
        for w in run["windows"]:
            local, remote = w["local"], w["remote"]
            for group in ("local", "remote"):
                g = w[group]
                rows.append(
                    [
                        run["engine"],
                        w["rate"],
                        group,
                        g["receivers"],
                        100 * g["delivered_frac"],
                        g["p50_ms"],
                        g["p99_ms"],
                        g["p999_ms"],
                        remote["p99_ms"] - local["p99_ms"] if group == "remote" else float("nan"),
                        load_note(w) if group == "remote" else "",
                    ]
                )
    print_table(
        f"cluster x{args.workers}: local vs cross-node latency (overhead = remote p99 - local p99)",
        [
            "engine",
            "msg/s",
            "receivers",
            "count",
            "delivered %",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "overhead p99 ms",
            "load generator",
        ],
        rows,
    )
    cpu_rows = [
        [
            run["engine"],
            w["rate"],
            w["deliveries_per_s"],
            w["server_us_per_delivery"],
            w.get("redis_us_per_delivery", float("nan")),
            w["server_cpu_pct"],
        ]
        for run in runs
        for w in run["windows"]
    ]
    print_table(
        f"CPU per delivery (server: all {args.workers} workers; redis-server separately)",
        ["engine", "msg/s", "deliveries/s", "server µs", "redis-server µs", "server CPU %"],
        cpu_rows,
    )
    for run in runs:
        if run["ramp"]:
            console.print(
                f"{run['engine']}: max {run['max_deliveries_per_s']:,.0f} deliveries/s"
                + (" (client-bound)" if run["client_bound"] else "")
            )
        if run["link_metrics_worst_worker"]:
            console.print(
                f"{run['engine']} counters (worst worker seen): "
                + ", ".join(
                    f"{k}={v:g}" for k, v in sorted(run["link_metrics_worst_worker"].items())
                )
            )


def load_note(window: dict[str, Any]) -> str:
    """Whether the window's latencies include the load generator's own trouble."""
    notes = []
    if window["load_saturated"]:
        notes.append("saturated")
    if window["load_stalled"]:
        notes.append(f"stalled {window['load_lag_max_ms']:.0f} ms")
    return ", ".join(notes) or "ok"


def plot(results: Results, runs: list[dict[str, Any]]) -> None:
    pyplot = plt()
    ramps = any(run["ramp"] for run in runs)
    fig, axes = pyplot.subplots(1, 2 if ramps else 1, figsize=(11 if ramps else 6, 4), dpi=100)
    fixed_ax = axes[0] if ramps else axes
    for n, run in enumerate(runs):
        for group, style in (("local", "--"), ("remote", "-")):
            xs = [w["rate"] for w in run["windows"]]
            for pct, marker in (("p50", "o"), ("p99", "s")):
                ys = [w[group][f"{pct}_ms"] for w in run["windows"]]
                fixed_ax.plot(
                    xs,
                    ys,
                    style,
                    marker=marker,
                    color=f"C{n}",
                    label=f"{run['engine']} {group} {pct}",
                )
    log_axes(
        fixed_ax, "publish rate, msg/s", "latency, ms", "fixed-rate windows: local vs cross-node"
    )
    if ramps:
        ax = axes[1]
        for n, run in enumerate(runs):
            for group, style in (("local", "--"), ("remote", "-")):
                xs = [s["deliveries_per_s"] for s in run["ramp"]]
                ys = [s[group]["p99_ms"] for s in run["ramp"]]
                ax.plot(
                    xs, ys, style, marker="o", color=f"C{n}", label=f"{run['engine']} {group} p99"
                )
        ax.axhline(200, color="grey", lw=0.8, ls=":")
        log_axes(ax, "deliveries/s (all receivers)", "p99 latency, ms", "ramp")
    engines = " vs ".join(run["engine"] for run in runs)
    fig.suptitle(f"trio-chat, {runs[0]['workers']} workers joined by {engines}", fontsize=10)
    fig.tight_layout()
    fig.savefig(results.figure(""))
    pyplot.close(fig)


def log_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
