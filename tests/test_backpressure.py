"""Slow readers: the server's memory stays bounded, frames never tear, others get all.

These clients are raw sockets with a tiny receive buffer, speaking WebSocket through
wsproto, so the test decides exactly when (and whether) bytes are read.
"""

from __future__ import annotations

import collections
import json
import socket
import urllib.parse
from typing import TYPE_CHECKING, Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from trio_chat.node._store import Message

from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server

MESSAGES = 10_000
BACKLOG = 64 * 1024
CLOSE_SLOW = 4008


class RawClient:
    """A WebSocket client on a raw trio socket with a small receive buffer."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[dict[str, Any]] = []
        self.partial: list[str] = []
        self.count: collections.Counter[str] = collections.Counter()
        self.close_code: int | None = None
        self.answer_pings = True

    @classmethod
    async def connect(cls, url: str, name: str, rcvbuf: int = 4096) -> RawClient:
        parts = urllib.parse.urlsplit(url)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((parts.hostname, parts.port))
        client = cls(sock)
        await client._send(Request(host=parts.netloc, target=f"{parts.path}?name={name}"))
        while not any(isinstance(e, AcceptConnection) for e in await client._receive_events()):
            pass
        return client

    async def _send(self, event: Any) -> None:
        data = self.ws.send(event)
        while data:
            sent = await self.sock.send(data)
            data = data[sent:]

    async def send(self, **command: Any) -> None:
        await self._send(TextMessage(data=json.dumps(command)))

    async def _receive_events(self, size: int = 65536) -> list[Any]:
        data = await self.sock.recv(size)
        self.ws.receive_data(data or None)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, TextMessage):
                # wsproto hands over a frame's data as it arrives
                self.partial.append(event.data)
                if event.message_finished:
                    # json.loads fails on a torn or interleaved frame
                    text, self.partial = "".join(self.partial), []
                    for line in text.split("\n"):
                        event = json.loads(line)
                        self.events.append(event)
                        self.count[event["type"]] += 1
            elif isinstance(event, Ping):
                self.count["ping"] += 1
                if self.answer_pings:
                    await self._send(event.response())
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
        if not data:
            self.close_code = self.close_code or 1006
        return events

    async def read_until(self, done: Any, chunk: int = 65536) -> None:
        while not done() and self.close_code is None:
            await self._receive_events(chunk)

    def close(self) -> None:
        self.sock.close()


def messages(client: RawClient) -> list[dict[str, Any]]:
    return [e for e in client.events if e["type"] == "message"]


async def publish(url: str, count: int, size: int = 200) -> None:
    publisher = await RawClient.connect(url, "publisher")
    try:
        await publisher.send(type="join", room="flood")
        for i in range(count):
            await publisher.send(type="send", room="flood", text=f"{i:06d} " + "x" * size)
        # Read everything before closing: closing with unread data resets the
        # connection, and the server would lose frames still in flight.
        await publisher.read_until(lambda: publisher.count["ack"] >= count)
    finally:
        publisher.close()


async def test_slow_reader_is_closed_4008_while_others_get_everything(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(
        nursery, make_settings(tmp_path, rate_limit=0.0, backlog=BACKLOG, store="memory")
    )
    url = server.url(transport)
    slow = await RawClient.connect(url, "slow", rcvbuf=2048)
    await slow.send(type="join", room="flood")
    readers = [await RawClient.connect(url, f"reader{i}", rcvbuf=65536) for i in range(3)]
    for reader in readers:
        await reader.send(type="join", room="flood")
        await reader.read_until(lambda r=reader: r.count["joined"] > 0)
    publisher = readers[0]
    async with trio.open_nursery() as inner:
        # As soon as the server gives up on the slow client, it reads what it was sent.
        inner.start_soon(read_when_dropped, server, slow)
        # Publish in windows and let the readers catch up after each: they stay within
        # their backlog, while the slow client, which reads nothing, falls behind.
        window = 200
        for start in range(0, MESSAGES, window):
            for i in range(start, start + window):
                await publisher.send(type="send", room="flood", text=f"{i:06d} " + "x" * 200)
            for reader in readers:
                await reader.read_until(lambda r=reader, n=start + window: r.count["message"] >= n)
    for reader in readers:
        texts = [m["text"][:6] for m in messages(reader)]
        assert texts == [f"{i:06d}" for i in range(MESSAGES)]
        reader.close()
    assert server.node.statistics().slow_disconnects == 1
    if transport == "chat_socket":
        stats = server.node.chat_socket.statistics()
        # a backlog never outgrows its bound by more than the frame that crossed it
        assert BACKLOG < stats.peak_backlog < BACKLOG + 16 * 1024
        assert stats.slow_closes == 1
    # what the slow client did get is whole frames, then the close code
    assert slow.close_code == 4008
    assert 0 < len(messages(slow)) < MESSAGES
    slow.close()
    await eventually(lambda: server.node.hub.statistics().subscribers == 0)


async def read_when_dropped(server: Server, slow: RawClient) -> None:
    await eventually(lambda: server.node.statistics().slow_disconnects == 1)
    # What the kernel holds for it now goes out in segments as big as loopback's MSS
    # (64 KiB): a receive window below one segment would let them out only at the pace
    # of the sender's zero-window probes (persist timer, backing off to seconds).
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    await slow.read_until(lambda: False)


async def test_partial_writes_never_tear_a_frame(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, rate_limit=0.0))
    url = server.url(transport)
    node = server.node
    sipper = await RawClient.connect(url, "sipper", rcvbuf=2048)
    await sipper.send(type="join", room="flood")
    await sipper.read_until(lambda: sipper.count["joined"] > 0)
    # 900 KB: more than the kernel takes for a reader that waits, less than the backlog
    count = 450
    await publish(url, count, 2000)
    # now sip a few hundred bytes at a time: the server's writes resume mid-frame
    await sipper.read_until(lambda: sipper.count["message"] >= count, 300)
    assert [m["text"][:6] for m in messages(sipper)] == [f"{i:06d}" for i in range(count)]
    if transport == "chat_socket":
        assert node.chat_socket.statistics().partial_writes > 0
    sipper.close()


async def test_keepalive_cuts_silent_clients_and_keeps_answering_ones(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, keepalive_interval=0.05))
    node = server.node
    silent = await RawClient.connect(server.chat_socket_url, "silent")
    silent.answer_pings = False
    lively = await RawClient.connect(server.chat_socket_url, "lively")
    async with trio.open_nursery() as inner:
        # the lively one answers every ping, and stays past the silent one's end
        inner.start_soon(
            lively.read_until, lambda: lively.count["ping"] >= 5 and silent.close_code is not None
        )
        # the silent one is pinged, does not answer, and is cut (its socket sees the end)
        await silent.read_until(lambda: False)
    assert silent.count["ping"] >= 1
    assert silent.close_code == 1006
    assert lively.close_code is None
    assert node.statistics().connections == 1
    silent.close()
    lively.close()


# -- replies bigger than the backlog ---------------------------------------------------------

BIG_COUNT = 200
# 4,000 characters, 8,000 bytes of UTF-8: the page of 200 is 1.6 MB, 25 times the backlog.
BIG_TEXT = "é" * 4000


def fill_big_room(server: Server, room: str = "big") -> list[str]:
    """Store BIG_COUNT messages of BIG_TEXT in ``room``; return their ids, oldest first."""
    node = server.node
    stored = [
        Message(id=node.ids.next_id(1_000 + i), room=room, sender="old", text=BIG_TEXT, ts=0.0)
        for i in range(BIG_COUNT)
    ]
    node.store.write(stored)
    return [m.id for m in stored]


async def test_a_history_page_bigger_than_the_backlog_reaches_a_prompt_reader(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, backlog=BACKLOG))
    ids = fill_big_room(server)
    reader = await RawClient.connect(server.url(transport), "reader", rcvbuf=65536)
    await reader.send(type="history", room="big", limit=BIG_COUNT)
    await reader.read_until(lambda: reader.count["history"] > 0)
    (page,) = [e for e in reader.events if e["type"] == "history"]
    assert [m["id"] for m in page["messages"]] == ids
    assert all(m["text"] == BIG_TEXT for m in page["messages"])
    # still connected, and still served
    await reader.send(type="ping")
    await reader.read_until(lambda: reader.count["pong"] > 0)
    assert reader.close_code is None
    assert server.node.statistics().slow_disconnects == 0
    reader.close()


async def test_a_resume_replay_bigger_than_the_backlog_reaches_a_prompt_reader(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, backlog=BACKLOG))
    ids = fill_big_room(server)
    url = server.url(transport)
    reader = await RawClient.connect(url, "reader", rcvbuf=65536)
    await reader.send(type="join", room="big", since=ids[0])
    await reader.read_until(lambda: reader.count["joined"] > 0)
    assert [m["id"] for m in messages(reader)] == ids[1:]
    # live messages follow the replay: no gap, no duplicate
    await reader.send(type="send", room="big", text="live")
    await reader.read_until(lambda: reader.count["ack"] > 0)
    assert [m["text"] for m in messages(reader)][-2:] == [BIG_TEXT, "live"]
    assert reader.close_code is None
    assert server.node.statistics().slow_disconnects == 0
    reader.close()


async def test_a_slow_client_gets_its_close_frame_behind_a_big_reply(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(
        nursery, make_settings(tmp_path, rate_limit=0.0, backlog=BACKLOG)
    )
    ids = fill_big_room(server)
    url = server.url(transport)
    stalled = await RawClient.connect(url, "stalled", rcvbuf=2048)
    await stalled.send(type="join", room="flood")
    await stalled.read_until(lambda: stalled.count["joined"] > 0)
    # The page goes out as the client reads, which it stops doing: most of the page is
    # still queued when the broadcasts come. Their lag, not the page, closes it.
    await stalled.send(type="history", room="big", limit=BIG_COUNT)
    publisher = await RawClient.connect(url, "publisher", rcvbuf=65536)
    await publisher.send(type="join", room="flood")
    async with trio.open_nursery() as inner:
        inner.start_soon(read_when_dropped, server, stalled)
        # In small windows, each read before the next: the publisher keeps up.
        sent = 0
        while server.node.statistics().slow_disconnects == 0:
            for _ in range(20):
                await publisher.send(type="send", room="flood", text="x" * 200)
            sent += 20
            await publisher.read_until(lambda n=sent: publisher.count["ack"] >= n)
    publisher.close()
    assert stalled.close_code == CLOSE_SLOW
    # the page it asked for came whole before the close frame
    (page,) = [e for e in stalled.events if e["type"] == "history"]
    assert [m["id"] for m in page["messages"]] == ids
    assert server.node.statistics().slow_disconnects == 1
    if transport == "chat_socket":
        # counted once: the close frame queued behind the page did not overflow again
        assert server.node.chat_socket.statistics().slow_closes == 1
    stalled.close()
    await eventually(lambda: server.node.statistics().connections == 0)


async def test_a_close_is_answered_at_once_past_a_backlog(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, rate_limit=0.0))
    url = server.url(transport)
    closer = await RawClient.connect(url, "closer", rcvbuf=2048)
    await closer.send(type="join", room="flood")
    await closer.read_until(lambda: closer.count["joined"] > 0)
    # 900 KB: more than the kernel takes for a reader that waits, less than the backlog
    count = 450
    await publish(url, count, 2000)
    if transport == "chat_socket":
        assert server.node.chat_socket.statistics().backlog_bytes > 0
    await closer._send(CloseConnection(code=1000))
    # the answer comes after what is already on its way, not after the whole backlog
    await closer.read_until(lambda: False)
    assert closer.close_code == 1000
    assert len(messages(closer)) < count
    closer.close()
    await eventually(lambda: server.node.statistics().connections == 0)


async def test_a_close_during_a_replay_the_client_does_not_read_is_answered_at_once(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, backlog=BACKLOG))
    ids = fill_big_room(server)
    closer = await RawClient.connect(server.url(transport), "closer", rcvbuf=2048)
    await closer.send(type="join", room="big", since=ids[0])
    # the replay waits for a client that reads nothing
    if transport == "chat_socket":
        await eventually(lambda: server.node.chat_socket.statistics().backlog_bytes > 0)
    await closer._send(CloseConnection(code=1000))
    await closer.read_until(lambda: False)
    assert closer.close_code == 1000
    # answered behind what the kernel had taken (at most a few hundred KB), not behind
    # the rest of the replay
    assert len(messages(closer)) < BIG_COUNT // 2
    assert closer.count["joined"] == 0
    closer.close()
    await eventually(lambda: server.node.statistics().connections == 0)


async def test_commands_sent_during_a_slowly_read_replay_are_served_after_it(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server: Server = await start_server(nursery, make_settings(tmp_path, backlog=BACKLOG))
    ids = fill_big_room(server)
    client = await RawClient.connect(server.url(transport), "client", rcvbuf=2048)
    await client.send(type="join", room="big", since=ids[0])
    if transport == "chat_socket":
        await eventually(lambda: server.node.chat_socket.statistics().backlog_bytes > 0)
    # read by the connection while the replay waits, served once it is out
    await client.send(type="ping")
    await client.send(type="send", room="big", text="after")
    await client.read_until(lambda: client.count["ack"] > 0)
    kinds = [e["type"] for e in client.events]
    assert kinds[-4:] == ["joined", "pong", "message", "ack"]
    assert [m["id"] for m in messages(client)][:-1] == ids[1:]
    assert client.close_code is None
    client.close()
