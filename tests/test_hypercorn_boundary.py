"""Hypercorn's port against the three bugs the fuzzer found there, over raw sockets.

- Bytes pipelined with the upgrade request used to stop hypercorn's whole server;
- a frame sent while hypercorn closed the connection raised ``BusyResourceError``;
- a flood closed with 1008 left the server's socket in CLOSE-WAIT for ever.

trio_chat/app/_hypercorn.py and ``_serve_fallback`` (trio_chat/app/_app.py) fix them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio
from hypercorn.protocol.ws_stream import WSStream
from test_http_hostile import port_of, samples
from wsproto.frame_protocol import FrameProtocol, Opcode

from _fuzz_strategies import OP_BINARY, OP_TEXT, Frame, encode_sequence, valid_handshake
from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server

#: How long to read the server's answer when it does not close.
READ_DEADLINE: Final = 1.0
#: Tries to make hypercorn's reader lose its own race, which goes either way.
ATTEMPTS: Final = 20
JOIN: Final = Frame(OP_TEXT, b'{"type":"join","room":"general"}')

PIPELINED: Final = {
    "one_byte": b"x",
    "second_request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "masked_join": JOIN.encode(),
}


async def exchange(port: int, data: bytes, *, until: bytes | None = None) -> bytes:
    """Send ``data`` on a fresh connection; read until the server closes, ``until``
    appears in the answer, or READ_DEADLINE passes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reply = bytearray()
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(READ_DEADLINE):
            while chunk := await stream.receive_some():
                reply += chunk
                if until is not None and until in reply:
                    break
    return bytes(reply)


def frames(reply: bytes) -> list[Any]:
    """The server's frames after its 101."""
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), reply[:200]
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(rest)
    return list(parser.received_frames())


def events(reply: bytes) -> list[dict[str, Any]]:
    """The JSON events in the server's frames after its 101."""
    return [
        json.loads(line)
        for frame in frames(reply)
        if frame.opcode is Opcode.TEXT
        for line in frame.payload.split("\n")
    ]


def close_code(reply: bytes) -> int:
    """The code of the server's close frame, its last frame."""
    last = frames(reply)[-1]
    assert last.opcode is Opcode.CLOSE, last
    return int(last.payload[0])


async def still_serving(server: Server, connect: Any) -> None:
    """The page answers, and two clients chat over ``/ws``."""
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/")).status_code == 200
    async with connect(server.fallback_url, "canary") as canary:
        await canary.join("canary")
        async with connect(server.fallback_url, "late") as late:
            await late.join("canary")
            await late.chat("canary", "still here")
        assert (await canary.next_of("message"))["text"] == "still here"


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("extra", PIPELINED.values(), ids=PIPELINED.keys())
async def test_bytes_pipelined_with_the_upgrade_are_served_after_the_101(
    server: Server, connect: Any, caplog: pytest.LogCaptureFixture, extra: bytes
) -> None:
    port = port_of(server.http_url)
    for _ in range(3):
        reply = await exchange(port, valid_handshake() + extra, until=b'"joined"')
        # The upgrade worked (no 400 raced the 101), then the bytes were read as frames:
        # a second HTTP request is not one, and closes the WebSocket (1002).
        received = [e["type"] for e in events(reply)]
        if extra == PIPELINED["masked_join"]:
            assert received[:1] == ["welcome"], received
            assert "joined" in received, received
        await still_serving(server, connect)
    assert server.node.failures.statistics().contained == {}
    assert errors(caplog) == []


