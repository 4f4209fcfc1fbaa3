"""Shared harness of the benchmark scripts: servers, /proc accounting, results, plots.

- `start_server` starts one server to measure as a subprocess on 127.0.0.1 (ours under
  hypercorn, its ``/ws`` fallback, or a peer), optionally pinned with ``taskset`` to the
  server core, waits until it answers, and `Server.stop` ends its whole process group.
- `Server.cpu_seconds` / `Server.rss_bytes` read ``/proc/<pid>/stat`` and
  ``/proc/<pid>/status`` for the server's process tree (hypercorn runs its workers as
  children), so "server CPU per delivered message" is measured where it is spent, however
  noisy the machine or saturated the client.
- `Results` writes JSON and PNG plots into ``benchmarks/results/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from _loadgen import LoadPool, decode_hist_into, new_histogram
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PEERS = BENCH / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Every server kind the scripts know. ``ours-asgi`` is our server's /ws on hypercorn's port.
KINDS = ("ours", "ours-asgi", "websockets", "socketio")
LABELS = {
    "ours": "trio-chat (chat socket)",
    "ours-asgi": "trio-chat /ws (hypercorn ASGI)",
    "websockets": "Python websockets",
    "socketio": "Node Socket.IO",
}

console = Console(highlight=False)
if not console.is_terminal:
    console = Console(highlight=False, width=160)


class Skip(Exception):
    """A server kind cannot run here (its runtime is missing); the script goes on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    """A free UDP port: a cluster port of the run's own, as every test has."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE as far as the hard limit allows; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tree_pids(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    url: str
    dialect: str
    http_port: int
    ws_port: int | None
    log: Path
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS.get(self.kind, self.kind) + (
            f" x{self.workers} workers" if self.workers > 1 else ""
        )

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(p) for p in self.pids())

    def rss_bytes(self) -> int:
        return sum(proc_rss_bytes(p) for p in self.pids())

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def node_available() -> bool:
    return shutil.which("node") is not None


def ensure_socketio() -> Path:
    """The Socket.IO peer's folder, running ``npm install`` there once if needed."""
    folder = PEERS / "socketio"
    if not node_available():
        raise Skip("Node Socket.IO peer skipped: `node` is not on PATH")
    if not (folder / "node_modules" / "socket.io").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            raise Skip("Node Socket.IO peer skipped: `npm` is not on PATH to install socket.io")
        console.print(f"[dim]npm install in {folder} ...[/]")
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise Skip(f"Node Socket.IO peer skipped: npm install failed:\n{done.stderr[-800:]}")
    return folder


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    health = f"http://127.0.0.1:{server.http_port}/healthz"
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            with urllib.request.urlopen(health, timeout=1) as r:
                ok = r.status == 200
        except OSError:
            ok = False
        if ok and server.ws_port is not None:
            try:
                socket.create_connection(("127.0.0.1", server.ws_port), timeout=1).close()
            except OSError:
                ok = False
        if ok:
            return
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.label} not ready after {timeout:.0f} s; log: {server.log}")


def start_server(
    kind: str,
    log_dir: Path,
    *,
    pin: bool,
    workers: int = 1,
    store: str = "sqlite",
    cluster: str = "host",
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start one server of ``kind`` on free 127.0.0.1 ports and wait until it answers.

    Ours runs as ``make run`` runs it unless told otherwise: SQLite history, the host
    cluster on (on a cluster port of the run's own, unless ``extra_env`` names one).

    Raises:
      Skip: the kind's runtime is missing here.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    env = dict(os.environ)
    http_port = free_port()
    ws_port: int | None = None
    health_port = http_port
    if kind in ("ours", "ours-asgi"):
        data_dir = log_dir / f"data-{kind}-{http_port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if kind == "ours":
            ws_port = free_port()
        env.update(
            TRIO_CHAT_WS_BIND=f"127.0.0.1:{ws_port}" if ws_port else "off",
            TRIO_CHAT_RATE_LIMIT="0",
            # Every simulated client comes from 127.0.0.1: the per-address cap (256 by
            # default) would refuse all but the first few hundred.
            TRIO_CHAT_MAX_CONNECTIONS_PER_IP="1000000",
            TRIO_CHAT_DATA_DIR=str(data_dir),
            TRIO_CHAT_STORE=store,
            TRIO_CHAT_CLUSTER=cluster,
        )
        if cluster == "host":
            env["TRIO_CHAT_CLUSTER_PORT"] = str(free_udp_port())
        cmd = [sys.executable, "-m", "hypercorn", "trio_chat:app", "--worker-class", "trio"]
        cmd += ["--bind", f"127.0.0.1:{http_port}", "--workers", str(workers)]
        url = f"ws://127.0.0.1:{ws_port or http_port}/ws"
        dialect = "chat"
    elif kind == "websockets":
        cmd = [sys.executable, str(PEERS / "websockets_server.py"), "--port", str(http_port)]
        url = f"ws://127.0.0.1:{http_port}/"
        dialect = "chat"
    elif kind == "socketio":
        folder = ensure_socketio()
        cmd = ["node", str(folder / "server.js"), str(http_port), "127.0.0.1"]
        url = f"ws://127.0.0.1:{http_port}/socket.io/"
        dialect = "socketio"
    else:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(KINDS)}")
    env.update(extra_env or {})
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    log = log_dir / f"server-{kind}-{http_port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(kind, proc, url, dialect, health_port, ws_port, log, workers)
    if kind == "websockets":
        server.http_port = http_port
        _wait_tcp(server, http_port)
    else:
        _wait_ready(server)
    return server


def _wait_tcp(server: Server, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.label} not listening after {timeout:.0f} s; log: {server.log}")


@contextlib.contextmanager
def running_server(kind: str, log_dir: Path, **kw: Any) -> Any:
    server = start_server(kind, log_dir, **kw)
    try:
        yield server
    finally:
        server.stop()


# --- the machine and what runs on it ---------------------------------------------------------
def _cmd_out(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment() -> dict[str, Any]:
    from importlib import metadata

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "missing"

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    sio = PEERS / "socketio" / "node_modules" / "socket.io" / "package.json"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "trio_chat"])),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "trio": ver("trio"),
        "hypercorn": ver("hypercorn"),
        "wsproto": ver("wsproto"),
        "websockets": ver("websockets"),
        "node": _cmd_out(["node", "--version"]) if node_available() else "missing",
        "socket.io": json.loads(sio.read_text())["version"] if sio.exists() else "missing",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


