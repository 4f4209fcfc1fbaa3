"""A real trio-chat server as a subprocess: the one way tests start, stop, kill and reap one.

`ServerProcess` runs ``hypercorn trio_chat:app --worker-class trio`` or ``trio-chat serve``
in a process group of its own (hypercorn runs its workers in child processes), on free
127.0.0.1 ports or an address of a network namespace, with its own data directory. Its
ports are chosen once, so a restart serves at the same addresses. Async tests await its
methods; the synchronous browser tests run them with ``trio.run``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import psutil
import pytest
import trio

from _netns import WAIT, http_get, metric, open_stream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping, Sequence

BIN: Final = Path(sys.executable).parent
#: A server process (hypercorn, then its workers) answers /healthz within this.
READY_TIMEOUT: Final = 20.0
#: How long a server may take to exit after SIGTERM: hypercorn's graceful timeout is 3 s
#: and the chat node's shutdown grace 3 s.
EXIT_TIMEOUT: Final = 8.0
#: The bound on `ServerProcess.stop`, which is teardown: generous, a slow exit is not its test.
STOP_TIMEOUT: Final = 15.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 now (the cluster port of one test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A trio-chat server process (and its workers) in a process group of its own.

    Args:
      data_dir: its ``TRIO_CHAT_DATA_DIR`` (node identity, history, host cluster key).
      log_path: where its stdout and stderr go (appended, so a restart keeps one log).
      host: the address its HTTP side and chat socket bind to.
      http_port, ws_port: their ports (default: free ones); kept across restarts.
      env: ``TRIO_CHAT_*`` settings over the defaults here (cluster off, no rate limit).
      limit_rate: keep the server's own rate limit instead of turning it off.
      workers: ``--workers``.
      cli: run ``trio-chat serve`` (our supervisor) instead of ``hypercorn``.
      args: more arguments for the command.
      netns: the network namespace to run in, or None for this one.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        ws_port: int | None = None,
        env: Mapping[str, str] | None = None,
        limit_rate: bool = False,
        workers: int = 1,
        cli: bool = False,
        args: Sequence[str] = (),
        netns: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.host = host
        self.http_port = free_port() if http_port is None else http_port
        self.ws_port = free_port() if ws_port is None else ws_port
        self.cli = cli
        self.netns = netns
        self.args = ["--workers", str(workers)] if workers > 1 else []
        self.args += args
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TRIO_CHAT_DATA_DIR": str(data_dir),
            "TRIO_CHAT_WS_BIND": f"{host}:{self.ws_port}",
            "TRIO_CHAT_HTTP_URL": self.http_url,
            "TRIO_CHAT_CLUSTER": "off",
            **({} if limit_rate else {"TRIO_CHAT_RATE_LIMIT": "0"}),
            **(env or {}),
        }
        self.proc: trio.Process | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def chat_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/ws"

    @property
    def fallback_url(self) -> str:
        return f"ws://{self.host}:{self.http_port}/ws"

    async def spawn(self) -> trio.Process:
        """Start the process; do not wait for it to be ready (see `wait_ready`)."""
        if self.cli:
            args = [str(BIN / "trio-chat"), "serve"]
        else:
            args = [str(BIN / "hypercorn"), "trio_chat:app", "--worker-class", "trio"]
        args += ["--bind", f"{self.host}:{self.http_port}", *self.args]
        if self.netns is not None:
            args = ["ip", "netns", "exec", self.netns, *args]
        with self.log_path.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.proc

    async def wait_ready(self) -> None:
        """Wait until ``/healthz`` and the chat socket answer; fail if the process exits
        or is not ready within `READY_TIMEOUT`."""
        with trio.move_on_after(READY_TIMEOUT):
            while not await self._ready():  # noqa: ASYNC110
                await trio.sleep(0.05)  # poll interval, bounded by READY_TIMEOUT
            return
        pytest.fail(f"server not ready after {READY_TIMEOUT} s:\n{self.log()}")

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
        status, _ = await self.get("/healthz")
        if status != 200:
            return False
        try:
            stream = await open_stream(self.host, self.ws_port, self.netns)
        except OSError:
            return False
        await stream.aclose()
        return True

    async def start(self) -> None:
        """`spawn`, then `wait_ready`."""
        await self.spawn()
        await self.wait_ready()

    def signal(self, signum: int, *, group: bool = False) -> None:
        """Send ``signum`` to the server process, or to its whole process group."""
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    async def wait_exit(self, limit: float = EXIT_TIMEOUT) -> int:
        """Wait for the server process to exit; fail after ``limit`` seconds."""
        assert self.proc is not None
        with trio.move_on_after(limit):
            return await self.proc.wait()
        pytest.fail(f"server still running {limit} s after the signal:\n{self.log()}")

    async def stop(self) -> None:
        """SIGTERM, wait for a graceful exit (fail after `STOP_TIMEOUT`), reap the group.

        Safe to call twice, or after the process exited.
        """
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await self.wait_exit(STOP_TIMEOUT)
        finally:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the whole process group (server and workers) and reap the server.

        Safe to call twice, or after the process exited.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with trio.move_on_after(5, shield=True):
            await proc.wait()

    async def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` (from inside the server's namespace): status and body; 0 if down."""
        return await http_get(self.http_url + path, self.netns)

    async def metrics(self) -> str:
        """The ``/metrics`` page of one worker (any of them)."""
        status, text = await self.get("/metrics")
        assert status == 200, status
        return text

    async def wait_metric(self, name: str, predicate: Callable[[float], bool]) -> float:
        """Poll ``/metrics`` until ``name``'s value satisfies ``predicate``."""
        value: float | None = None
        with trio.move_on_after(WAIT):
            while True:
                value = metric(await self.metrics(), name)
                if value is not None and predicate(value):
                    return value
                await trio.sleep(0.1)  # poll interval: no event exists for another process
        raise AssertionError(f"{name} is {value} after {WAIT} s:\n{self.log()}")

    def stored(self, room: str) -> list[dict[str, Any]]:
        """The stored messages of ``room`` (HTTP API; blocking, for threads and sync tests)."""
        resp = httpx.get(f"{self.http_url}/api/rooms/{room}/messages", params={"limit": 200})
        resp.raise_for_status()
        messages: list[dict[str, Any]] = resp.json()["messages"]
        return messages

    def stored_texts(self, room: str) -> list[str]:
        return [m["text"] for m in self.stored(room)]

    def log(self) -> str:
        """The end of the server's log, for failure messages."""
        return log_tail(self.log_path)