async def test_bytes_pipelined_with_a_refused_upgrade_are_dropped(
    server: Server, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    request = valid_handshake().replace(b"\r\n\r\n", b"\r\nOrigin: http://evil.example\r\n\r\n")
    for extra in PIPELINED.values():
        reply = await exchange(port_of(server.http_url), request + extra + extra)
        assert reply.startswith(b"HTTP/1.1 403 "), reply[:200]
        assert reply.count(b"HTTP/1.1 ") == 1, reply
    await still_serving(server, connect)
    assert server.node.failures.statistics().contained == {}
    assert errors(caplog) == []


async def test_a_connection_that_fails_in_hypercorn_is_contained_and_counted(
    server: Server, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hypercorn's own WSStream, as without our fix: the pipelined byte makes its 400
    # race the app's 101, and the loser raises h11's LocalProtocolError (in the app, or
    # in hypercorn's connection reader, whose exception used to stop the server).
    monkeypatch.setattr("hypercorn.protocol.h11.WSStream", WSStream)
    port = port_of(server.http_url)
    failures = server.node.failures
    # The race goes either way: try until the reader has lost it at least once.
    for _ in range(ATTEMPTS):
        await exchange(port, valid_handshake() + b"x")
        await still_serving(server, connect)
        if failures.statistics().contained:
            break
    assert failures.statistics().contained == {("http_connection", "LocalProtocolError"): 1}
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        metrics = samples((await http.get("/metrics")).text)
    key = 'trio_chat_client_failures_total{where="http_connection",type="LocalProtocolError"}'
    assert metrics[key] == "1"


async def test_a_frame_sent_while_hypercorn_closes_is_not_an_error(
    server: Server, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The fuzzer's shrunk input: the unmasked frame makes hypercorn close the connection
    # while the session's writer sends the join's replies.
    frames = [
        Frame(OP_TEXT, b"x" * 5000),
        Frame(OP_TEXT, b"x" * 5000),
        JOIN,
        Frame(OP_BINARY, b"", fin=False, masked=False),
    ]
    port = port_of(server.http_url)
    for _ in range(10):
        await exchange(port, valid_handshake() + encode_sequence(frames))
    await still_serving(server, connect)
    await eventually(lambda: not server.node.sessions)
    assert server.node.failures.statistics().contained == {}
    assert errors(caplog) == []


async def test_an_empty_binary_frame_closes_1003_like_any_binary_frame(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by make fuzz: Quart-trio turns it into None, which the session took for text.
    request = valid_handshake() + Frame(OP_BINARY, b"").encode()
    reply = await exchange(port_of(server.http_url), request)
    assert close_code(reply) == 1003
    assert server.node.failures.statistics().contained == {}
    assert errors(caplog) == []


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("attempts", [5])
async def test_a_flood_closed_with_1008_gives_its_descriptor_back(
    nursery: trio.Nursery, tmp_path: Path, connect: Any, attempts: int
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, rate_limit=10, rate_burst=5))
    port = port_of(server.http_url)
    flood = encode_sequence([Frame(OP_TEXT, b'{"type":"ping"}')] * 200)
    await still_serving(server, connect)
    await eventually(lambda: not server.node.sessions)
    start = open_descriptors()
    for _ in range(attempts):
        reply = await exchange(port, valid_handshake() + flood)
        # Closed by the server with 1008 (policy: the rate limit).
        assert close_code(reply) == 1008
    # The server answers each client's FIN: no socket stays in CLOSE-WAIT.
    await eventually(lambda: open_descriptors() <= start)
    await eventually(lambda: not server.node.sessions)


def test_importing_the_app_installs_the_boundary_where_hypercorn_looks() -> None:
    import hypercorn.protocol.h11
    import hypercorn.trio.run

    import trio_chat  # noqa: F401 (what `hypercorn trio_chat:app` imports)
    from trio_chat.app._hypercorn import _TCPServer, _WSStream

    assert hypercorn.trio.run.TCPServer is _TCPServer  # type: ignore[attr-defined]
    assert hypercorn.protocol.h11.WSStream is _WSStream  # type: ignore[attr-defined]


def test_a_hypercorn_without_the_internals_relied_on_fails_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_chat.app._hypercorn import install

    monkeypatch.delattr("hypercorn.trio.tcp_server.TCPServer.protocol_send")
    with pytest.raises(ImportError, match=r"lacks .*TCPServer\.protocol_send"):
        install()
