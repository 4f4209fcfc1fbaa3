"""A real server as a subprocess (``hypercorn trio_chat:app``) for tests of real clients."""

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
from typing import Any

import httpx
import psutil
import pytest
import trio

BIN = Path(sys.executable).parent
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``hypercorn trio_chat:app`` as a subprocess that can be stopped and started again."""

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_env = env or {}
        self.http_port = free_port()
        self.ws_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def chat_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def fallback_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def start(self) -> None:
        env = {
            **os.environ,
            "TRIO_CHAT_WS_BIND": f"127.0.0.1:{self.ws_port}",
            "TRIO_CHAT_DATA_DIR": str(self.data_dir),
            "TRIO_CHAT_CLUSTER": "off",
            **self.extra_env,
        }
        args = [str(BIN / "hypercorn"), "trio_chat:app", "--worker-class", "trio"]
        args += ["--bind", f"127.0.0.1:{self.http_port}"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                ok = httpx.get(self.base + "/healthz", timeout=1.0).status_code == 200
                with socket.create_connection(("127.0.0.1", self.ws_port), timeout=1.0):
                    pass
            except (httpx.HTTPError, OSError):
                ok = False
            if ok:
                return
            time.sleep(0.05)  # poll interval, bounded by the deadline
        pytest.fail(f"server not ready after {READY_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"server did not exit within 15s of SIGTERM:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stored(self, room: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.base}/api/rooms/{room}/messages", params={"limit": 200})
        resp.raise_for_status()
        messages: list[dict[str, Any]] = resp.json()["messages"]
        return messages

    def stored_texts(self, room: str) -> list[str]:
        return [m["text"] for m in self.stored(room)]


async def kill_group(proc: trio.Process) -> None:
    """SIGKILL a server's whole process group (hypercorn and its workers) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with trio.move_on_after(5, shield=True):
        await proc.wait()


def log_tail(path: Path, size: int = 6000) -> str:
    """The end of a server's log, for failure messages."""
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


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