# --- command line ----------------------------------------------------------------------------
def base_parser(
    description: str, default_servers: Iterable[str], *, store: bool = True, cluster: bool = True
) -> argparse.ArgumentParser:
    """The options every script shares; ``store``/``cluster``: our server's configuration."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if store:
        p.add_argument(
            "--store",
            choices=("sqlite", "memory"),
            default="sqlite",
            help="our server's TRIO_CHAT_STORE (sqlite: as make run)",
        )
    if cluster:
        p.add_argument(
            "--cluster",
            choices=("host", "off"),
            default="host",
            help="our server's TRIO_CHAT_CLUSTER (host: as make run, on a port of the run's own)",
        )
    p.add_argument(
        "--servers",
        default=",".join(default_servers),
        help=f"comma-separated server kinds to measure, in order; known: {', '.join(KINDS)}",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the server to CPU 0 and the load generator to CPU 1 (taskset)",
    )
    p.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    p.add_argument(
        "--results", type=Path, default=None, help="results folder (default: a new timestamped one)"
    )
    return p


def parse_servers(raw: str) -> list[str]:
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown server kind {k!r}; known: {', '.join(KINDS)}")
    return kinds


def pinning(pin: bool) -> tuple[bool, list[int] | None]:
    """Whether to pin, and the load generator's CPUs. Pins the calling process too."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or 0 not in cpus:
        return False, None
    load = [c for c in cpus if c != 0]
    os.sched_setaffinity(0, set(load))
    return True, load


