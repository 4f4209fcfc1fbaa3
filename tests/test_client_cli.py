"""The terminal client (``trio-chat client``) as real processes against a real server.

Each test starts hypercorn as a subprocess on free 127.0.0.1 ports with its own data
directory, and ``trio-chat client`` processes with piped stdin/stdout. Nothing sleeps to
wait: the tests wait for output lines, or poll with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionRejected,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from trio_chat.client._explain import explain_close

from _server_process import BIN, ServerProcess
from conftest import fill

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_websocket import WebSocketServer

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


async def test_who_lists_the_members_of_the_current_room(
    server: ServerProcess, clients: list[Client]
) -> None:
    with trio.fail_after(60):
        alice = await start_client(clients, server.chat_url, "alice", "general")
        await alice.expect(r"^\* joined #general")
        bob = await start_client(clients, server.chat_url, "bob", "general")
        await bob.expect(r"^\* joined #general")
        await alice.expect(r"#general: bob joined")
        await alice.say("/who")
        await alice.expect(r"^\* #general: 2 here: alice, bob$")
        await alice.say("/join quiet")
        await alice.expect(r"^\* joined #quiet")
        await alice.say("/who")
        await alice.expect(r"^\* #quiet: 1 here: alice$")
        await alice.say("/join general")
        await bob.say("/quit")
        await alice.expect(r"#general: bob left")
        await alice.say("/who")
        await alice.expect(r"^\* #general: 1 here: alice$")


async def test_who_gives_a_big_rooms_head_count_and_its_list_when_small_again(
    tmp_path: Path, clients: list[Client]
) -> None:
    env = {"TRIO_CHAT_PRESENCE_NAMES_MAX": "2"}
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", env=env, limit_rate=True)
    await server.start()
    try:
        with trio.fail_after(60):
            alice = await start_client(clients, server.chat_url, "alice", "general")
            await alice.expect(r"^\* joined #general")
            bob = await start_client(clients, server.chat_url, "bob", "general")
            await alice.expect(r"#general: bob joined")
            carol = await start_client(clients, server.chat_url, "carol", "general")
            await carol.expect(r"^\* joined #general: 3 here$")
            await carol.say("/who")
            await carol.expect(r"^\* #general: 3 here \(too many to list\)$")
            for gone in (carol, bob):
                await gone.say("/quit")
                assert await gone.proc.wait() == 0
            # Polled: the list comes back when the server sees both gone.
            while True:
                await alice.say("/who")
                line = await alice.expect(r"^\* #general: ")
                if line.endswith("1 here: alice"):
                    break
                await trio.sleep(0.1)
    finally:
        await server.stop()


async def expect_refused(client: Client, sentence: str) -> None:
    """The client exits 1 with ``sentence`` (a regex) as its one line, without retrying."""
    with trio.fail_after(LINE_TIMEOUT):
        assert await client.proc.wait() == 1
    await client.expect("^trio-chat client: " + sentence)
    assert client.count("reconnecting") == 0, client.output()
    assert client.count("Traceback") == 0, client.output()


async def test_refusals_for_good_end_the_run_with_one_sentence(
    server: ServerProcess, clients: list[Client]
) -> None:
    wrong_path = server.chat_url.replace("/ws", "/chat")
    with trio.fail_after(60):
        lost = await start_client(clients, wrong_path, "alice", "general")
        nameless = await start_client(clients, server.chat_url, "no name", "general")
        await expect_refused(
            lost,
            r"there is no chat socket at /chat on 127\.0\.0\.1:\d+ \(HTTP 404\): the path is /ws$",
        )
        await expect_refused(nameless, r"the server refused the name 'no name': ")


async def test_a_host_name_the_server_refuses(tmp_path: Path, clients: list[Client]) -> None:
    # 127.0.0.1 stays allowed for the helper's readiness check; the client says localhost.
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        env={"TRIO_CHAT_ALLOWED_HOSTS": "127.0.0.1"},
        limit_rate=True,
    )
    try:
        await server.start()
        url = server.chat_url.replace("127.0.0.1", "localhost")
        client = await start_client(clients, url, "alice", "general")
        await expect_refused(
            client,
            r"the server does not answer to the host name 'localhost' \(HTTP 400 bad host\): ",
        )
    finally:
        await server.stop()


async def _answer_http(status: str, stream: trio.SocketStream) -> None:
    """A server that refuses every WebSocket handshake with ``status``."""
    request = b""
    while b"\r\n\r\n" not in request and (data := await stream.receive_some()):
        request += data
    await stream.send_all(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
    await stream.aclose()


async def _close_4001(request: WebSocketRequest) -> None:
    ws = await request.accept()
    await ws.aclose(code=4001, reason="sign in first")


@pytest.mark.parametrize(
    ("answer", "sentence"),
    [
        ("403 Forbidden", r"the server refused this connection's origin \(HTTP 403\): "),
        ("426 Upgrade Required", r"the server speaks another WebSocket version \(HTTP 426\)$"),
        ("close 4001", r"the server refused to let this client in \(4001 sign in first\)$"),
    ],
)
async def test_refusals_our_server_cannot_give_this_client(
    clients: list[Client], answer: str, sentence: str
) -> None:
    """403 (the client sends no Origin) and the auth close codes, from a stand-in server."""
    async with trio.open_nursery() as nursery:
        if answer.startswith("close"):
            ws_server: WebSocketServer = await nursery.start(
                serve_websocket, _close_4001, "127.0.0.1", 0, None
            )
            port = ws_server.port
        else:
            listeners = await nursery.start(trio.serve_tcp, lambda s: _answer_http(answer, s), 0)
            port = listeners[0].socket.getsockname()[1]
        client = await start_client(clients, f"ws://127.0.0.1:{port}/ws", "alice", "general")
        await expect_refused(client, sentence)
        nursery.cancel_scope.cancel()


async def _hold_the_one_place(
    url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connect once the server has let go of the readiness check's connection; hold on."""
    with trio.fail_after(LINE_TIMEOUT):
        while True:
            try:
                async with open_websocket_url(url):
                    task_status.started()
                    await trio.sleep_forever()
            except ConnectionRejected:
                await trio.sleep(0.05)  # poll interval, bounded by LINE_TIMEOUT


