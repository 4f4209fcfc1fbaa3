"""Operating several workers: metrics and logs per worker, two deployments on one host.

Real processes only: ``trio-chat serve --workers 2`` (our supervisor) and ``hypercorn
trio_chat:app --workers 2`` (hypercorn's), on free 127.0.0.1 ports with their own data
directories. Network rules: the cluster link runs in host mode on 127.0.0.1 with TTL 0,
each deployment with its own key (made in its data directory) and so its own derived
port, or, where a test puts two deployments on one port on purpose, a free port of its
own. Nothing sleeps to wait: tests poll ``/metrics`` or the log with a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio
from hypercorn.config import Config
from test_cluster_processes import members_on_distinct_nodes

from trio_chat import Settings
from trio_chat.app._logs import _Formatter
from trio_chat.app._supervisor import _STOP_WAIT
from trio_chat.link._packet import derived_port

from _netns import WAIT, http_get, metric
from _server_process import BIN, ServerProcess, free_udp_port, running_server, worker_pids

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.slow

#: A text log line: time, level, [node], logger: message.
TEXT_LINE: Final = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
    r" \[([^\]]+)\] (\S+): (.*)$"
)
#: What ``trio-chat serve`` prints before it starts (what to open, where the data is).
BANNER: Final = "trio-chat: "
HOST_MODE: Final = {
    "TRIO_CHAT_CLUSTER": "host",
    "TRIO_CHAT_CLUSTER_INTERFACE": "127.0.0.1",
    "TRIO_CHAT_CLUSTER_TTL": "0",
}


def host_id(data_dir: Path) -> str:
    return (data_dir / "node" / "host-id").read_text().strip()


def log_lines(server: ServerProcess) -> list[str]:
    """The log lines of a server (not the banner ``trio-chat serve`` prints first)."""
    lines = server.log_path.read_text().splitlines()
    return [line for line in lines if line and not line.startswith(BANNER)]


async def wait_log(server: ServerProcess, what: str, predicate: Callable[[str], bool]) -> None:
    """Poll the server's log until ``predicate(text)``; fail after `WAIT` seconds."""
    with trio.move_on_after(WAIT):
        while not predicate(server.log_path.read_text()):  # noqa: ASYNC110
            await trio.sleep(0.05)  # poll interval: the log is another process's
        return
    pytest.fail(f"no {what} in the log after {WAIT} s:\n{server.log()}")


def scrape_samples(text: str) -> dict[str, float]:
    """A ``/metrics`` page's samples: series (with labels) -> value."""
    pairs = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {series: float(value) for series, value in pairs}


# -- metrics ------------------------------------------------------------------------------


async def test_each_workers_metrics_carry_its_node_id(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, cli=True, workers=2) as server,
        trio.open_nursery() as nursery,
    ):
        alice, bob = await members_on_distinct_nodes(nursery, server, 2)
        # Different counts on each worker: a scrape of one must never show the other's.
        sent = {alice.node: 3, bob.node: 5}
        for member in (alice, bob):
            await member.join("lobby")
            for i in range(sent[member.node]):
                await member.say("lobby", f"{member.name} {i}")
        seen: dict[str, dict[str, float]] = {}
        with trio.move_on_after(WAIT):
            while len(seen) < 2:
                status, text = await http_get(server.http_url + "/metrics")
                assert status == 200
                samples = scrape_samples(text)
                workers = {re.search(r'\{worker="([^"]+)"', s)[1] for s in samples}  # type: ignore[index]
                # Every sample of one page is labelled, with one worker: the one that answered.
                assert all('{worker="' in series for series in samples), text
                assert len(workers) == 1, workers
                (worker,) = workers
                assert worker in sent, (worker, sent)
                assert metric(text, "trio_chat_messages_in_total") == sent[worker]
                seen[worker] = samples
        assert set(seen) == set(sent), f"scrapes reached only {sorted(seen)}"
        for member in (alice, bob):
            await member.close()


# -- logs ---------------------------------------------------------------------------------


