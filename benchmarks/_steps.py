"""One measured window of a publish scenario, shared by fan-out, server cost and cluster."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from _harness import (
    LoadTracker,
    connect_clients,
    console,
    percentiles,
    saturated,
    sleep_with_progress,
    stalled,
)
from _loadgen import new_histogram

if TYPE_CHECKING:
    import argparse

    from _harness import Server
    from _loadgen import LoadPool

#: A step passes when at least this share of the expected deliveries arrived ...
MIN_DELIVERED = 0.999
#: ... and the 99th percentile latency stayed under this many milliseconds.
MAX_P99_MS = 200.0
#: A ramp step that failed while the machine stalled the load generator (other work on the
#: cores) is measured again, at most this many times.
RETRIES = 3


def measure_step(
    pool: LoadPool,
    tracker: LoadTracker,
    server: Server,
    *,
    step: int,
    rate: float,
    duration: float,
    receivers: int,
    publishers: list[int],
    load_cpus: list[int] | None,
    drain: float = 1.0,
    size: int = 64,
    description: str = "",
    groups: dict[str, tuple[list[int], int]] | None = None,
) -> dict[str, Any]:
    """Publish ``rate`` msg/s (split over the ``publishers`` workers) for ``duration`` s,
    wait ``drain`` s for stragglers, and collect what the receivers saw.

    Expected deliveries are ``sent * receivers``: every receiver is in the room and counted;
    the publishers' own echoes are not measured.
    """
    server.check_alive()
    tracker.mark()
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    share = rate / len(publishers)
    for i in publishers:
        pool.send(i, "publish", {"step": step, "rate": share, "duration": duration, "size": size})
    sleep_with_progress(duration, description or f"step {step}: {rate:g} msg/s")
    sent = sum(r["sent"] for r in pool.wait(publishers, timeout=duration + 60))
    time.sleep(drain)
    wall = time.monotonic() - t0
    cpu = server.cpu_seconds() - cpu0
    got = tracker.collect([step])
    expected = sent * receivers
    result: dict[str, Any] = {
        "step": step,
        "rate": rate,
        "duration_s": duration,
        "sent": sent,
        "expected": expected,
        "delivered": got.delivered,
        "delivered_frac": got.delivered / expected if expected else float("nan"),
        "deliveries_per_s": got.delivered / duration,
        **percentiles(got.hist),
        "server_cpu_s": cpu,
        "server_cpu_pct": 100 * cpu / wall,
        "server_us_per_delivery": 1e6 * cpu / got.delivered if got.delivered else float("nan"),
        "server_rss_mb": server.rss_bytes() / 2**20,
        "load_cpu_pct": 100 * got.load_cpu / wall,
        "load_lag_max_ms": got.lag_max * 1000,
        "load_saturated": saturated(got, wall, load_cpus),
        "load_stalled": stalled(got),
        "acks": got.acks,
        "unexpected_closes": got.unexpected_closes,
        "errors": got.errors,
        "open_clients": got.open,
        "receivers_seen": got.receivers_seen,
        "max_per_receiver": got.max_per_receiver,
    }
    if got.max_per_receiver > sent:
        console.print(
            f"[red]a receiver counted {got.max_per_receiver} messages of {sent} sent "
            "(duplicates?)[/]"
        )
    for name, (workers, count) in (groups or {}).items():
        h = new_histogram()
        n = 0
        for i in workers:
            n += got.per_worker[i][0]
            h.add(got.per_worker[i][1])
        result[name] = {
            "receivers": count,
            "delivered": n,
            "delivered_frac": n / (sent * count) if sent * count else float("nan"),
            **percentiles(h),
        }
    if got.errors:
        console.print(f"[red]clients got errors: {got.errors[:3]}[/]")
    result["passed"] = bool(
        result["delivered_frac"] >= MIN_DELIVERED and result.get("p99_ms", 1e9) < MAX_P99_MS
    )
    return result


def setup_room(
    pool: LoadPool, server: Server, receivers: int, room: str = "bench"
) -> dict[str, float]:
    """Receivers on workers 1.., one publisher (not measured) on worker 0, all in ``room``;
    then wait until the server has digested the joins (see `settle`).

    Returns the setup's cost: seconds to connect and settle, server CPU seconds.
    """
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    connect_clients(pool, server, receivers, "r", [room], indices=list(range(1, len(pool))))
    connect_clients(pool, server, 1, "pub", [room], indices=[0], measure=False)
    connected = time.monotonic() - t0
    settle(server)
    return {
        "connect_s": connected,
        "setup_s": time.monotonic() - t0,
        "setup_server_cpu_s": server.cpu_seconds() - cpu0,
    }


def settle(server: Server, busy_pct: float = 10.0, max_seconds: float = 300.0) -> float:
    """Wait until the server's CPU use drops below ``busy_pct`` % for one second.

    Joins are not free: each one sends the room's member list to the newcomer and a
    presence event to every member, so R joins cost O(R^2) deliveries, still being written
    after the last ``joined`` reply. Measuring before they are done would charge them to
    the window. Returns the seconds waited.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_seconds:
        cpu0 = server.cpu_seconds()
        time.sleep(1.0)
        if 100 * (server.cpu_seconds() - cpu0) < busy_pct:
            break
    waited = time.monotonic() - t0
    if waited > 2:
        console.print(f"[yellow]server busy for {waited:.0f} s after the joins[/]")
    return waited


