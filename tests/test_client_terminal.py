"""The terminal client on a real terminal: ``trio-chat client`` in a tmux pane.

A real server process, the client in a tmux pane (its own tmux server on a socket in the
test's directory), keys sent with ``tmux send-keys`` and the screen read back with
``tmux capture-pane -p``. The other side is a plain WebSocket client in the test. Nothing
sleeps to wait: the tests poll the screen with a deadline.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio
from test_client_cli import server
from trio_websocket import WebSocketConnection, open_websocket_url

from _server_process import BIN, ServerProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

# `server` (a started ServerProcess, the rate limit on) is test_client_cli's fixture.
__all__ = ["server"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)"),
]

SCREEN_TIMEOUT: Final = 15.0
POLL: Final = 0.05
PROMPT: Final = "#general> "


class Pane:
    """One tmux pane running a command; the pane stays after the command exits."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = tmp_path / "tmux.sock"
        self.conf = tmp_path / "tmux.conf"
        self.status = tmp_path / "exit-status"
        # remain-on-exit: the last screen can be read after the exit.
        self.conf.write_text("set -g remain-on-exit on\nset -g status off\n")

    async def tmux(self, *args: str) -> str:
        result = await trio.run_process(
            ["tmux", "-S", str(self.socket), "-f", str(self.conf), *args], capture_stdout=True
        )
        return result.stdout.decode()

    async def start(self, command: list[str]) -> None:
        # The shell writes the exit status where the test reads it: tmux's own
        # #{pane_dead_status} is sometimes empty although the pane is dead.
        wrapped = ["sh", "-c", f'"$@"; echo $? > {shlex.quote(str(self.status))}', "sh"]
        await self.tmux("new-session", "-d", "-x", "100", "-y", "24", shlex.join(wrapped + command))

    async def keys(self, *keys: str, literal: bool = False) -> None:
        await self.tmux("send-keys", *(("-l",) if literal else ()), *keys)

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p")

    async def wait_for(self, pattern: str) -> str:
        """Poll the screen until ``pattern`` (multi-line regex) is on it; return the screen."""
        rx = re.compile(pattern, re.MULTILINE)
        with trio.move_on_after(SCREEN_TIMEOUT):
            while not rx.search(screen := await self.screen()):  # noqa: ASYNC110
                await trio.sleep(POLL)  # poll interval, bounded by SCREEN_TIMEOUT
            return screen
        pytest.fail(f"no {pattern!r} on the screen:\n{await self.screen()}")

    async def exit_status(self) -> int:
        """Wait for the command to exit; return its exit status."""
        with trio.move_on_after(SCREEN_TIMEOUT):
            while True:
                status = self.status.read_text() if self.status.exists() else ""
                if status.endswith("\n"):  # written whole by the shell's echo
                    return int(status)
                await trio.sleep(POLL)  # poll interval, bounded by SCREEN_TIMEOUT
        pytest.fail(f"still running:\n{await self.screen()}")

    async def kill(self) -> None:
        with trio.move_on_after(5, shield=True):
            await trio.run_process(
                ["tmux", "-S", str(self.socket), "kill-server"], check=False, capture_stderr=True
            )


@pytest.fixture
async def pane(tmp_path: Path) -> AsyncIterator[Pane]:
    p = Pane(tmp_path)
    try:
        yield p
    finally:
        await p.kill()


async def start_alice(pane: Pane, server: ServerProcess) -> None:
    """``trio-chat client`` as alice in #general, ready at its prompt."""
    await pane.start([str(BIN / "trio-chat"), "client", server.chat_url, "--name", "alice"])
    await pane.wait_for(r"^\* joined #general")
    await pane.wait_for(r"^#general>")


async def next_frame(ws: WebSocketConnection, kind: str, **fields: Any) -> dict[str, Any]:
    """The next frame of type ``kind`` with ``fields`` (frames may hold several lines)."""
    with trio.fail_after(SCREEN_TIMEOUT):
        while True:
            for line in str(await ws.get_message()).split("\n"):
                frame = json.loads(line)
                if frame["type"] == kind and fields.items() <= frame.items():
                    return dict(frame)


