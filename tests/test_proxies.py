"""deploy/nginx.conf and deploy/haproxy.cfg, run by Debian's nginx and HAProxy.

- One host behind nginx's one TLS port: the page, the API and the chat socket all go
  through it, and nginx's log shows /ws reaching the chat socket's port, not hypercorn's.
- Two hosts (a LAN cluster in network namespaces, as in test_cluster_netns.py) behind
  nginx or HAProxy in a third namespace, with Chromium running there too: when the host
  of one page is killed, the page reconnects through the proxy to the other host at its
  first retry and misses nothing. Root only (namespaces), like test_cluster_netns.py.
- Both proxies' idle timeouts for upgraded sockets outlast the pings of page and server.

The certificate is made here (test_tls.make_cert), for chat.test; Chromium maps that name
to 127.0.0.1 (of its namespace) and ignores that nobody issued it.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio
from test_browser import STEP_TIMEOUT_MS, message_with, messages, say, wait_online
from test_tls import chromium_browser, make_cert

from trio_chat import Settings

from _netns import made_lan
from _proxies import DEPLOY, NAME, Proxy, Upstream, proxy_unavailable
from _server_process import ServerProcess, free_port, free_udp_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from playwright.sync_api import Browser
    from test_tls import Cert

    from _netns import Lan

pytestmark = pytest.mark.slow

ROOM = "general"
#: The page's first reconnect waits between 250 and 500 ms (web/connection.js backoff).
FIRST_RETRY_MS = 500
WEB = DEPLOY.parent / "web"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))[0]


class Tab:
    """A page in a browser context of its own, and the node of each ``welcome`` it got."""

    def __init__(self, browser: Browser, url: str, name: str, *, fake_clock: bool = False):
        from playwright.sync_api import expect

        expect.set_options(timeout=STEP_TIMEOUT_MS)
        self.context = browser.new_context(ignore_https_errors=True)
        self.context.set_default_timeout(STEP_TIMEOUT_MS)
        self.page = self.context.new_page()
        self.sockets: list[str] = []
        self.welcomes: list[str] = []
        self.errors: list[str] = []
        self.page.on("websocket", self._opened)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        if fake_clock:
            self.page.clock.install()  # real time until the test pauses it
        self.page.goto(f"{url}/?name={name}#{ROOM}")
        wait_online(self.page, "chat")

    def _opened(self, ws: Any) -> None:
        self.sockets.append(ws.url)
        ws.on("framereceived", self._frame)

    def _frame(self, payload: str | bytes) -> None:
        for line in str(payload).split("\n"):
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("type") == "welcome":
                self.welcomes.append(event["node"])

    def members(self) -> Any:
        return self.page.locator("#member-list li")


def expect_members(tab: Tab, names: list[str], timeout: float = STEP_TIMEOUT_MS) -> None:
    from playwright.sync_api import expect

    expect(tab.members()).to_have_text(names, timeout=timeout)


def test_page_api_and_chat_socket_through_nginx_on_one_port(tmp_path: Path, cert: Cert) -> None:
    from playwright.sync_api import expect

    proxy_unavailable("nginx")
    https_port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        env={
            "TRIO_CHAT_WS_PUBLIC_URL": f"wss://{NAME}:{https_port}/ws",
            "TRIO_CHAT_ALLOWED_HOSTS": f"{NAME},127.0.0.1",
            "TRIO_CHAT_TRUSTED_PROXIES": "127.0.0.1/32",
        },
    )
    upstream = Upstream(server.host, server.http_port, server.ws_port)
    proxy = Proxy(
        "nginx", tmp_path / "nginx", [upstream], cert, https_port=https_port, http_port=free_port()
    )

    async def check_http() -> None:
        config = (await proxy.get("/api/config")).json()
        assert config["ws_url"] == f"wss://{NAME}:{https_port}/ws"
        page = await proxy.get("/")
        assert page.status_code == 200
        assert "<html" in page.text
        # Scraped per host, never through the proxy.
        assert (await proxy.get("/metrics")).status_code == 404
        redirect = await proxy.get("/?name=x", tls=False)
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"https://{NAME}/?name=x"

    try:
        trio.run(server.start)
        trio.run(proxy.start)
        trio.run(check_http)
        with chromium_browser() as browser:
            alice = Tab(browser, proxy.url, "alice")
            bob = Tab(browser, proxy.url, "bob")
            expect_members(alice, ["alice (you)", "bob"])
            say(alice.page, "hello through nginx")
            expect(message_with(bob.page, "hello through nginx")).to_have_count(1)
            say(bob.page, "and back")
            expect(message_with(alice.page, "and back")).to_have_count(1)
            for tab in (alice, bob):
                assert [u.split("?")[0] for u in tab.sockets] == [f"wss://{NAME}:{https_port}/ws"]
                assert not tab.errors
        upgrade_from_another_address(cert, https_port)
        # The server believed nginx (a trusted proxy) about the client's address, and nginx
        # overwrote the X-Forwarded-For the client forged.
        line = poll_log(server, "connection open client=127.0.0.2 transport=chat peer=127.0.0.1:")
        assert "203.0.113.9" not in server.log(), line
    finally:
        trio.run(proxy.kill)
        trio.run(server.kill)
    # nginx passed both sockets to the chat socket's port (101: upgraded), none to
    # hypercorn's /ws, and logged no query string (the page's token and retry secret).
    log = proxy.access_log()
    sockets = [line for line in log if '"GET /ws ' in line]
    # The two pages' (the socket from 127.0.0.2 may close after nginx has been stopped).
    assert len([line for line in sockets if line.startswith("127.0.0.1 ")]) == 2, log
    assert all(
        " 101 " in line and line.endswith(f"upstream=127.0.0.1:{server.ws_port}")
        for line in sockets
    ), log
    assert any(line.endswith(f"upstream=127.0.0.1:{server.http_port}") for line in log), log
    assert not any("name=alice" in line for line in log), log


def upgrade_from_another_address(cert: Cert, https_port: int) -> None:
    """Open the chat socket through nginx from 127.0.0.2, forging an X-Forwarded-For."""
    handshake = (
        "GET /ws HTTP/1.1\r\n"
        f"Host: {NAME}:{https_port}\r\n"
        f"Origin: https://{NAME}:{https_port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "X-Forwarded-For: 203.0.113.9\r\n\r\n"
    ).encode()
    raw = socket.create_connection(("127.0.0.1", https_port), 5, ("127.0.0.2", 0))
    with cert.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(handshake)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head


def poll_log(server: ServerProcess, text: str) -> str:
    """The first line of the server's log containing ``text``, polled with a deadline."""
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} in:\n{server.log()}")