def idle_cpu(server: Server, seconds: float = 2.0) -> float:
    """The server's CPU share (percent of one core) while nothing is sent."""
    cpu0 = server.cpu_seconds()
    time.sleep(seconds)
    return 100 * (server.cpu_seconds() - cpu0) / seconds


def fixed_then_ramp(
    pool: LoadPool,
    tracker: LoadTracker,
    server: Server,
    args: argparse.Namespace,
    common: dict[str, Any],
    what: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """A warm-up (not recorded), the fixed-rate window, then the ramp.

    ``args`` holds the scripts' shared options (fixed rate and seconds, ramp start,
    factor, steps, step seconds, minutes). Returns the fixed window, every ramp step and
    the best passing one.
    """
    # Warm-up: caches, JIT (Node), first-time paths.
    measure_step(pool, tracker, server, step=1, rate=10, duration=2, **common, drain=0.5)
    fixed = measure_step(
        pool,
        tracker,
        server,
        step=2,
        rate=args.fixed_rate,
        duration=args.fixed_seconds,
        **common,
        description=f"{what}, fixed {args.fixed_rate:g} msg/s",
    )
    steps, best = ramp_from_args(pool, tracker, server, args, common, what)
    return fixed, steps, best


def ramp_from_args(
    pool: LoadPool,
    tracker: LoadTracker,
    server: Server,
    args: argparse.Namespace,
    common: dict[str, Any],
    what: str,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """`ramp` with the scripts' shared options (start, factor, steps, step seconds,
    minutes)."""
    return ramp(
        pool,
        tracker,
        server,
        rates=rates(args.start_rate, args.factor, args.max_steps),
        seconds=args.step_seconds,
        max_minutes=args.max_minutes,
        common=common,
        what=what,
    )


def rates(start: float, factor: float, steps: int) -> list[float]:
    return [round(start * factor**k, 1) for k in range(steps)]


def ramp(
    pool: LoadPool,
    tracker: LoadTracker,
    server: Server,
    *,
    rates: list[float],
    seconds: float,
    max_minutes: float,
    common: dict[str, Any],
    what: str,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Step the publish rate up until a step fails (retried up to `RETRIES` times when the
    load generator was stalled by the machine), the load generator saturates, or the time
    bound is used up.

    Returns every step and the best passing one.
    """
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    deadline = time.monotonic() + max_minutes * 60
    for k, rate in enumerate(rates):
        if time.monotonic() > deadline:
            console.print("[yellow]time budget of the ramp used up; stopping[/]")
            break
        for attempt in range(RETRIES + 1):
            r = measure_step(
                pool,
                tracker,
                server,
                step=10 + (RETRIES + 1) * k + attempt,
                rate=rate,
                duration=seconds,
                **common,
                description=f"{what}, ramp {rate:g} msg/s",
            )
            if r["passed"] or not r["load_stalled"] or r["unexpected_closes"]:
                break
            if attempt < RETRIES:
                console.print(f"  {rate:g} msg/s failed while the load generator stalled; again")
        steps.append(r)
        console.print(
            f"  {rate:>8g} msg/s: {r['deliveries_per_s']:>10,.0f} deliveries/s, "
            f"{100 * r['delivered_frac']:.2f}% arrived, p99 {r['p99_ms']:.1f} ms, "
            f"server CPU {r['server_cpu_pct']:.0f}%, load CPU {r['load_cpu_pct']:.0f}%"
            + (" [red]load saturated[/]" if r["load_saturated"] else "")
            + (" [yellow]load stalled[/]" if r["load_stalled"] else "")
            + (f" [red]{r['unexpected_closes']} closed[/]" if r["unexpected_closes"] else "")
            + ("" if r["passed"] else " [red]FAIL[/]")
        )
        if r["passed"]:
            best = r
        if not r["passed"] or r["unexpected_closes"]:
            break
        if r["load_saturated"]:
            console.print("[yellow]load generator saturated; stopping the ramp[/]")
            break
    return steps, best
