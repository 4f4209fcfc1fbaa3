"""Clients behind a trusted proxy, over real sockets on both transports and HTTP.

The proxy is played by raw handshakes from 127.0.0.1 carrying ``X-Forwarded-For`` /
``X-Forwarded-Proto`` / ``Forwarded``; a client that is not a proxy connects from
127.0.0.2 (loopback is a /8). The server trusts 127.0.0.1/32, or only 10.0.0.0/8 when
the same headers must be ignored. What is checked is what the server does with the
client's address: the connection log lines, the per-address cap and the origin check.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio
from test_socket_intake import open_raw, read_response, upgrade
from trio_websocket import ConnectionClosed, open_websocket_url

from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

    from conftest import Server

CONNECTIONS = "trio_chat.connections"
TRUST_LOCAL = frozenset({"127.0.0.1/32"})
TRUST_ELSEWHERE = frozenset({"10.0.0.0/8"})


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


async def handshake(
    server: Server, transport: str, headers: str = "", source: str = "127.0.0.1"
) -> tuple[int, trio.SocketStream]:
    """A raw WebSocket handshake from ``source`` with extra ``headers`` lines: the status,
    and the stream (still open: a 101 keeps the client connected)."""
    port = port_of(server.url(transport))
    stream = await open_raw(port, source)
    await stream.send_all(upgrade(f"127.0.0.1:{port}", extra=headers))
    status, _, _ = await read_response(stream)
    return status, stream


async def status_of(server: Server, transport: str, headers: str, source: str = "127.0.0.1") -> int:
    status, stream = await handshake(server, transport, headers, source)
    await stream.aclose()
    return status


async def read_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


def opened(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == CONNECTIONS and r.msg.startswith("connection open")
    ]


def closed(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == CONNECTIONS and r.msg.startswith("connection closed")
    ]


@pytest.fixture
async def proxied(nursery: trio.Nursery, tmp_path: Any) -> Server:
    return await start_server(
        nursery, make_settings(tmp_path, trusted_proxies=TRUST_LOCAL, max_connections_per_ip=2)
    )


async def test_forwarded_client_is_logged_on_open_and_close(
    proxied: Server, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONNECTIONS)
    headers = [(b"X-Forwarded-For", b"198.51.100.1, 203.0.113.7")]
    async with open_websocket_url(proxied.url(transport), extra_headers=headers) as ws:
        assert '"welcome"' in str(await ws.get_message())
        await eventually(lambda: bool(opened(caplog)))
    await eventually(lambda: bool(closed(caplog)))
    name = "chat" if transport == "chat_socket" else "ws-fallback"
    (open_line,) = opened(caplog)
    assert open_line.getMessage().startswith(
        f"connection open client=203.0.113.7 transport={name} peer=127.0.0.1:"
    )
    assert open_line.getMessage().endswith(f" node={proxied.node.node_id}")
    assert (open_line.client, open_line.transport) == ("203.0.113.7", name)  # type: ignore[attr-defined]
    (close_line,) = closed(caplog)
    message = close_line.getMessage()
    assert message.startswith(f"connection closed client=203.0.113.7 transport={name} code=1000 ")
    assert close_line.code == 1000  # type: ignore[attr-defined]
    assert 0 <= close_line.duration < 10  # type: ignore[attr-defined]


async def test_a_close_by_the_server_logs_its_code(
    proxied: Server, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONNECTIONS)
    async with open_websocket_url(proxied.url(transport)) as ws:
        await ws.get_message()
        await ws.send_message(b"binary")  # not part of the protocol: close 1003
        with pytest.raises(ConnectionClosed):
            await read_until_closed(ws)
    await eventually(lambda: bool(closed(caplog)))
    assert closed(caplog)[0].code == 1003  # type: ignore[attr-defined]
    assert closed(caplog)[0].client == "127.0.0.1"  # type: ignore[attr-defined]


async def test_untrusted_peer_is_logged_as_itself(
    nursery: trio.Nursery, tmp_path: Any, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, trusted_proxies=TRUST_ELSEWHERE))
    caplog.set_level(logging.INFO, logger=CONNECTIONS)
    status, stream = await handshake(server, transport, "X-Forwarded-For: 203.0.113.7\r\n")
    assert status == 101
    await eventually(lambda: bool(opened(caplog)))
    await stream.aclose()
    await eventually(lambda: bool(closed(caplog)))
    assert opened(caplog)[0].client == "127.0.0.1"  # type: ignore[attr-defined]
    # The TCP connection dropped without a close frame.
    assert closed(caplog)[0].code == 1006  # type: ignore[attr-defined]


async def test_per_address_cap_counts_the_forwarded_client(proxied: Server, transport: str) -> None:
    xff = "X-Forwarded-For: 203.0.113.7\r\n"
    streams = []
    try:
        for _ in range(2):
            status, stream = await handshake(proxied, transport, xff)
            streams.append(stream)
            assert status == 101
        # The third from that client is refused, though the proxy has carried only two.
        assert await status_of(proxied, transport, xff) == 503
        # Another client through the same proxy, and the proxy itself, are not affected.
        for other in ("X-Forwarded-For: 203.0.113.8\r\n", ""):
            status, stream = await handshake(proxied, transport, other)
            streams.append(stream)
            assert status == 101
        assert proxied.node.limits.statistics().addresses == 3
    finally:
        for stream in streams:
            await stream.aclose()
    assert proxied.node.statistics().errors["too_many_from_address"] == 1
    await eventually(lambda: proxied.node.limits.statistics().connections == 0)
    assert not proxied.node.failures.statistics().contained


async def test_untrusted_headers_do_not_escape_the_cap(
    nursery: trio.Nursery, tmp_path: Any, transport: str
) -> None:
    server = await start_server(
        nursery,
        make_settings(tmp_path, trusted_proxies=TRUST_ELSEWHERE, max_connections_per_ip=2),
    )
    streams = []
    try:
        for n in range(2):
            status, stream = await handshake(
                server, transport, f"X-Forwarded-For: 203.0.113.{n}\r\n"
            )
            streams.append(stream)
            assert status == 101
        # Claiming to be a third client does not help: the peer is what counts.
        assert await status_of(server, transport, "X-Forwarded-For: 203.0.113.9\r\n") == 503
    finally:
        for stream in streams:
            await stream.aclose()


async def test_forwarded_header_names_the_client(
    proxied: Server, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONNECTIONS)
    forwarded = 'Forwarded: for="[2001:db8::17]:4711";proto=https, for=127.0.0.1\r\n'
    status, stream = await handshake(proxied, transport, forwarded)
    assert status == 101
    await eventually(lambda: bool(opened(caplog)))
    await stream.aclose()
    assert opened(caplog)[0].client == "2001:db8::17"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("headers", "source", "status"),
    [
        # An https page behind a proxy that terminates TLS: the socket sees plain http.
        ("Origin: https://127.0.0.1\r\nX-Forwarded-Proto: https\r\n", "127.0.0.1", 101),
        (
            "Origin: https://127.0.0.1\r\nForwarded: for=203.0.113.7;proto=https\r\n",
            "127.0.0.1",
            101,
        ),
        # The client reached the proxy over TLS: a plain-http page on that name (which a
        # network attacker can write) may not open its socket.
        ("Origin: http://127.0.0.1:8000\r\nX-Forwarded-Proto: https\r\n", "127.0.0.1", 403),
        (
            "Origin: http://127.0.0.1\r\nForwarded: for=203.0.113.7;proto=https\r\n",
            "127.0.0.1",
            403,
        ),
        # The page's own origin over plain http, as without a proxy.
        ("Origin: http://127.0.0.1:8000\r\nX-Forwarded-Proto: http\r\n", "127.0.0.1", 101),
        # Not a trusted proxy: its X-Forwarded-Proto is ignored.
        ("Origin: http://127.0.0.1:8000\r\nX-Forwarded-Proto: https\r\n", "127.0.0.2", 101),
        # An origin urllib cannot split (it raised, and the connection failed as a bug).
        ("Origin: http://[::1\r\n", "127.0.0.2", 403),
    ],
)
async def test_origin_check_takes_the_scheme_from_a_trusted_proxy(
    proxied: Server, transport: str, headers: str, source: str, status: int
) -> None:
    assert await status_of(proxied, transport, headers, source) == status
    assert proxied.node.statistics().errors.get("origin_refused", 0) == (status == 403)
    assert not proxied.node.failures.statistics().contained


HOSTILE = [
    "X-Forwarded-For: unknown",
    "X-Forwarded-For: _hidden",
    "X-Forwarded-For: garbage, , ,",
    "X-Forwarded-For: [2001:db8::1",
    "X-Forwarded-For: 203.0.113.7:99999:1",
    "X-Forwarded-For: " + "x" * 8000,
    "X-Forwarded-For: " + "127.0.0.1," * 800 + "127.0.0.1",
    "X-Forwarded-For: 300.1.2.3",
    "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-For: \t",
    "Forwarded: for=unknown",
    "Forwarded: for=_gazonk",
    'Forwarded: for="[2001:db8::1',
    'Forwarded: for="\\',
    "Forwarded: for=1.2.3.4;for=5.6.7.8",
    "Forwarded: ;;;,,,=",
    "Forwarded: " + "for=127.0.0.1," * 600,
    "Forwarded: proto=https",
]


@pytest.mark.parametrize("header", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_forwarding_headers_fall_back_to_the_peer(
    proxied: Server, transport: str, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_chat")
    status, stream = await handshake(proxied, transport, header + "\r\n")
    assert status == 101
    await eventually(lambda: bool(opened(caplog)))
    await stream.aclose()
    assert opened(caplog)[0].client == "127.0.0.1"  # type: ignore[attr-defined]
    assert any("forwarding headers not used" in r.getMessage() for r in caplog.records)
    assert not proxied.node.failures.statistics().contained
    # And the server still serves.
    async with open_websocket_url(proxied.url(transport)) as ws:
        assert '"welcome"' in str(await ws.get_message())


@pytest.mark.parametrize(
    ("trusted", "source", "logged"),
    [(TRUST_LOCAL, "127.0.0.1", "203.0.113.7"), (TRUST_ELSEWHERE, "127.0.0.1", "127.0.0.1")],
)
async def test_http_requests_see_the_forwarded_client(
    nursery: trio.Nursery,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    trusted: frozenset[str],
    source: str,
    logged: str,
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, trusted_proxies=trusted))
    caplog.set_level(logging.DEBUG, logger="trio_chat.app")
    stream = await open_raw(port_of(server.http_url), source)
    async with stream:
        # A Host this server does not answer: its refusal is logged with the client.
        await stream.send_all(
            b"GET /api/config HTTP/1.1\r\nHost: evil.example\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\n"
        )
        status, _, _ = await read_response(stream)
    assert status == 400
    assert f"refused a request from {logged}: bad_host" in caplog.text


async def test_an_ipv6_proxy_on_the_chat_socket(
    nursery: trio.Nursery, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(
        nursery,
        make_settings(tmp_path, ws_bind=("::1", 0), trusted_proxies=frozenset({"::1/128"})),
    )
    caplog.set_level(logging.INFO, logger=CONNECTIONS)
    port = server.node.chat_socket_port
    stream = await trio.open_tcp_stream("::1", port)
    async with stream:
        await stream.send_all(upgrade(f"[::1]:{port}", extra="X-Forwarded-For: 2001:DB8::5\r\n"))
        status, _, _ = await read_response(stream)
        assert status == 101
        await eventually(lambda: bool(opened(caplog)))
    record = opened(caplog)[0]
    assert (record.client, record.peer.rsplit(":", 1)[0]) == ("2001:db8::5", "::1")  # type: ignore[attr-defined]