async def two_workers_run(tmp_path: Path, *, cli: bool, **env: str) -> ServerProcess:
    """Start two workers, wait for both to be ready, stop them: the log is then complete."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", workers=2, cli=cli, env=env)
    try:
        await server.start()
        await wait_log(server, "two ready workers", lambda text: text.count(" ready; ") == 2)
        await server.stop()
    finally:
        await server.kill()
    return server


@pytest.mark.parametrize("cli", [True, False], ids=["trio-chat-serve", "hypercorn"])
async def test_every_line_names_its_node_and_hypercorns_are_printed_once(
    tmp_path: Path, cli: bool
) -> None:
    server = await two_workers_run(tmp_path, cli=cli)
    nodes = {f"{host_id(server.data_dir)}-{slot}" for slot in (0, 1)}
    lines = log_lines(server)
    running: dict[str, int] = {}
    for line in lines:
        match = TEXT_LINE.match(line)
        assert match, f"not a log line of ours: {line!r}\n{server.log()}"
        _, node, logger, message = match.groups()
        assert node in (nodes | {"supervisor"} if cli else nodes), line
        if logger == "hypercorn.error" and message.startswith("Running on "):
            running[node] = running.get(node, 0) + 1
        if " ready; " in message:
            assert message.endswith(f"; data in {server.data_dir}"), line
    # Each worker says where it runs once: hypercorn's handler and ours printed it twice.
    assert running == dict.fromkeys(nodes, 1), server.log()
    if cli:
        assert any("[supervisor] trio_chat.supervisor: worker 1 started" in x for x in lines)


async def test_json_lines_parse_and_carry_the_node(tmp_path: Path) -> None:
    server = await two_workers_run(tmp_path, cli=True, TRIO_CHAT_LOG_FORMAT="json")
    nodes = {f"{host_id(server.data_dir)}-{slot}" for slot in (0, 1)}
    objects = [json.loads(line) for line in log_lines(server)]
    assert objects
    for obj in objects:
        assert {"time", "level", "logger", "node", "message"} <= set(obj), obj
        assert obj["node"] in nodes | {"supervisor"}, obj
        assert obj["time"].endswith("+00:00"), obj
    running = [o["node"] for o in objects if o["message"].startswith("Running on ")]
    assert sorted(running) == sorted(nodes)


def test_json_lines_carry_a_lines_own_fields_and_its_exception() -> None:
    formatter = _Formatter()
    formatter.json = True
    record = logging.LogRecord(
        "trio_chat.websocket", logging.INFO, __file__, 1, "%s closed", ("a",), None
    )
    for key, value in {
        "node": "abc123-0",
        "client": "192.0.2.7",
        "code": 1000,
        "path": Path("/x"),
    }.items():
        setattr(record, key, value)
    line = json.loads(formatter.format(record))
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "logger": "trio_chat.websocket",
        "node": "abc123-0",
        "message": "a closed",
        "client": "192.0.2.7",
        "code": 1000,
        "path": "/x",
    }
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failed = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), (ValueError, exc, exc.__traceback__)
        )
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]


async def test_the_log_level_filters_ours_and_hypercorns(tmp_path: Path) -> None:
    quiet = ServerProcess(
        tmp_path / "quiet",
        tmp_path / "quiet.log",
        workers=2,
        cli=True,
        env={"TRIO_CHAT_LOG_LEVEL": "warning"},
    )
    try:
        await quiet.start()
        pids = worker_pids(quiet.proc.pid, quiet.data_dir)  # type: ignore[union-attr]
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        await wait_log(quiet, "a restart", lambda text: "restarting worker" in text)
        await quiet.stop()
    finally:
        await quiet.kill()
    levels = {TEXT_LINE.match(line)[1] for line in log_lines(quiet)}  # type: ignore[index]
    assert levels == {"WARNING", "ERROR"}, quiet.log()

    async with running_server(tmp_path, env={"TRIO_CHAT_LOG_LEVEL": "DEBUG"}) as chatty:
        # A refused Host is a client's mistake: logged at DEBUG only.
        async with httpx.AsyncClient() as http:
            response = await http.get(chatty.http_url + "/healthz", headers={"Host": "evil.test"})
        assert response.status_code == 400
        await wait_log(chatty, "a DEBUG line", lambda text: "bad_host" in text)
    assert any(" DEBUG " in x and "refused a request" in x for x in log_lines(chatty)), chatty.log()


# -- two deployments on one host ----------------------------------------------------------


def deployment(tmp_path: Path, name: str, **env: str) -> ServerProcess:
    return ServerProcess(
        tmp_path / name,
        tmp_path / f"{name}.log",
        workers=2,
        cli=True,
        env={**HOST_MODE, **env},
    )


async def cluster_check(env: dict[str, str], cwd: Path | None = None) -> tuple[int, str]:
    result = await trio.run_process(
        [str(BIN / "trio-chat"), "cluster", "--seconds", "3"],
        env=env,
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


async def test_two_deployments_on_one_host_each_keep_to_their_own(tmp_path: Path) -> None:
    servers = [deployment(tmp_path, "blue"), deployment(tmp_path, "green")]
    try:
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(server.start)
        for server in servers:
            # Each worker sees the other worker of its deployment, and nobody else.
            await server.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        ports = [derived_port((s.data_dir / "cluster.key").read_bytes().strip()) for s in servers]
        assert ports[0] != ports[1]
        for server, port in zip(servers, ports, strict=True):
            code, out = await cluster_check(server.env)
            assert code == 0, out
            assert f"Joining 239.255.77.77:{port} " in out, out
            assert "OK: 2 peer(s) seen." in out, out
            assert "another secret" not in out, out
            assert metric(await server.metrics(), "trio_chat_cluster_packets_foreign") == 0
    finally:
        for server in servers:
            await server.kill()


async def test_cluster_check_tells_another_deployment_from_a_wrong_secret(
    tmp_path: Path,
) -> None:
    # Both on one port on purpose: what an explicit TRIO_CHAT_CLUSTER_PORT can still do.
    port = {"TRIO_CHAT_CLUSTER_PORT": str(free_udp_port())}
    blue, green = deployment(tmp_path, "blue", **port), deployment(tmp_path, "green", **port)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blue.start)
            nursery.start_soon(green.start)
        for server in (blue, green):
            await server.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        code, out = await cluster_check(blue.env)
        assert code == 0, out
        assert "OK: 2 peer(s) seen." in out, out
        green_nodes = ", ".join(repr(f"{host_id(green.data_dir)}-{slot}") for slot in (0, 1))
        assert f"ANOTHER DEPLOYMENT: {green_nodes} belong to another data directory" in out
        assert "MISMATCH" not in out, out

        # Blue's own data directory with another secret: blue's nodes are a real mismatch.
        wrong = {**blue.env, "TRIO_CHAT_CLUSTER_SECRET": os.urandom(16).hex()}
        code, out = await cluster_check(wrong)
        assert code == 1, out
        blue_nodes = ", ".join(repr(f"{host_id(blue.data_dir)}-{slot}") for slot in (0, 1))
        assert f"MISMATCH: {blue_nodes} share this data directory's host id" in out, out
        assert f"ANOTHER DEPLOYMENT: {green_nodes}" in out, out
    finally:
        for server in (blue, green):
            await server.kill()


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}
    env["TRIO_CHAT_JWT_KEY"] = "k" * 32
    for args in (["cluster", "--seconds", "1"], ["settings"], ["token", "--sub", "ann"]):
        result = subprocess.run(
            [str(BIN / "trio-chat"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert list(tmp_path.iterdir()) == [], (args, result.stderr)
        if args[0] == "cluster":
            assert result.returncode == 2
            assert f"no cluster key in {tmp_path / 'data' / 'cluster.key'}" in result.stderr
        else:
            assert result.returncode == 0, result.stderr


# -- the systemd unit ---------------------------------------------------------------------

UNIT: Final = Path(__file__).parent.parent / "deploy" / "trio-chat.service"
SYSTEMD_ANALYZE: Final = shutil.which("systemd-analyze")


def unit_values() -> dict[str, list[str]]:
    """The unit's settings: key -> values in order (comments and sections left out)."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="no systemd-analyze here (CI installs Debian's systemd package, which has it)",
)
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: this checkout's, in place of /opt's.
    unit = tmp_path / "trio-chat.service"
    unit.write_text(
        UNIT.read_text().replace("/opt/trio-chat/bin/trio-chat", str(BIN / "trio-chat"))
    )
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for an unknown key or a bad value: what it says is the verdict.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_systemd_unit_waits_out_the_shutdown_and_writes_only_its_data() -> None:
    values = unit_values()
    graceful = Config().graceful_timeout
    # A worker's stop fits in the supervisor's wait, and that in systemd's.
    assert Settings().shutdown_grace + graceful < _STOP_WAIT < float(values["TimeoutStopSec"][0])
    assert values["KillMode"] == ["mixed"]
    data_dir = "/var/lib/trio-chat"
    assert f"TRIO_CHAT_DATA_DIR={data_dir}" in values["Environment"]
    assert values["ReadWritePaths"] == [data_dir]
    assert values["StateDirectory"] == [Path(data_dir).name]
    assert values["ProtectSystem"] == ["strict"]
    assert values["CapabilityBoundingSet"] == [""]
    assert set(values["RestrictAddressFamilies"][0].split()) >= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "--workers" in values["ExecStart"][0]