# --------------------------------------------------------------------------- failover


@pytest.fixture
def lan() -> Iterator[Lan]:
    with made_lan(3) as lan:
        yield lan


async def start_cluster(servers: list[ServerProcess]) -> None:
    for server in servers:
        await server.spawn()
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(server.wait_ready)
    async with trio.open_nursery() as nursery:
        for server in servers:
            peers = len(servers) - 1
            nursery.start_soon(
                server.wait_metric, "trio_chat_cluster_peers", lambda v, n=peers: v == n
            )


async def node_ids(servers: list[ServerProcess]) -> dict[str, ServerProcess]:
    found = {}
    for server in servers:
        status, body = await server.get("/api/config")
        assert status == 200, status
        found[json.loads(body)["node"]] = server
    return found


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_a_page_whose_host_dies_moves_to_the_other_host_and_misses_nothing(
    lan: Lan, tmp_path: Path, cert: Cert, kind: str
) -> None:
    from playwright.sync_api import expect

    proxy_unavailable(kind)
    env = {
        "TRIO_CHAT_CLUSTER": "lan",
        "TRIO_CHAT_CLUSTER_TTL": "1",
        "TRIO_CHAT_CLUSTER_PORT": str(free_udp_port()),
        "TRIO_CHAT_CLUSTER_SECRET": secrets.token_urlsafe(24),
        # The page connects through the proxy, by the public name.
        "TRIO_CHAT_WS_PUBLIC_URL": f"wss://{NAME}/ws",
    }
    servers = [
        ServerProcess(
            tmp_path / f"data{i}",
            tmp_path / f"host{i}.log",
            host=lan.address(i),
            http_port=8000,
            ws_port=8001,
            env={
                **env,
                "TRIO_CHAT_CLUSTER_INTERFACE": lan.address(i),
                # The public name, and its own address, which its peer heals from.
                "TRIO_CHAT_ALLOWED_HOSTS": f"{NAME},{lan.address(i)}",
            },
            netns=lan.hosts[i],
        )
        for i in range(2)
    ]
    upstreams = [Upstream(s.host, s.http_port, s.ws_port) for s in servers]
    proxy = Proxy(kind, tmp_path / kind, upstreams, cert, netns=lan.hosts[2])
    try:
        trio.run(start_cluster, servers)
        trio.run(proxy.start)
        nodes = trio.run(node_ids, servers)
        with chromium_browser(lan.hosts[2], tmp_path) as browser:
            alice = Tab(browser, proxy.url, "alice", fake_clock=True)
            bob = Tab(browser, proxy.url, "bob")
            # The proxy balances by open connections: the second page goes to the other host.
            assert len(alice.welcomes) == len(bob.welcomes) == 1
            assert {alice.welcomes[0], bob.welcomes[0]} == set(nodes)
            victim_node, survivor_node = alice.welcomes[0], bob.welcomes[0]
            expect_members(alice, ["alice (you)", "bob"])
            expect_members(bob, ["alice", "bob (you)"])
            say(alice.page, "before the failover")
            expect(message_with(bob.page, "before the failover")).to_have_count(1)

            # Alice's timers stand still from here: she reconnects only when the test
            # lets her clock run, so what she types meanwhile must wait in her outbox.
            # pause_at takes seconds (Date.now() is in milliseconds) and a time still to
            # come when it arrives: 1 s on (the page's pings are 20 s apart).
            alice.page.clock.pause_at(alice.page.evaluate("Date.now()") / 1000 + 1)
            trio.run(nodes[victim_node].kill)  # SIGKILL to its process group
            expect(alice.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
            say(alice.page, "typed while away")
            pending = message_with(alice.page, "typed while away")
            expect(pending).to_have_class(re.compile(r"\bpending\b"))
            missed = ["missed one", "missed two"]
            for text in missed:
                say(bob.page, text)
                expect(message_with(bob.page, text)).not_to_have_class(re.compile(r"\bpending\b"))

            # Her first retry, after at most the first backoff, gets through the proxy
            # to the other host, seconds before that host declares hers dead: she keeps
            # her name (her old session there holds it for her). Her clock runs no further.
            alice.page.clock.run_for(FIRST_RETRY_MS)
            wait_online(alice.page, "chat")
            assert alice.welcomes == [victim_node, survivor_node]
            for text in [*missed, "before the failover", "typed while away"]:
                expect(message_with(alice.page, text)).to_have_count(1)
                expect(message_with(bob.page, text)).to_have_count(1)
            expect(alice.page.locator(".log li.pending")).to_have_count(0)
            expect(messages(alice.page)).to_have_count(4)
            expect(messages(bob.page)).to_have_count(4)
            expect_members(alice, ["alice (you)", "bob"])
            expect_members(bob, ["alice", "bob (you)"])

            # The other host declares the dead one dead: its alice leaves, and the
            # alice now on the other host stays. Whatever the detection told the pages
            # came before a message sent after it.
            trio.run(nodes[survivor_node].wait_metric, "trio_chat_cluster_peers", lambda v: v == 0)
            say(bob.page, "after the detection")
            expect(message_with(alice.page, "after the detection")).to_have_count(1)
            expect(message_with(bob.page, "after the detection")).to_have_count(1)
            expect_members(alice, ["alice (you)", "bob"])
            expect_members(bob, ["alice", "bob (you)"])
            assert not alice.errors + bob.errors
        stored = trio.run(proxy.get, f"/api/rooms/{ROOM}/messages").json()["messages"]
        assert sorted(m["text"] for m in stored) == sorted(
            [*missed, "before the failover", "typed while away", "after the detection"]
        )
    finally:
        trio.run(proxy.kill)
        for server in servers:
            trio.run(server.kill)


def test_upgraded_sockets_outlast_two_missed_pings_in_both_proxies() -> None:
    """The proxies cut a socket idle for their tunnel timeout; the server and the page
    ping every 20 s. A live socket must survive two lost pings in a row."""
    found = re.search(r"PING_EVERY_MS = (\d+);", (WEB / "connection.js").read_text())
    assert found is not None
    page_ping = float(found[1])
    pings = max(page_ping / 1000, Settings().keepalive_interval)
    nginx = (DEPLOY / "nginx.conf").read_text()
    ws_block = nginx[nginx.index("location = /ws {") :]
    ws_block = ws_block[: ws_block.index("}")]
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    timeouts = {
        "nginx read": re.search(r"proxy_read_timeout (\d+)s;", ws_block),
        "nginx send": re.search(r"proxy_send_timeout (\d+)s;", ws_block),
        "haproxy tunnel": re.search(r"^\s*timeout tunnel (\d+)s$", haproxy, re.MULTILINE),
    }
    for what, timeout in timeouts.items():
        assert timeout is not None, what
        assert float(timeout[1]) > 3 * pings, (what, timeout[1], pings)