async def join_as_bob(ws: WebSocketConnection) -> None:
    await ws.send_message(json.dumps({"type": "join", "room": "general"}))
    await next_frame(ws, "joined", room="general")


def lines_of(screen: str) -> list[str]:
    return [line.rstrip() for line in screen.splitlines()]


async def test_incoming_line_keeps_the_partial_input(server: ServerProcess, pane: Pane) -> None:
    await start_alice(pane, server)
    async with open_websocket_url(server.chat_url + "?name=bob") as bob:
        await join_as_bob(bob)
        await pane.keys("half a li", literal=True)
        await pane.wait_for(rf"^{PROMPT}half a li$")

        await bob.send_message(
            json.dumps({"type": "send", "room": "general", "text": "hello alice"})
        )
        # Polled until the prompt is redrawn (a capture may fall between erase and redraw).
        screen = lines_of(await pane.wait_for(rf"<bob> hello alice$(?:\n.*)*\n{PROMPT}half a li$"))
        incoming = next(i for i, x in enumerate(screen) if x.endswith("<bob> hello alice"))
        prompt = next(i for i, x in enumerate(screen) if x.startswith(PROMPT))
        # The line came in above the prompt, which still holds what was typed.
        assert incoming < prompt, screen
        assert screen[prompt] == PROMPT + "half a li", screen
        assert sum(1 for x in screen if "half a li" in x) == 1, screen

        await pane.keys("ne", literal=True)
        await pane.keys("Enter")
        sent = await next_frame(bob, "message", room="general", **{"from": "alice"})
        assert sent["text"] == "half a line"
        # The line sent leaves the prompt (erased, not echoed) and comes back from the server.
        screen = lines_of(await pane.wait_for(rf"<alice> half a line$\n{PROMPT.rstrip()}$"))
        assert sum(1 for x in screen if "half a line" in x) == 1, screen


async def test_typing_is_shown_then_cleared_and_sent(server: ServerProcess, pane: Pane) -> None:
    await start_alice(pane, server)
    async with open_websocket_url(server.chat_url + "?name=bob") as bob:
        await join_as_bob(bob)
        await bob.send_message(json.dumps({"type": "typing", "room": "general"}))
        await pane.wait_for(r"^#general · bob is typing…$")
        # Nothing more from bob: the status line forgets him after a few seconds.
        await pane.wait_for(r"^#general$")

        await pane.keys("a long ans", literal=True)
        frame = await next_frame(bob, "typing", room="general")
        assert frame["from"] == "alice"


@pytest.mark.parametrize(("keys", "status"), [("C-c", 130), ("C-d", 0), ("/quit Enter", 0)])
async def test_ctrl_c_ctrl_d_and_quit_exit_without_a_traceback(
    server: ServerProcess, pane: Pane, keys: str, status: int
) -> None:
    await start_alice(pane, server)
    if keys == "C-c":
        await pane.keys("not sent", literal=True)  # Ctrl-C drops the line being typed
    if keys.startswith("/"):
        command, key = keys.split()
        await pane.keys(command, literal=True)
        await pane.keys(key)
    else:
        await pane.keys(keys)
    assert await pane.exit_status() == status
    screen = await pane.screen()
    assert "Traceback" not in screen, screen
    assert "Error" not in screen, screen
    stored = await trio.to_thread.run_sync(server.stored_texts, "general")
    assert "not sent" not in stored


async def test_a_refusal_for_good_gives_the_terminal_back_with_one_sentence(
    server: ServerProcess, pane: Pane
) -> None:
    await pane.start([str(BIN / "trio-chat"), "client", server.chat_url, "--name", "no name"])
    assert await pane.exit_status() == 1
    screen = lines_of(await pane.screen())
    assert sum(1 for x in screen if x.startswith("trio-chat client: ")) == 1, screen
    assert any(x.startswith("trio-chat client: the server refused the name") for x in screen)
    assert not any("Traceback" in x or "reconnecting" in x for x in screen), screen
