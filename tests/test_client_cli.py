"""The terminal client (``trio-chat client``) as real processes against a real server.

Each test starts hypercorn as a subprocess on free 127.0.0.1 ports with its own data
directory, and ``trio-chat client`` processes with piped stdin/stdout. Nothing sleeps to
wait: the tests wait for output lines, or poll with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio

from _server_process import BIN, ServerProcess
from conftest import fill

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.slow

LINE_TIMEOUT = 15.0


# --------------------------------------------------------------------------- server process


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "data", tmp_path / "server.log", limit_rate=True)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


# --------------------------------------------------------------------------- client process


class Client:
    """A ``trio-chat client`` process; lines go to its stdin, output is read line by line."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._buffer = b""
        self._seen = 0

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")

    async def expect(self, pattern: str) -> str:
        """Return the next output line (after the last one matched) matching ``pattern``."""
        rx = re.compile(pattern)
        with trio.move_on_after(LINE_TIMEOUT):
            while True:
                while self._seen < len(self.lines):
                    line = self.lines[self._seen]
                    self._seen += 1
                    if rx.search(line):
                        return line
                await self._read_more()
        pytest.fail(f"{self.name}: no line matching {pattern!r}; output:\n" + self.output())

    async def _read_more(self) -> None:
        assert self.proc.stdout is not None
        data = await self.proc.stdout.receive_some(65536)
        if not data:
            pytest.fail(f"{self.name}: output ended; output:\n" + self.output())
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines.extend(x.decode(errors="replace") for x in complete)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    started: list[Client] = []
    yield started
    for c in started:
        if c.proc.returncode is None:
            c.proc.kill()
        with trio.move_on_after(5, shield=True):
            await c.proc.wait()


async def start_client(
    clients: list[Client], url: str, name: str, *rooms: str, stdin: int = subprocess.PIPE
) -> Client:
    args = [str(BIN / "trio-chat"), "client", url, "--name", name, "--max-backoff", "1"]
    for room in rooms:
        args += ["--room", room]
    proc = await trio.lowlevel.open_process(
        args,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    client = Client(proc, name)
    clients.append(client)
    return client


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("transport", ["chat", "fallback"])
async def test_two_clients_chat_join_leave_quit(
    server: ServerProcess, clients: list[Client], transport: str
) -> None:
    url = server.chat_url if transport == "chat" else server.fallback_url
    with trio.fail_after(60):
        alice = await start_client(clients, url, "alice", "general")
        await alice.expect(r"^\* joined #general")
        bob = await start_client(clients, url, "bob", "general")
        await bob.expect(r"^\* joined #general: .*alice")
        await alice.expect(r"#general: bob joined")

        await alice.say("hello from alice")
        await bob.expect(r"#general <alice> hello from alice$")
        await bob.say("hi alice, bob here")
        await alice.expect(r"#general <bob> hi alice, bob here$")

        # /join switches the current room; the client stays in #general too.
        await alice.say("/join random")
        await alice.expect(r"^\* joined #random")
        await alice.say("/rooms")
        await alice.expect(r"^\* rooms: #general \*#random$")
        await alice.say("only in random")
        await alice.expect(r"#random <alice> only in random$")
        await bob.say("still general")
        await alice.expect(r"#general <bob> still general$")
        await bob.expect(r"#general <bob> still general$")
        assert bob.count("only in random") == 0

        await alice.say("/leave random")
        await alice.expect(r"^\* left #random; now in #general$")
        await alice.say("/quit")
        with trio.fail_after(10):
            assert await alice.proc.wait() == 0
        await bob.expect(r"#general: alice left")
        assert bob.count("hello from alice") == 1


async def test_client_resumes_after_server_restart(
    server: ServerProcess, clients: list[Client]
) -> None:
    with trio.fail_after(90):
        alice = await start_client(clients, server.chat_url, "alice", "general")
        await alice.expect(r"^\* joined #general")
        bob = await start_client(clients, server.chat_url, "bob", "general")
        await bob.expect(r"^\* joined #general")
        await alice.say("before restart")
        await bob.expect(r"<alice> before restart$")

        # Bob is frozen through the restart: what alice sends meanwhile reaches him only
        # through the resume (join with `since`).
        bob.proc.send_signal(signal.SIGSTOP)
        try:
            await server.stop()
            await alice.expect(r"^\* disconnected")
            await alice.say("typed while the server was down")
            await alice.expect(r"^\* offline: queued for #general")
            await server.start()
            await alice.expect(r"^\* connected as alice")
            await alice.expect(r"<alice> typed while the server was down$")
            await alice.say("after restart")
            await alice.expect(r"<alice> after restart$")
        finally:
            bob.proc.send_signal(signal.SIGCONT)

        await bob.expect(r"^\* connected as bob")
        await bob.expect(r"<alice> typed while the server was down$")
        await bob.expect(r"<alice> after restart$")
        await bob.say("bob is back")
        await alice.expect(r"<bob> bob is back$")
        await bob.expect(r"<bob> bob is back$")

        for text in ("before restart", "typed while the server was down", "after restart"):
            assert bob.count(re.escape(text) + "$") == 1, bob.output()
            assert alice.count(re.escape(text) + "$") == 1, alice.output()
        stored = await trio.to_thread.run_sync(server.stored_texts, "general")
        assert stored.count("typed while the server was down") == 1
        assert stored.count("before restart") == 1


async def test_piped_stdin_sends_then_exits_at_eof(
    server: ServerProcess, clients: list[Client], tmp_path: Path
) -> None:
    with trio.fail_after(60):
        watcher = await start_client(clients, server.chat_url, "watcher", "lobby")
        await watcher.expect(r"^\* joined #lobby")
        script = tmp_path / "lines.txt"
        script.write_text("first piped line\n<b>second</b> & more\nclear \x1b[2J bell \x07\n")
        with script.open("rb") as f:
            piper = await start_client(clients, server.chat_url, "piper", "lobby", stdin=f.fileno())
        await watcher.expect(r"<piper> first piped line$")
        await watcher.expect(r"<piper> <b>second</b> & more$")
        # Escape sequences from the network are printed as text, never obeyed.
        await watcher.expect(r"<piper> clear \\x1b\[2J bell \\x07$")
        assert "\x1b" not in watcher.output()
        with trio.fail_after(15):
            assert await piper.proc.wait() == 0
        await piper.expect(r"<piper> clear \\x1b")


async def test_client_sends_again_what_a_full_disk_refused(
    small_disk: Path, tmp_path: Path, clients: list[Client]
) -> None:
    server = ServerProcess(small_disk, tmp_path / "server.log", limit_rate=True)
    await server.start()
    try:
        with trio.fail_after(60):
            alice = await start_client(clients, server.chat_url, "alice", "general")
            await alice.expect(r"^\* joined #general")
            await alice.say("before the disk filled")
            await alice.expect(r"<alice> before the disk filled$")
            filler = fill(small_disk)
            await alice.say("while the disk is full")
            await alice.expect(r"^! error store_unavailable: ")
            filler.unlink()
            # Unacked, so sent again (same cid) at the client's next retry.
            await alice.expect(r"<alice> while the disk is full$")
            stored = await trio.to_thread.run_sync(server.stored_texts, "general")
            assert stored == ["before the disk filled", "while the disk is full"]
            assert alice.count(r"^\* (dis)?connected") == 1  # the connection stayed up
    finally:
        await server.stop()