def log_tail(log_path: Path) -> str:
    """The end of a server's log, for failure messages."""
    try:
        return log_path.read_text(errors="replace")[-6000:]
    except OSError:
        return "(no log)"


def wait_healthy(
    proc: subprocess.Popen[bytes], base: str, log_path: Path, *, limit: float, verify: Any = True
) -> None:
    """Poll ``base``/healthz until it answers 200 (for servers started with Popen).

    Fails with the log's tail when the process exits or ``limit`` seconds pass.
    """
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, log_tail(log_path)
        try:
            if httpx.get(base + "/healthz", verify=verify, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log_tail(log_path)
        time.sleep(0.05)  # poll interval, bounded by the deadline


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, **kwargs: Any) -> AsyncIterator[ServerProcess]:
    """A started `ServerProcess` in ``tmp_path``; killed (group and all) when the block ends."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", **kwargs)
    try:
        await server.start()
        yield server
    finally:
        await server.kill()


def worker_pids(supervisor: int, data_dir: Path) -> dict[str, int]:
    """Node id -> pid of each worker under the ``trio-chat serve`` process ``supervisor``.

    A worker is the descendant holding its node's slot lock (``node/slot-N.lock``).
    """
    host_id = (data_dir / "node" / "host-id").read_text().strip()
    found = {}
    for child in psutil.Process(supervisor).children():
        try:
            files = child.open_files()
        except psutil.NoSuchProcess:
            continue
        for f in files:
            if match := re.search(r"slot-(\d+)\.lock$", f.path):
                found[f"{host_id}-{match.group(1)}"] = child.pid
    return found
