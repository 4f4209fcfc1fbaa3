"""Shared fixtures: a real server in-process on 127.0.0.1, and a protocol-aware client."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import json
import os
import subprocess
import urllib.parse
from typing import TYPE_CHECKING, Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypothesis import settings as hypothesis_settings
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trio_chat import ChatApp, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from trio_chat.node._store import Store

TIMEOUT = 10

# The machines are shared and small: a slow example is not a failure, a wrong one is.
hypothesis_settings.register_profile("trio_chat", deadline=None)
hypothesis_settings.load_profile("trio_chat")


@dataclasses.dataclass
class Server:
    """A running server: the app (and its node) and the URLs to reach it."""

    app: ChatApp
    http_url: str
    chat_socket_url: str
    fallback_url: str
    shutdown: trio.Event

    @property
    def node(self) -> Any:
        assert self.app.node is not None
        return self.app.node

    def url(self, transport: str) -> str:
        return self.chat_socket_url if transport == "chat_socket" else self.fallback_url


async def start_server(
    nursery: trio.Nursery, settings: Settings, store: Store | None = None
) -> Server:
    """Serve a ChatApp with ``settings`` (and ``store``, if given) on 127.0.0.1 (free ports)."""
    app = ChatApp(settings, store=store)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1
    shutdown = trio.Event()
    binds = await nursery.start(
        functools.partial(serve, app, config, shutdown_trigger=shutdown.wait)
    )
    http_url = binds[0]
    assert app.node is not None
    ws = f"ws://127.0.0.1:{app.node.chat_socket_port}/ws"
    return Server(app, http_url, ws, http_url.replace("http://", "ws://") + "/ws", shutdown)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "ws_bind": ("127.0.0.1", 0),
        "cluster": "off",
        "shutdown_grace": 1.0,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    return await start_server(nursery, make_settings(tmp_path))


@pytest.fixture(params=["chat_socket", "fallback"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Client:
    """A test client: splits batched frames and reads events one at a time."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] = {}

    async def send(self, **command: Any) -> None:
        await self.ws.send_message(json.dumps(command))

    async def recv(self) -> dict[str, Any]:
        while not self.pending:
            frame = await self.ws.get_message()
            assert isinstance(frame, str)
            self.pending.extend(json.loads(line) for line in frame.split("\n"))
        return self.pending.pop(0)

    async def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        """The next event; it must be of ``type_`` and carry ``fields``."""
        event = await self.recv()
        assert event["type"] == type_, event
        for key, value in fields.items():
            assert event.get(key) == value, (key, event)
        return event

    async def next_of(self, type_: str) -> dict[str, Any]:
        """Skip events until one of ``type_`` arrives."""
        while True:
            event = await self.recv()
            if event["type"] == type_:
                return event

    async def join(self, room: str, **extra: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Join ``room``; return the replayed messages and the ``joined`` event."""
        await self.send(type="join", room=room, **extra)
        replay = []
        while True:
            event = await self.recv()
            if event["type"] == "joined":
                return replay, event
            if event["type"] == "message":
                replay.append(event)
            else:
                assert event["type"] == "reset", event

    async def chat(self, room: str, text: str, cid: str | None = None) -> dict[str, Any]:
        """Send a message and wait for its ack."""
        await self.send(type="send", room=room, text=text, **({"cid": cid} if cid else {}))
        return await self.next_of("ack")


@pytest.fixture
def connect() -> Any:
    @contextlib.asynccontextmanager
    async def connect(
        url: str, name: str | None = None, *, client_id: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Client]:
        query = {k: v for k, v in (("name", name), ("client_id", client_id)) if v is not None}
        full = url + ("?" + urllib.parse.urlencode(query) if query else "")
        async with open_websocket_url(full, **kwargs) as ws:
            try:
                client = Client(ws)
                client.welcome = await client.expect("welcome")
                yield client
            finally:
                await _close(ws)

    return connect


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds, failing after TIMEOUT seconds.

    For state that changes in another process or behind a socket, where there is no
    event to wait on.
    """
    with trio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 (no event exists for this state)
            await trio.sleep(0.005)


async def _close(ws: WebSocketConnection) -> None:
    """Close like a well-behaved client: keep reading until the close handshake ends.

    trio-websocket's reader stops at unread messages, so a test client that leaves some
    would never see the server's close reply.
    """

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await ws.aclose()
        nursery.cancel_scope.cancel()
    # trio-websocket 0.12 leaves its TCP stream open when the block ends between the
    # server's close frame and the server's TCP close.
    await ws._stream.aclose()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted for the test: a disk that really fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    in_ci = os.environ.get("CI") == "true"
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            why = f"cannot mount a tmpfs here: {done.stderr.strip()}"
    if why is not None:
        if in_ci:
            pytest.fail(f"{why} (CI=true: this test must run in CI)")
        pytest.skip(why)
    try:
        yield mount_point
    finally:
        # Lazy: the server's files may still be closing.
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until the disk is full; the file that filled it."""
    filler = folder / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Bound every async test with ``trio.fail_after``: a hang fails, it never stalls CI.

    ``@pytest.mark.timeout(seconds)`` sets another bound (virtual seconds under
    the autojump clock).
    """
    for item in items:
        fn = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(fn):
            continue
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker else TIMEOUT * 3
        item.obj = _bounded(fn, limit)


def _bounded(fn: Any, limit: float) -> Any:
    @functools.wraps(fn)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(limit):
            return await fn(*args, **kwargs)

    return bounded