async def test_transient_refusals_are_retried(tmp_path: Path, clients: list[Client]) -> None:
    """Nothing listening, then a server at its connection cap (503): both retried."""
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        env={"TRIO_CHAT_MAX_CONNECTIONS": "1"},
        limit_rate=True,
    )
    port = server.ws_port
    with trio.fail_after(60):
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.push_async_callback(server.stop)
            client = await start_client(clients, server.chat_url, "alice", "general")
            await client.expect(
                rf"^\* disconnected: nothing listens at 127\.0\.0\.1:{port} \(connection refused; "
                r"is the server running\?\); reconnecting in"
            )
            # Stopped, so that the one place goes to the holder, not to the client's next try.
            client.proc.send_signal(signal.SIGSTOP)
            try:
                await server.start()
                async with trio.open_nursery() as nursery:
                    await nursery.start(_hold_the_one_place, server.chat_url)
                    client.proc.send_signal(signal.SIGCONT)
                    await client.expect(
                        r"^\* disconnected: the server is full: too many connections \(HTTP 503\); "
                        "reconnecting in"
                    )
                    nursery.cancel_scope.cancel()
                await client.expect(r"^\* connected as alice")
            finally:
                client.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize(
    ("code", "sentence"),
    [
        (1001, "the server is shutting down (1001)"),
        (1006, "the connection was lost (1006)"),
        (1008, "the server closed the connection after too many refused frames in a row (1008)"),
        (1011, "the server hit an internal error serving this client (1011)"),
        (4008, "too slow to keep up (4008)"),
    ],
)
def test_transient_close_codes_have_a_sentence(code: int, sentence: str) -> None:
    assert explain_close(CloseReason(code, None)) == (sentence, False)