# --- results -----------------------------------------------------------------------------------
class Results:
    def __init__(self, scenario: str, folder: Path | None = None) -> None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.folder = folder or BENCH / "results" / stamp
        self.folder.mkdir(parents=True, exist_ok=True)
        self.scenario = scenario
        self.data: dict[str, Any] = {"scenario": scenario, "env": environment(), "runs": []}

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    def add(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.save()

    def save(self) -> Path:
        path = self.folder / f"{self.scenario}.json"
        path.write_text(json.dumps(self.data, indent=2, default=str))
        return path

    def figure(self, name: str) -> Path:
        return self.folder / f"{self.scenario}{'-' + name if name else ''}.png"


def percentiles(h: HdrHistogram) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds (recorded in microseconds)."""
    if h.get_total_count() == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p999_ms": float("nan")}
    return {
        "p50_ms": h.get_value_at_percentile(50) / 1000,
        "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p999_ms": h.get_value_at_percentile(99.9) / 1000,
        "max_ms": h.get_max_value() / 1000,
    }


@dataclass
class Collected:
    """What the load workers saw in one measurement window."""

    delivered: int
    hist: HdrHistogram
    acks: int
    ack_hist: HdrHistogram
    load_cpu: float
    lag_max: float
    open: int
    unexpected_closes: int
    errors: list[str]
    per_worker_cpu: list[float]
    #: Deliveries and latency histogram per load worker (to split receivers into groups).
    per_worker: list[tuple[int, HdrHistogram]]
    #: Most messages one receiver counted, and how many receivers counted any.
    max_per_receiver: int = 0
    receivers_seen: int = 0


class LoadTracker:
    """Wraps a `LoadPool` to collect steps and compute the load generator's CPU use."""

    def __init__(self, pool: LoadPool) -> None:
        self.pool = pool
        self.last_cpu: list[float] | None = None

    def mark(self) -> None:
        replies = self.pool.call("collect", {"steps": []})
        self.last_cpu = [r["cpu"] for r in replies]

    def collect(self, steps: list[int] | None) -> Collected:
        replies = self.pool.call("collect", {"steps": steps})
        hist = new_histogram()
        ack_hist = new_histogram()
        delivered = acks = 0
        per_worker: list[tuple[int, HdrHistogram]] = []
        max_per = seen = 0
        for r in replies:
            mine = new_histogram()
            count = 0
            for s in r["steps"].values():
                count += s["count"]
                decode_hist_into(mine, s["hist"])
                max_per = max(max_per, s["max_per_receiver"])
                seen += s["receivers_seen"]
            delivered += count
            hist.add(mine)
            per_worker.append((count, mine))
            acks += r["acks"]["count"]
            decode_hist_into(ack_hist, r["acks"]["hist"])
        cpu = [r["cpu"] for r in replies]
        prev = self.last_cpu or [0.0] * len(cpu)
        self.last_cpu = cpu
        errors = [e for r in replies for e in r["errors"]]
        return Collected(
            delivered=delivered,
            hist=hist,
            acks=acks,
            ack_hist=ack_hist,
            load_cpu=sum(c - p for c, p in zip(cpu, prev, strict=True)),
            lag_max=max(r["lag_max"] for r in replies),
            open=sum(r["open"] for r in replies),
            unexpected_closes=sum(r["unexpected_closes"] for r in replies),
            errors=errors,
            per_worker_cpu=[c - p for c, p in zip(cpu, prev, strict=True)],
            per_worker=per_worker,
            max_per_receiver=max_per,
            receivers_seen=seen,
        )


def saturated(c: Collected, wall: float, load_cpus: list[int] | None) -> bool:
    """The load generator was the bottleneck: its CPUs (or one worker) were busy ≥ 90 %
    of the window."""
    capacity = len(load_cpus) if load_cpus else os.cpu_count() or 1
    busy = c.load_cpu / max(wall, 1e-9)
    one_worker_busy = max(c.per_worker_cpu, default=0) / max(wall, 1e-9)
    return busy >= 0.9 * capacity or one_worker_busy >= 0.9


def stalled(c: Collected) -> bool:
    """An event loop of the load generator fell > 100 ms behind its timer: with spare CPU
    that means the machine did not schedule it (other work on the cores), so latencies
    of that window include the stall."""
    return c.lag_max > 0.1


def connect_clients(
    pool: LoadPool,
    server: Server,
    count: int,
    prefix: str,
    rooms: list[str] | None,
    indices: list[int] | None = None,
    measure: bool = True,
    node_quota: list[dict[str, int]] | None = None,
    distinct_rooms: bool = False,
) -> list[dict[str, Any]]:
    """Open ``count`` clients spread over the given load workers, with a progress bar.

    Clients join ``rooms`` round-robin; with ``distinct_rooms`` each worker gets its own
    copies of the rooms (so one room per client across the whole pool).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    idx = list(range(len(pool))) if indices is None else indices
    shares = [count // len(idx) + (1 if i < count % len(idx) else 0) for i in range(len(idx))]
    progress_by: dict[int, int] = {}
    args = [
        {
            "url": server.url,
            "dialect": server.dialect,
            "count": n,
            "prefix": prefix,
            "rooms": [f"{r}-w{k}" for r in rooms] if rooms and distinct_rooms else rooms,
            "measure": measure,
            "node_quota": node_quota[k] if node_quota else None,
        }
        for k, n in enumerate(shares)
    ]
    t0 = time.monotonic()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        refresh_per_second=4,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(f"connecting {prefix} to {server.label}", total=count)

        def on_progress(i: int, n: Any) -> None:
            if i >= 0:
                progress_by[i] = int(n)
            bar.update(task, completed=sum(progress_by.values()))

        replies = pool.call("connect", args, indices=idx, on_progress=on_progress, timeout=900)
    opened = sum(r["opened"] for r in replies)
    elapsed = time.monotonic() - t0
    if count > 1:
        console.print(
            f"[dim]{opened:,} {prefix} clients connected to {server.label} in {elapsed:.1f} s[/]"
        )
    if opened < count:
        fails = [f for r in replies for f in r["failures"]]
        raise RuntimeError(f"only {opened}/{count} clients connected to {server.label}: {fails}")
    return list(replies)


def sleep_with_progress(seconds: float, description: str) -> None:
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        refresh_per_second=4,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=seconds)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            bar.update(task, completed=elapsed)
            time.sleep(min(0.25, seconds - elapsed))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def bar_plot(path: Path, title: str, labels: list[str], values: list[float], ylabel: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 3.6), dpi=100)
    bars = ax.bar(range(len(values)), values, color=["C0", "C1", "C2", "C3", "C4"][: len(values)])
    ax.set_xticks(range(len(values)), labels, rotation=12, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for b, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center")
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def run_servers(kinds: list[str], body: Any) -> None:
    """Call ``body(kind)`` per kind, skipping kinds that raise `Skip` with their message."""
    for kind in kinds:
        try:
            body(kind)
        except Skip as exc:
            console.print(f"[yellow]{exc}[/]")
