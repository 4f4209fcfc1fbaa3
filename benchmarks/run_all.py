"""Run every benchmark scenario once, one after the other, into one results folder, and write
``summary.md`` there: the tables ``docs/benchmarks.md`` quotes.

``--quick`` shrinks every scenario (about 5 minutes in all) to check that everything
works; the default is the issues' full size (about 25 minutes on a 2-core machine).
``--summarize FOLDER`` only rebuilds ``summary.md`` from the JSON files of an earlier run.

Example: ``python benchmarks/run_all.py --only server_cost,idle``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent

#: scenario -> (full-size arguments, quick arguments)
PLAN: dict[str, tuple[list[str], list[str]]] = {
    "server_cost": ([], ["--receivers", "200", "--seconds", "5"]),
    "fanout": (
        ["--receivers", "100,1000", "--factor", "2", "--max-minutes", "2"],
        ["--receivers", "100", "--fixed-seconds", "3", "--step-seconds", "2", "--factor", "3"],
    ),
    "fanout5000": (
        [
            "--receivers",
            "5000",
            "--servers",
            "ours,socketio,websockets",
            "--factor",
            "2",
            "--max-minutes",
            "1.5",
        ],
        [],
    ),
    "many_to_many": ([], ["--clients", "50", "--seconds", "5"]),
    "idle": ([], ["--connections", "1000", "--settle", "2"]),
    "persistence": ([], ["--seconds", "4"]),
    "cluster": ([], ["--receivers", "100", "--local", "20", "--fixed-seconds", "3"]),
    "join_storm": ([], ["--smoke"]),
}


def run(folder: Path, names: list[str], quick: bool, extra: list[str]) -> None:
    for name in names:
        full, small = PLAN[name]
        args = small if quick else full
        if quick and not args and name == "fanout5000":
            continue
        script = "fanout.py" if name.startswith("fanout") else f"{name}.py"
        sub = folder / name if name == "fanout5000" else folder
        cmd = [sys.executable, str(BENCH / script), *args, *extra, "--results", str(sub)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        done = subprocess.run(cmd, check=False)
        print(f"=== {name}: exit {done.returncode} after {time.monotonic() - t0:.0f} s", flush=True)


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarize(folder: Path) -> str:
    out: list[str] = [f"# Benchmark run {folder.name}", ""]
    env = None
    for name in PLAN:
        data = _load(folder / f"{name}.json")
        if data and env is None:
            env = data["env"]
    if env:
        out += [
            f"Date {env['date']}, commit {env['git']}{' (dirty)' if env['git_dirty'] else ''}, "
            f"{env['cpus']} x {env['cpu']}, Linux {env['kernel']}, Python {env['python']}, "
            f"trio {env['trio']}, hypercorn {env['hypercorn']}, wsproto {env['wsproto']}, "
            f"websockets {env['websockets']}, Node {env['node']}, socket.io {env['socket.io']}.",
            "",
        ]
    data = _load(folder / "server_cost.json")
    if data:
        p = data["params"]
        out += [
            f"## Server cost: {p['receivers']:,} receivers x {p['rate']:g} msg/s, "
            f"{p['seconds']:g} s window",
            "",
            "| server | µs CPU/delivery | server CPU % | p50 ms | p99 ms | p99.9 ms | delivered % "
            "| RSS MB | load |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in data["runs"]:
            out.append(
                f"| {r['label']} | {_f(r['server_us_per_delivery'])} | "
                f"{_f(r['server_cpu_pct'])} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                f"{_f(r['p999_ms'])} | {_f(100 * r['delivered_frac'], 2)} | "
                f"{_f(r['server_rss_mb'], 0)} | {_load_note(r)} |"
            )
        out.append("")
    fan_runs: list[dict[str, Any]] = []
    for path in (folder / "fanout.json", folder / "fanout5000" / "fanout.json"):
        d = _load(path)
        if d:
            fan_runs += d["runs"]
    if fan_runs:
        out += [
            "## Fan-out: one publisher, R receivers in one room",
            "",
            "Latency at 10 msg/s; max = highest stepped rate with ≥ 99.9 % delivered and "
            "p99 < 200 ms (a lower bound where the load generator saturated).",
            "",
            "| server | R | p50 ms | p99 ms | p99.9 ms | µs CPU/delivery | max deliveries/s "
            "| ramp ended by |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in sorted(fan_runs, key=lambda r: (r["receivers"], r["server"])):
            f = r["fixed"]
            last = r["ramp"][-1] if r["ramp"] else None
            ended = "-"
            if last:
                if last["load_saturated"]:
                    ended = "load generator saturated"
                elif not last["passed"]:
                    ended = (
                        f"fail at {last['rate']:g} msg/s "
                        f"({100 * last['delivered_frac']:.1f} %, p99 {last['p99_ms']:.0f} ms)"
                    )
                else:
                    ended = "time/step bound"
            out.append(
                f"| {r['label']} | {r['receivers']:,} | {_f(f['p50_ms'])} | {_f(f['p99_ms'])} | "
                f"{_f(f['p999_ms'])} | {_f(f['server_us_per_delivery'])} | "
                f"{_f(r['max_deliveries_per_s'], 0)} | {ended} |"
            )
        out.append("")
    data = _load(folder / "many_to_many.json")
    if data:
        p = data["params"]
        out += [
            f"## Many-to-many: {p['clients']} clients x {p['rate']:g} msg/s in one room",
            "",
            "| server | deliveries/s | delivered % | p50 ms | p99 ms | p99.9 ms | µs CPU/delivery "
            "| load |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in data["runs"]:
            out.append(
                f"| {r['label']} | {_f(r['deliveries_per_s'], 0)} | "
                f"{_f(100 * r['delivered_frac'], 2)} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                f"{_f(r['p999_ms'])} | {_f(r['server_us_per_delivery'])} | {_load_note(r)} |"
            )
        out.append("")
    data = _load(folder / "idle.json")
    if data:
        p = data["params"]
        out += [
            f"## Idle connections: {p['connections']:,}, {p['per_room']} per room",
            "",
            "| server | KB/connection | RSS before MB | RSS after MB | open at end |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in data["runs"]:
            out.append(
                f"| {r['label']} | {_f(r['kb_per_connection'])} | {_f(r['rss_before_mb'])} | "
                f"{_f(r['rss_after_mb'])} | {r['still_open']:,} |"
            )
        out.append("")
    data = _load(folder / "persistence.json")
    if data:
        p = data["params"]
        out += [
            f"## Persistence: {p['senders']} senders x {p['window']} in flight, {p['seconds']:g} s",
            "",
            "| server, store | accepted msg/s | ack p50 ms | ack p99 ms | µs CPU/accept |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in data["runs"]:
            out.append(
                f"| {r['label']} | {_f(r['acks_per_s'], 0)} | {_f(r['ack_p50_ms'])} | "
                f"{_f(r['ack_p99_ms'])} | {_f(r['server_us_per_accept'])} |"
            )
        out.append("")
    data = _load(folder / "cluster.json")
    if data and data["runs"]:
        r = data["runs"][0]
        f = r["fixed"]
        out += [
            f"## Cluster: {r['workers']} workers, multicast on loopback",
            "",
            f"At {data['params']['fixed_rate']:g} msg/s: "
            f"{_f(f['server_us_per_delivery'])} µs server CPU per delivery (all workers); "
            f"max {_f(r['max_deliveries_per_s'], 0)} deliveries/s"
            + (" (load generator saturated)" if r["client_bound"] else "")
            + ".",
            "",
            "| receivers | count | delivered % | p50 ms | p99 ms | p99.9 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for group in ("local", "remote"):
            g = f[group]
            out.append(
                f"| {group} | {g['receivers']:,} | {_f(100 * g['delivered_frac'], 2)} | "
                f"{_f(g['p50_ms'])} | {_f(g['p99_ms'])} | {_f(g['p999_ms'])} |"
            )
        out.append("")
    data = _load(folder / "join_storm.json")
    if data:
        ref = {r["clients"]: r["seconds"] for r in data["runs"] if r["server"] == "websockets"}
        out += [
            "## Join storm: N clients connect (ours: and join one room)",
            "",
            "| server | N | seconds | x websockets | server CPU s | CPU ms per client |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in sorted(data["runs"], key=lambda r: (r["server"], r["clients"])):
            n = r["clients"]
            out.append(
                f"| {r['label']} | {n:,} | {_f(r['seconds'], 2)} | "
                f"{_f(r['seconds'] / ref[n], 2) if n in ref else '-'} | "
                f"{_f(r['server_cpu_s'], 2)} | {_f(1000 * r['server_cpu_s'] / n, 2)} |"
            )
        out.append("")
    return "\n".join(out)


def _load_note(r: dict[str, Any]) -> str:
    notes = []
    if r.get("load_saturated"):
        notes.append("saturated")
    if r.get("load_stalled"):
        notes.append(f"stalled {r['load_lag_max_ms']:.0f} ms")
    return ", ".join(notes) or "ok"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a ~5 minute check")
    p.add_argument("--only", default=",".join(PLAN), help=f"scenarios, from {', '.join(PLAN)}")
    p.add_argument("--summarize", type=Path, help="only rebuild summary.md of this folder")
    p.add_argument("--results", type=Path, help="results folder (default: new timestamped)")
    args, extra = p.parse_known_args()
    if args.summarize:
        folder = args.summarize
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = args.results or BENCH / "results" / f"all-{stamp}"
        folder.mkdir(parents=True, exist_ok=True)
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in PLAN]
        if unknown:
            raise SystemExit(f"unknown scenarios {unknown}; known: {', '.join(PLAN)}")
        run(folder, names, args.quick, extra)
    text = summarize(folder)
    (folder / "summary.md").write_text(text + "\n")
    print(text)
    print(f"\nsummary: {folder / 'summary.md'}")


if __name__ == "__main__":
    main()
