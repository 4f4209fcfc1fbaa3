"""The chat socket's intake: hostile handshakes, failures in one connection, the accept
loop out of descriptors, and the connection caps (on both transports).

Every case is raw bytes on a real 127.0.0.1 socket, and every case ends with the server
still serving: a canary client joins, sends and receives.
"""

from __future__ import annotations

import logging
import os
import resource
import ssl
import struct
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from trio_chat.protocol._proxies import TrustedProxies
from trio_chat.server._boundary import FailureBoundary
from trio_chat.server._limits import ConnectionLimits, default_max_connections
from trio_chat.server._listener import HANDSHAKE_TIMEOUT, WebSocketServer

from _netns import without_worker
from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from trio_chat.server._connection import HandshakeRequest, WebSocketConnection

    from conftest import Server

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(host: str, path: str = "/ws", *, extra: str = "", version: str = "13") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n"
    ).encode()


def client_hello() -> bytes:
    """The first flight of a real TLS handshake."""
    tls = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="chat.example"
    )
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def open_raw(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_response(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    """An HTTP response's status, headers (lower-case names) and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed before a whole response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", 0)):
        chunk = await stream.receive_some(4096)
        assert chunk
        body += chunk
    return int(status_line.split(" ", 2)[1]), headers, body


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    return data


async def canary(url: str, connect: Any) -> None:
    """Two clients join a room; a message from one reaches both."""
    async with connect(url, "canary") as one, connect(url, "canary2") as two:
        await one.join("canary")
        await two.join("canary")
        await one.next_of("presence")
        await one.chat("canary", "still here")
        await two.expect("message", text="still here")


async def settled(server: Server) -> None:
    """Wait until the server holds no connection and no client slot."""
    node = server.node
    await eventually(
        lambda: not node.chat_socket.connections and node.limits.statistics().connections == 0
    )


# -- handshakes ------------------------------------------------------------------------

MALFORMED = {
    "not_http": b"HELLO THERE\r\n\r\n",
    "plain_get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "no_key": (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ),
    "no_host": (
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ),
    "host_not_ascii": upgrade("127.0.0.1").replace(b"127.0.0.1", b"\xff\xfe", 1),
    "post": upgrade("127.0.0.1").replace(b"GET", b"POST", 1),
    "huge_header": upgrade(
        "127.0.0.1", extra="".join(f"X-Pad-{i}: {'x' * 900}\r\n" for i in range(24))
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_handshake_gets_400_and_the_server_serves_on(
    server: Server, connect: Any, case: str
) -> None:
    stream = await open_raw(server.node.chat_socket_port)
    async with stream:
        await stream.send_all(MALFORMED[case])
        status, headers, body = await read_response(stream)
        assert status == 400
        assert headers["content-type"].startswith("text/plain")
        assert body.strip()
        assert await read_to_eof(stream) == b""
    assert server.node.statistics().errors["bad_handshake"] == 1
    assert not server.node.failures.statistics().contained
    await settled(server)
    await canary(server.chat_socket_url, connect)


async def test_tls_client_hello_on_the_plain_port(server: Server, connect: Any) -> None:
    stream = await open_raw(server.node.chat_socket_port)
    async with stream:
        await stream.send_all(client_hello())
        status, _, _ = await read_response(stream)
        assert status == 400
    assert server.node.statistics().errors["bad_handshake"] == 1
    await settled(server)
    await canary(server.chat_socket_url, connect)


async def test_wrong_version_gets_426_naming_13(server: Server, connect: Any) -> None:
    stream = await open_raw(server.node.chat_socket_port)
    async with stream:
        await stream.send_all(upgrade("127.0.0.1", version="8"))
        status, headers, _ = await read_response(stream)
        assert status == 426
        assert headers["sec-websocket-version"] == "13"
    assert server.node.statistics().errors["bad_version"] == 1
    await settled(server)
    await canary(server.chat_socket_url, connect)


async def test_client_that_closes_mid_request(server: Server, connect: Any) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        stream = await open_raw(server.node.chat_socket_port)
        await stream.send_all(upgrade("127.0.0.1")[:40])
        await stream.aclose()
    await settled(server)
    assert not server.node.statistics().errors
    assert not server.node.failures.statistics().contained
    await eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds)
    await canary(server.chat_socket_url, connect)


async def echo(conn: WebSocketConnection, request: HandshakeRequest) -> None:
    """A handler for a bare `WebSocketServer`: echo text back; fail where asked to."""
    if request.path == "/fail-before-accept":
        raise RuntimeError("a bug before accept")
    conn.accept()
    if request.path == "/fail-after-accept":
        raise RuntimeError("a bug after accept")
    while True:
        for text in await conn.receive_messages_untrusted():
            conn.send_payload_nowait(text.encode())


async def start_bare(
    nursery: trio.Nursery,
    failures: FailureBoundary,
    errors: list[str],
    tls: ssl.SSLContext | None = None,
) -> tuple[WebSocketServer, int]:
    """A bare chat-socket server (no node) whose handler echoes: `echo`."""
    bare = WebSocketServer(
        echo,
        failures=failures,
        limits=ConnectionLimits(100, 100),
        count_error=errors.append,
        max_message=16 * 1024,
        backlog_limit=1024 * 1024,
        keepalive_interval=3600,
        proxies=TrustedProxies(),
        node_id="bare",
        tls=tls,
    )
    port = await nursery.start(bare.serve, "127.0.0.1", 0)
    return bare, port


async def echo_canary(port: int) -> None:
    async with open_websocket_url(f"ws://127.0.0.1:{port}/ok") as ws:
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"


async def test_stalled_handshake_is_cut_at_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    failures = FailureBoundary()
    errors: list[str] = []
    bare, port = await start_bare(nursery, failures, errors)
    stream = await open_raw(port)
    async with stream:
        start = trio.current_time()
        await stream.send_all(upgrade("127.0.0.1")[:60])
        assert await read_to_eof(stream) == b""
        assert trio.current_time() - start >= HANDSHAKE_TIMEOUT
    assert errors == ["handshake_timeout"]
    await eventually(lambda: not bare.connections)
    await echo_canary(port)
    assert not failures.statistics().contained


async def test_stalled_handshakes_hold_up_no_one(server: Server, connect: Any) -> None:
    streams = [await open_raw(server.node.chat_socket_port) for _ in range(20)]
    for stream in streams:
        await stream.send_all(upgrade("127.0.0.1")[:60])
    await eventually(lambda: len(server.node.chat_socket.connections) == 20)
    await canary(server.chat_socket_url, connect)
    for stream in streams:
        await stream.aclose()
    await settled(server)


# -- failures inside one connection ----------------------------------------------------


async def test_a_bug_before_accept_answers_400_and_stops_there(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    failures = FailureBoundary()
    bare, port = await start_bare(nursery, failures, [])
    stream = await open_raw(port)
    async with stream:
        await stream.send_all(upgrade("127.0.0.1", "/fail-before-accept"))
        status, _, _ = await read_response(stream)
        assert status == 400
        assert await read_to_eof(stream) == b""
    assert failures.statistics().contained == {("chat_socket", "RuntimeError"): 1}
    assert "a bug before accept" in caplog.text
    await eventually(lambda: not bare.connections)
    await echo_canary(port)


async def test_a_bug_after_accept_closes_1011_and_stops_there(nursery: trio.Nursery) -> None:
    failures = FailureBoundary()
    bare, port = await start_bare(nursery, failures, [])
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        stream = await open_raw(port)
        async with stream:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host="127.0.0.1", target="/fail-after-accept")))
            close = await read_until_close(stream, ws)
            assert (close.code, close.reason) == (1011, "internal error")
            assert await read_to_eof(stream) == b""
    assert failures.statistics().contained == {("chat_socket", "RuntimeError"): 3}
    await eventually(lambda: not bare.connections)
    await eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds)
    await echo_canary(port)


async def read_until_close(stream: trio.SocketStream, ws: WSConnection) -> CloseConnection:
    """Read a raw client's events up to the server's close frame."""
    while True:
        data = await stream.receive_some(65536)
        assert data, "closed without a close frame"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                return event
            assert isinstance(event, (AcceptConnection, TextMessage)), event


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (masked, as RFC 6455 requires), built by hand."""
    mask = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


async def test_ping_after_our_close_is_ignored(server: Server, connect: Any) -> None:
    stream = await open_raw(server.node.chat_socket_port)
    ws = WSConnection(ConnectionType.CLIENT)
    async with stream:
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws?name=pinger")))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            ws.receive_data(await stream.receive_some(65536))
        await stream.send_all(ws.send(BytesMessage(data=b"\x00\x01")))
        close = await read_until_close(stream, ws)
        assert close.code == 1003
        # The server is now waiting for our close: a ping first (the client's wsproto
        # refuses to send one now, so it is written by hand), then the close.
        await stream.send_all(masked_frame(0x9, b"late"))
        await stream.send_all(ws.send(close.response()))
        assert await read_to_eof(stream) == b""
    await settled(server)
    assert not server.node.failures.statistics().contained
    await canary(server.chat_socket_url, connect)


# -- the accept loop -------------------------------------------------------------------


async def test_out_of_descriptors_the_accept_loop_backs_off_and_recovers(
    server: Server, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_chat.websocket")
    stats = server.node.chat_socket.statistics
    waiting = trio.socket.socket()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        # Every descriptor number this process may use is taken: the next accept()
        # fails with EMFILE (the limit is only lowered, never raised past ``hard``).
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        with pytest.raises(OSError, match="Too many open files"):  # noqa: PT012
            for _ in range(highest + 1):
                filler.append(os.dup(waiting.fileno()))
        start = trio.current_time()
        await waiting.connect(("127.0.0.1", server.node.chat_socket_port))
        await eventually(lambda: stats().accept_failures >= 4)
        # Four failures need three backoffs between them: a spinning loop takes none.
        elapsed = trio.current_time() - start
        assert elapsed >= 0.3
        lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert 1 <= len(lines) <= 1 + elapsed
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Descriptors are free again: the client that waited in the listen queue is served.
    stream = trio.SocketStream(waiting)
    async with stream:
        await stream.send_all(upgrade("127.0.0.1"))
        status, _, _ = await read_response(stream)
        assert status == 101
    await canary(server.chat_socket_url, connect)
    async with httpx.AsyncClient() as http:
        metrics = without_worker((await http.get(server.http_url + "/metrics")).text)
    assert f"trio_chat_accept_failures_total {stats().accept_failures}" in metrics


# -- connection caps -------------------------------------------------------------------


def test_default_cap_leaves_room_for_the_rest() -> None:
    assert default_max_connections(1024) == 691
    assert default_max_connections(1_048_576) == 943_488
    assert default_max_connections(100) == 1


async def refused(url: str, port: int, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    stream = await open_raw(port, source)
    async with stream:
        await stream.send_all(upgrade(f"127.0.0.1:{port}"))
        status, headers, _ = await read_response(stream)
        return status, headers


async def test_per_address_cap(
    nursery: trio.Nursery, tmp_path: Path, transport: str, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, max_connections_per_ip=5))
    url = server.url(transport)
    port = int(url.split(":")[2].split("/")[0])
    async with connect(url, "u0") as first, connect(url, "u1"), connect(url, "u2"):
        async with connect(url, "u3"), connect(url, "u4") as last:
            status, headers = await refused(url, port)
            assert status == 503
            assert int(headers["retry-after"]) > 0
            # another address is not affected
            status, _ = await refused(url, port, source="127.0.0.2")
            assert status == 101
            # the five keep chatting
            await first.join("general")
            await last.join("general")
            await first.chat("general", "still here")
            await last.next_of("message")
        await eventually(lambda: server.node.limits.statistics().connections <= 3)
        async with connect(url, "again") as again:
            await again.join("general")
    assert server.node.statistics().errors["too_many_from_address"] == 1
    assert not server.node.failures.statistics().contained


async def test_global_cap_is_shared_by_both_transports(
    nursery: trio.Nursery, tmp_path: Path, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, max_connections=5))
    chat, fallback = server.chat_socket_url, server.fallback_url
    ports = {chat: server.node.chat_socket_port, fallback: int(server.http_url.split(":")[2])}
    async with connect(chat, "a"), connect(chat, "b"), connect(fallback, "c") as c:
        async with connect(chat, "d") as d, connect(fallback, "e"):
            for url, port in ports.items():
                status, headers = await refused(url, port, source="127.0.0.2")
                assert status == 503, url
                assert headers["retry-after"]
            # the page and /healthz still answer at the cap
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/")).status_code == 200
            await c.join("general")
            await d.join("general")
            await c.chat("general", "still here")
            await d.next_of("message")
        await eventually(lambda: server.node.limits.statistics().connections <= 3)
        await canary(chat, connect)
    assert server.node.statistics().errors["too_many_connections"] == 2
    async with httpx.AsyncClient() as http:
        metrics = without_worker((await http.get(server.http_url + "/metrics")).text)
    assert 'trio_chat_errors_total{code="too_many_connections"} 2' in metrics
