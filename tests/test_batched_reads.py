"""Frames that reach the chat socket in one socket read: handled as one batch, in order.

A raw client writes several frames with one ``send_all`` on a real 127.0.0.1 socket, so
the server reads them together: its sends become one item of the commit queue (one
commit, one hub item, one frame back to the sender), and every answer keeps the frames'
order, up to a close or a refused frame that ends the batch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
from test_auth import jwt_server as jwt_server
from test_auth import token
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)

if TYPE_CHECKING:
    from conftest import Server

ROOM = "batch"


class RawClient:
    """A wsproto client on a raw socket: writes what the test says, reads frame by frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    @classmethod
    async def open(cls, port: int, query: str) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        await stream.send_all(client.ws.send(Request(host="127.0.0.1", target=f"/ws?{query}")))
        while not isinstance(await client.next_event(), AcceptConnection):
            pass
        return client

    async def next_event(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def next_frame(self) -> list[dict[str, Any]]:
        """The chat events of the next text frame (presence skipped)."""
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage), event
            frame = [json.loads(line) for line in event.data.split("\n")]
            frame = [e for e in frame if e["type"] != "presence"]
            if frame:
                return frame

    async def next_of(self, type_: str) -> dict[str, Any]:
        while True:
            for event in await self.next_frame():
                if event["type"] == type_:
                    return event

    def frame(self, command: dict[str, Any]) -> bytes:
        return self.ws.send(TextMessage(data=json.dumps(command)))

    def chat(self, text: str) -> bytes:
        return self.frame({"type": "send", "room": ROOM, "text": text, "cid": text})

    async def close_code(self) -> int:
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                return event.code


async def joined(port: int, name: str) -> RawClient:
    client = await RawClient.open(port, f"name={name}")
    await client.stream.send_all(client.frame({"type": "join", "room": ROOM}))
    await client.next_of("joined")
    return client


async def history_texts(port: int) -> list[str]:
    reader = await RawClient.open(port, "name=reader")
    await reader.stream.send_all(reader.frame({"type": "join", "room": ROOM}))
    texts = []
    while True:
        for event in await reader.next_frame():
            if event["type"] == "joined":
                return texts
            if event["type"] == "message":
                texts.append(event["text"])


async def test_one_reads_sends_are_one_commit_and_one_frame_back(server: Server) -> None:
    port = server.node.chat_socket_port
    assert port is not None
    alice = await joined(port, "alice")
    bob = await joined(port, "bob")
    await alice.stream.send_all(alice.chat("a") + alice.chat("b") + alice.chat("c"))
    frame = await alice.next_frame()
    assert [(e["type"], e.get("cid")) for e in frame] == [
        ("message", "a"),
        ("ack", "a"),
        ("message", "b"),
        ("ack", "b"),
        ("message", "c"),
        ("ack", "c"),
    ]
    assert [(e["type"], e["text"]) for e in await bob.next_frame()] == [
        ("message", "a"),
        ("message", "b"),
        ("message", "c"),
    ]


async def test_answers_keep_the_order_of_the_frames_in_one_read(server: Server) -> None:
    port = server.node.chat_socket_port
    assert port is not None
    alice = await joined(port, "alice")
    await alice.stream.send_all(
        alice.chat("a")
        + alice.frame({"type": "nope"})
        + alice.frame({"type": "ping"})
        + alice.frame({"type": "send", "room": "elsewhere", "text": "x", "cid": "x"})
        + alice.chat("b")
    )
    seen = []
    while len(seen) < 7:
        seen += [(e["type"], e.get("code") or e.get("cid")) for e in await alice.next_frame()]
    refusals = [e for e in seen if e[0] in ("error", "pong")]
    assert refusals == [("error", "unknown_type"), ("pong", None), ("error", "not_joined")]
    sent = [e for e in seen if e[0] in ("message", "ack")]
    assert sent == [("message", "a"), ("ack", "a"), ("message", "b"), ("ack", "b")]


async def test_sends_before_a_close_in_the_same_read_are_stored(server: Server) -> None:
    port = server.node.chat_socket_port
    assert port is not None
    alice = await joined(port, "alice")
    sends = alice.chat("a") + alice.chat("b")
    await alice.stream.send_all(sends + alice.ws.send(CloseConnection(code=1000, reason="bye")))
    assert await alice.close_code() == 1000
    assert await history_texts(port) == ["a", "b"]


async def test_sends_before_a_binary_frame_in_the_same_read_are_stored_then_1003(
    server: Server,
) -> None:
    port = server.node.chat_socket_port
    assert port is not None
    alice = await joined(port, "alice")
    binary = alice.ws.send(BytesMessage(data=b"\x00"))
    await alice.stream.send_all(alice.chat("a") + binary + alice.chat("late"))
    assert await alice.next_of("error") == {
        "type": "error",
        "code": "binary_unsupported",
        "message": "binary frames are not part of the protocol: send JSON text",
    }
    assert await alice.close_code() == 1003
    assert await history_texts(port) == ["a"]


async def test_frames_after_hello_in_the_same_read_are_served(jwt_server: Server) -> None:
    port = jwt_server.node.chat_socket_port
    assert port is not None
    client = await RawClient.open(port, "")
    await client.stream.send_all(
        client.frame({"type": "hello", "token": token()})
        + client.frame({"type": "join", "room": "lobby"})
    )
    assert (await client.next_of("welcome"))["user"] is not None
    assert (await client.next_of("joined"))["room"] == "lobby"
