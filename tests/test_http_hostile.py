"""The HTTP side against hostile input, over real sockets: failure boundaries, the Host
check (DNS rebinding), the signed heal API, and request targets too long to serve."""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import h11
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_chat import Settings
from trio_chat._errors import ConfigError
from trio_chat.node._cluster import (
    HEAL_HEADER,
    SEEN_SIGNATURES,
    SIGNATURE_AGE,
    HealRequests,
    sign_heal_request,
)
from trio_chat.protocol._hosts import host_allowed
from trio_chat.server._session import Session

from _netns import without_worker
from _server_process import free_udp_port
from conftest import make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server

WS_HEADERS = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


async def raw_get(
    port: int, target: str, host: str, *, websocket: bool = False, origin: str | None = None
) -> tuple[int, bytes]:
    """One GET (or WebSocket handshake) on a fresh connection: the status and body.

    The request is written as is, whatever its target and Host; h11 parses the answer.
    """
    headers = [("Host", host), *(WS_HEADERS if websocket else [])]
    headers += [("Origin", origin)] if origin else []
    client = h11.Connection(h11.CLIENT)
    request = client.send(h11.Request(method="GET", target=target, headers=headers))
    assert request is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request + (client.send(h11.EndOfMessage()) or b""))
        status, body = 0, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.InformationalResponse):
                return event.status_code, b""
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def read_until_closed(client: Any) -> None:
    while True:
        await client.recv()


def samples(metrics: str) -> dict[str, str]:
    lines = without_worker(metrics).splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))


def warnings_and_worse(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- failure boundaries -------------------------------------------------------------------


async def test_a_failing_http_request_gets_500_and_the_server_serves_on(
    server: Server, connect: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    page = server.node.page

    async def page_with_a_bug(room: str, before: str | None, limit: int) -> Any:
        if room == "boom":
            raise RuntimeError("a bug reached by one request")
        return await page(room, before, limit)

    monkeypatch.setattr(server.node, "page", page_with_a_bug)
    async with (
        connect(server.chat_socket_url, "alice") as alice,
        connect(server.fallback_url, "bob") as bob,
        httpx.AsyncClient(base_url=server.http_url) as http,
    ):
        await alice.join("general")
        await bob.join("general")
        for _ in range(2):
            failed = await http.get("/api/rooms/boom/messages")
            assert failed.status_code == 500
            assert failed.json() == {"code": "internal_error", "message": "internal error"}
            assert "Traceback" not in failed.text
            assert (await http.get("/api/rooms/general/messages")).status_code == 200
        await alice.chat("general", "still here", "c-1")
        assert (await bob.next_of("message"))["text"] == "still here"
        metrics = samples((await http.get("/metrics")).text)
        assert metrics['trio_chat_client_failures_total{where="http",type="RuntimeError"}'] == "2"
        assert (await http.get("/healthz")).text == "ok\n"
    # One traceback, from the boundary (rate-limited), none from Quart.
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in failures] == ["trio_chat.boundary"]
    assert failures[0].exc_info is not None


async def test_a_failing_fallback_session_is_closed_with_1011_alone(
    server: Server, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = Session._history

    async def history_with_a_bug(self: Session, command: Any) -> None:
        if self.name == "mallory":
            raise RuntimeError("a bug reached by one client")
        await history(self, command)

    monkeypatch.setattr(Session, "_history", history_with_a_bug)
    async with (
        connect(server.fallback_url, "alice") as alice,
        connect(server.chat_socket_url, "bob") as bob,
        connect(server.fallback_url, "carol") as carol,
    ):
        for client in (alice, bob, carol):
            await client.join("general")
        async with connect(server.fallback_url, "mallory") as mallory:
            await mallory.join("general")
            await mallory.send(type="history", room="general")
            with pytest.raises(ConnectionClosed) as closed:
                await read_until_closed(mallory)
            assert closed.value.reason.code == 1011
            assert closed.value.reason.reason == "internal error"
        await carol.send(type="history", room="general")
        assert (await carol.next_of("history"))["messages"] == []
        await alice.chat("general", "after the failure", "c-1")
        for client in (bob, carol):
            assert (await client.next_of("message"))["text"] == "after the failure"
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            metrics = samples((await http.get("/metrics")).text)
            assert (await http.get("/healthz")).text == "ok\n"
        key = 'trio_chat_client_failures_total{where="ws_fallback",type="RuntimeError"}'
        assert metrics[key] == "1"
        assert metrics["trio_chat_connections"] == "3"


# -- Host check ---------------------------------------------------------------------------


async def test_a_dns_rebinding_host_is_refused_on_every_socket(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    http_port = port_of(server.http_url)
    ws_port = server.node.chat_socket_port
    evil = "evil.example"
    for port, target, websocket in [
        (http_port, "/", False),
        (http_port, "/app.js", False),
        (http_port, "/api/config", False),
        (http_port, "/api/rooms/general/messages", False),
        (http_port, "/healthz", False),
        (http_port, "/ws", True),
        (ws_port, "/ws", True),
    ]:
        for host in (evil, f"{evil}:{port}", "localhost.evil.example", "127.0.0.1.evil.example"):
            status, body = await raw_get(
                port, target, host, websocket=websocket, origin=f"http://{host}"
            )
            assert (status, body) == (400, b"bad host\n"), (port, target, host)
    assert server.node.statistics().errors["bad_host"] == 7 * 4
    assert warnings_and_worse(caplog) == []


async def test_loopback_names_are_served_by_default(server: Server) -> None:
    http_port = port_of(server.http_url)
    ws_port = server.node.chat_socket_port
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "[::1]", "LOCALHOST", "localhost."):
        for port in (http_port, ws_port):
            status, _ = await raw_get(port, "/ws", f"{host}:{port}", websocket=True)
            assert status == 101, (host, port)
        status, body = await raw_get(http_port, "/healthz", host)
        assert (status, body) == (200, b"ok\n"), host


async def test_configured_host_names_replace_the_loopback_default(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    allowed = frozenset({"chat.example.com", ".example.org"})
    server = await start_server(nursery, make_settings(tmp_path, allowed_hosts=allowed))
    http_port = port_of(server.http_url)
    ws_port = server.node.chat_socket_port
    cases = {
        "chat.example.com": 101,
        "CHAT.example.com:443": 101,
        "example.org": 101,
        "a.b.example.org": 101,
        "evil.example": 400,
        "notexample.org": 400,
        "example.com": 400,
        "localhost": 400,
    }
    for host, expected in cases.items():
        for port in (http_port, ws_port):
            status, _ = await raw_get(port, "/ws", host, websocket=True)
            assert status == expected, (host, port)
        status, _ = await raw_get(http_port, "/healthz", host)
        assert status == (200 if expected == 101 else 400), host


async def test_the_start_log_says_when_any_host_is_answered(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat.app")
    advice = "set TRIO_CHAT_ALLOWED_HOSTS"
    await start_server(nursery, make_settings(tmp_path / "a"))
    assert not [r for r in caplog.records if advice in r.getMessage()]
    # The HTTP side as peers reach it is on the LAN: the server is not loopback-only.
    public = make_settings(tmp_path / "b", http_url="http://10.0.0.5:8000")
    server = await start_server(nursery, public)
    assert [r.levelname for r in caplog.records if advice in r.getMessage()] == ["INFO"]
    assert (await raw_get(port_of(server.http_url), "/healthz", "chat.example.com"))[0] == 200


def test_the_default_follows_where_the_server_listens() -> None:
    loopback = Settings(ws_bind=("127.0.0.1", 8001))
    assert host_allowed("localhost:8000", loopback)
    assert not host_allowed("evil.example", loopback)
    assert not host_allowed("", loopback)
    assert not host_allowed("localhost@evil.example", loopback)
    # The chat socket off and no HTTP URL: nothing says the server is public.
    assert not host_allowed("evil.example", Settings(ws_bind=None))
    public = [
        Settings(ws_bind=("0.0.0.0", 8001)),
        Settings(ws_bind=("127.0.0.1", 8001), http_url="http://10.0.0.5:8000"),
    ]
    for settings in public:
        assert host_allowed("chat.example.com", settings)
    assert host_allowed("anything", Settings(allowed_hosts=frozenset({"*"})))


def test_allowed_hosts_setting_is_checked() -> None:
    settings = Settings.from_env(
        {"TRIO_CHAT_ALLOWED_HOSTS": "Chat.Example.com, .example.org,[::1]"}
    )
    assert settings.allowed_hosts == frozenset({"chat.example.com", ".example.org", "::1"})
    for bad in ("https://chat.example.com", "chat.example.com:8000", "*.example.org", ","):
        with pytest.raises(ConfigError, match="TRIO_CHAT_ALLOWED_HOSTS"):
            Settings.from_env({"TRIO_CHAT_ALLOWED_HOSTS": bad})


# -- the heal API -------------------------------------------------------------------------

SECRET = secrets.token_bytes(24)


@pytest.fixture
async def cluster_server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    """A server with a cluster link of its own (loopback, TTL 0, its own port and secret)."""
    settings = make_settings(
        tmp_path, cluster="host", cluster_port=free_udp_port(), cluster_secret=SECRET
    )
    return await start_server(nursery, settings)


async def heal_get(
    http: httpx.AsyncClient, query: dict[str, str], signature: str | None
) -> httpx.Response:
    headers = {HEAL_HEADER: signature} if signature is not None else {}
    return await http.get("/api/cluster/messages", params=query, headers=headers)


async def test_heal_requests_are_signed_whole_fresh_and_single_use(
    cluster_server: Server, connect: Any
) -> None:
    async with connect(cluster_server.chat_socket_url, "alice") as alice:
        await alice.join("general")
        ids = [(await alice.chat("general", f"m{i}", f"c{i}"))["id"] for i in range(3)]
    origin = cluster_server.node.node_id
    query = {"origin": origin, "after": "", "limit": "2"}

    def sign(limit: str = "2", age: float = 0.0) -> str:
        return sign_heal_request(SECRET, origin, "", limit, time.time() - age)

    async with httpx.AsyncClient(base_url=cluster_server.http_url) as http:
        signature = sign()
        page = await heal_get(http, query, signature)
        assert page.status_code == 200
        assert [m[0] for m in page.json()] == ids[:2]
        # The same request again, signature and all: a replay.
        assert (await heal_get(http, query, signature)).status_code == 403
        # A signed query with another limit (every row, or more rows) is not that query.
        for limit in ("-1", "1000", "3"):
            tampered = await heal_get(http, {**query, "limit": limit}, sign())
            assert tampered.status_code == 403, limit
        tampered = await heal_get(http, {**query, "after": ids[0]}, sign())
        assert tampered.status_code == 403
        for age in (SIGNATURE_AGE + 2, -SIGNATURE_AGE - 2):
            assert (await heal_get(http, query, sign(age=age))).status_code == 403
        for signature in (None, "", "garbage", "9" * 5000, f"{time.time():.0f}:x:y"):
            assert (await heal_get(http, query, signature)).status_code == 403
        # Signed, but not a limit: refused as a bad request, not a crash.
        for limit in ("abc", "-1", "0", "1001", "", "1" * 5000, "\uff11"):
            bad = await heal_get(http, {**query, "limit": limit}, sign(limit))
            assert bad.status_code == 400, limit
            assert "limit must be a whole number from 1 to 1000" in bad.text
        assert "trio_chat_client_failures_total{" not in (await http.get("/metrics")).text


def test_remembered_signatures_are_bounded_and_forgotten_when_stale() -> None:
    requests = HealRequests(SECRET)
    now = 1_800_000_000.0

    def check(at: float) -> bool:
        signature = sign_heal_request(SECRET, "o", "", "10", at)
        return requests.check_untrusted("o", "", "10", signature, at)

    assert all(check(now) for _ in range(SEEN_SIGNATURES))
    # Full of signatures still valid: refuse rather than forget one (it could be replayed).
    assert not check(now + 1)
    # Once they are stale (refused as such anyway), they make room.
    assert check(now + SIGNATURE_AGE + 1)


# -- long request targets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/" + "a" * 20_000, 414),
        ("/api/rooms/" + "a" * 20_000 + "/messages", 414),
        ("/healthz?" + "x=1&" * 5_000, 414),
        ("/api/rooms/general/messages?before=" + "0" * 20_000, 414),
        ("/" + "a" * 8_200, 414),
        ("/" + "a" * 8_000, 404),
        ("/" + "a" * 300, 404),
        ("/" + "%C3%A9" * 200, 404),
        ("/a/" * 2_500, 404),
        ("/api/rooms/" + "a" * 5_000 + "/messages", 400),
    ],
)
async def test_long_targets_are_refused_without_an_error(
    server: Server, connect: Any, caplog: pytest.LogCaptureFixture, target: str, status: int
) -> None:
    port = port_of(server.http_url)
    assert (await raw_get(port, target, "127.0.0.1"))[0] == status
    if status == 414:
        assert (await raw_get(port, target, "127.0.0.1", websocket=True))[0] == 414
    assert warnings_and_worse(caplog) == []
    assert server.node.failures.statistics().contained == {}
    async with connect(server.fallback_url, "alice") as alice:
        await alice.join("general")
        await alice.chat("general", "still serving", "c-1")
