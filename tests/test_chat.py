"""End to end through a real server on 127.0.0.1, over the chat socket and over /ws."""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.parse
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from _netns import without_worker
from _server_process import free_udp_port
from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server


async def test_welcome_join_members_and_presence(
    server: Server, transport: str, connect: Any
) -> None:
    url = server.url(transport)
    async with connect(url, "alice") as alice:
        assert alice.welcome == {"type": "welcome", "name": "alice", "node": server.node.node_id}
        _, joined = await alice.join("general")
        assert joined["members"] == ["alice"]
        async with connect(url, "bob") as bob:
            _, joined = await bob.join("general")
            assert joined["members"] == ["alice", "bob"]
            await alice.expect("presence", room="general", joined="bob")
            await bob.send(type="leave", room="general")
            await bob.expect("left", room="general")
            await alice.expect("presence", room="general", left="bob")
            await bob.join("general")
            await alice.expect("presence", joined="bob")
        # bob disconnected without leaving
        await alice.expect("presence", room="general", left="bob")


async def test_a_room_over_the_name_limit_gets_head_counts_and_its_list_back_when_small(
    nursery: trio.Nursery, tmp_path: Path, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, presence_names_max=2))
    url = server.url("chat")
    async with connect(url, "alice") as alice, connect(url, "bob") as bob:
        await alice.join("general")
        _, joined = await bob.join("general")
        assert (joined["members"], joined["count"]) == (["alice", "bob"], 2)
        await alice.expect("presence", joined="bob")
        async with connect(url, "carol") as carol:
            _, joined = await carol.join("general")
            assert (joined["members"], joined["count"]) == ([], 3)
            # No presence event for carol: a head count instead.
            assert await alice.recv() == {"type": "members", "room": "general", "count": 3}
        # carol is gone: 2 is over half the limit, so a count still.
        assert await alice.recv() == {"type": "members", "room": "general", "count": 2}
        await bob.send(type="leave", room="general")
        # Half the limit: the whole list, then presence as before.
        assert await alice.recv() == {
            "type": "members",
            "room": "general",
            "count": 1,
            "names": ["alice"],
        }
        await alice.expect("presence", left="bob")
        await bob.send(type="join", room="general")
        joined = await bob.next_of("joined")  # past the counts bob got while in the room
        assert (joined["members"], joined["count"]) == (["alice", "bob"], 2)
        await alice.expect("presence", joined="bob")


async def test_broadcast_reaches_the_room_and_no_one_else(
    server: Server, transport: str, connect: Any
) -> None:
    url = server.url(transport)
    async with (
        connect(url, "alice") as alice,
        connect(url, "bob") as bob,
        connect(url, "carol") as carol,
    ):
        await alice.join("general")
        await bob.join("general")
        await carol.join("random")
        await alice.next_of("presence")
        await alice.send(type="send", room="general", text="hi all", cid="c-1")
        mine = await alice.expect("message", room="general", text="hi all", cid="c-1")
        assert mine["from"] == "alice"
        ack = await alice.expect("ack", cid="c-1")
        assert ack["id"] == mine["id"]
        theirs = await bob.expect("message", text="hi all")
        assert theirs == mine
        # carol is in another room: the next thing she sees is her own room's traffic
        await bob.send(type="join", room="random")
        await carol.expect("presence", room="random", joined="bob")


async def test_typing_goes_to_the_others_only(server: Server, transport: str, connect: Any) -> None:
    url = server.url(transport)
    async with connect(url, "alice") as alice, connect(url, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        await alice.next_of("presence")
        await alice.send(type="typing", room="general")
        await bob.expect("typing", room="general", **{"from": "alice"})
        await alice.send(type="ping")
        await alice.expect("pong")  # not her own typing event


async def test_duplicate_and_bad_nicknames(server: Server, transport: str, connect: Any) -> None:
    url = server.url(transport)
    async with connect(url, "alice") as a1, connect(url, "alice") as a2:
        assert a1.welcome["name"] == "alice"
        assert a2.welcome["name"] == "alice-2"
        await a2.send(type="hello", name="alice")
        await a2.expect("welcome", name="alice-2")
        await a2.send(type="hello", name="zed")
        await a2.expect("welcome", name="zed")
    async with connect(url, "<b>x</b>") as bad:
        assert bad.welcome["name"] == "guest"
        await bad.expect("error", code="bad_name")
        await bad.send(type="hello", name="with space")
        await bad.expect("error", code="bad_name")


@pytest.mark.parametrize(
    "raw", ["alice\n", "\u3164", "\u115f", "bob\u3164", "\uffa0x", "a\u200db", "\u202ebob"]
)
async def test_invisible_and_control_characters_in_names_are_refused(
    server: Server, transport: str, connect: Any, raw: str
) -> None:
    async with connect(server.url(transport), raw) as client:
        assert client.welcome["name"] == "guest"
        await client.expect("error", code="bad_name")
        await client.send(type="hello", name=raw)
        await client.expect("error", code="bad_name")
        await client.send(type="hello", name="visible")
        await client.expect("welcome", name="visible")


async def test_a_name_that_looks_like_one_in_use_is_taken(
    server: Server, transport: str, connect: Any
) -> None:
    url = server.url(transport)
    fullwidth = "\uff41\uff4c\uff49\uff43\uff45"  # NFKC: alice
    async with connect(url, "alice") as alice:
        assert alice.welcome["name"] == "alice"
        async with connect(url, "\u0430lice") as fake:  # a Cyrillic a
            assert fake.welcome["name"] == "\u0430lice-2"
            await fake.send(type="hello", name="alic\u0435")  # a Cyrillic e
            await fake.expect("welcome", name="alic\u0435-2")
            await fake.send(type="hello", name=fullwidth)
            await fake.expect("welcome", name="alice-2")
    async with connect(url, fullwidth) as alice:  # alice is free again
        assert alice.welcome["name"] == "alice"


async def test_a_name_in_a_room_on_another_node_is_taken(
    tmp_path: Any, nursery: trio.Nursery, connect: Any
) -> None:
    cluster = {
        "cluster": "host",
        "cluster_port": free_udp_port(),
        "cluster_secret": secrets.token_bytes(32),
    }
    one = await start_server(nursery, make_settings(tmp_path / "one", **cluster))
    two = await start_server(nursery, make_settings(tmp_path / "two", **cluster))
    async with connect(one.chat_socket_url, "alice") as alice:
        await alice.join("general")
        await eventually(lambda: "alice" in two.node.presence.remote_names())
        async with (
            connect(two.chat_socket_url, "alice") as second,
            connect(two.fallback_url, "\u0430lice") as fake,
        ):
            assert second.welcome["name"] == "alice-2"
            # and a suffixed name is compared by its skeleton too
            assert fake.welcome["name"] == "\u0430lice-3"
    # alice left: her name is free on the other node once it hears so
    await eventually(lambda: not two.node.presence.remote_names())
    async with connect(two.chat_socket_url, "alice") as alice:
        assert alice.welcome["name"] == "alice"


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type":"fly"}', "unknown_type"),
        ('{"type":"join"}', "bad_field"),
        ('{"type":"join","room":"no spaces"}', "bad_room"),
        ('{"type":"send","room":"general","text":"hi"}', "not_joined"),
        ('{"type":"typing","room":"general"}', "not_joined"),
        ('{"type":"leave","room":"general"}', "not_joined"),
        ('{"type":"history","room":"general","limit":5000}', "bad_limit"),
        ('{"type":"history","room":"general","before":"00000000000000ff-x"}', "unknown_id"),
    ],
)
async def test_bad_commands_get_error_frames(
    server: Server, transport: str, connect: Any, command: str, code: str
) -> None:
    async with connect(server.url(transport), "alice") as alice:
        await alice.ws.send_message(command)
        error = await alice.expect("error", code=code)
        assert error["message"]
        # the connection is still fine
        await alice.send(type="ping")
        await alice.expect("pong")
    assert server.node.statistics().errors[code] == 1


async def test_a_deeply_nested_frame_is_bad_json_and_harms_no_one(
    server: Server, transport: str, connect: Any
) -> None:
    # 2 KB that made msgspec raise RecursionError, which stopped the whole worker.
    frame = '{"type":"ping","x":' + "[" * 1000 + "]" * 1000 + "}"
    url = server.url(transport)
    async with connect(url, "alice") as alice:
        await alice.ws.send_message(frame)
        await alice.expect("error", code="bad_json")
        await alice.send(type="ping")
        await alice.expect("pong")
        async with connect(url, "bob") as bob:
            await bob.send(type="ping")
            await bob.expect("pong")
    assert server.node.statistics().errors["bad_json"] == 1
    assert not server.node.failures.statistics().contained


async def test_refused_frames_log_one_line_per_connection(
    server: Server, transport: str, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_chat")
    url = server.url(transport)
    async with connect(url, "alice") as alice, connect(url, "bob") as bob:
        for client in (alice, bob):
            # within the burst, so every one is refused for what it is
            for _ in range(15):
                await client.ws.send_message("{not json")
            for _ in range(15):
                await client.expect("error", code="bad_json")
    refusals = [r for r in caplog.records if r.name == "trio_chat.session"]
    assert len([r for r in refusals if r.levelno >= logging.INFO]) == 2
    assert len([r for r in refusals if r.levelno == logging.DEBUG]) == 28
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        metrics = without_worker((await http.get("/metrics")).text)
    assert 'trio_chat_errors_total{code="bad_json"} 30' in metrics.splitlines()


async def test_text_rules(server: Server, transport: str, connect: Any) -> None:
    async with connect(server.url(transport), "alice") as alice:
        await alice.join("general")
        await alice.send(type="send", room="general", text="   ", cid="c-9")
        # errors name the room and cid of what they refuse
        await alice.expect("error", code="empty_text", room="general", cid="c-9")
        await alice.send(type="send", room="general", text="x" * 4001)
        await alice.expect("error", code="text_too_long")
        await alice.send(type="send", room="general", text="x" * 4000)
        await alice.expect("message")


async def test_joined_says_whether_older_history_exists(
    tmp_path: Any, nursery: trio.Nursery, transport: str, connect: Any
) -> None:
    settings = make_settings(tmp_path, history_on_join=3, rate_limit=0.0)
    url = (await start_server(nursery, settings)).url(transport)

    async def join(**extra: Any) -> tuple[list[str], bool]:
        async with connect(url, "bob") as bob:
            replay, joined = await bob.join("general", **extra)
            return [m["text"] for m in replay], joined["more"]

    assert await join() == ([], False)  # an empty room
    async with connect(url, "alice") as alice:
        await alice.join("general")
        ids = [(await alice.chat("general", f"m{n}"))["id"] for n in range(3)]
        assert await join() == (["m0", "m1", "m2"], False)  # exactly one join's worth
        ids.append((await alice.chat("general", "m3"))["id"])
    assert await join() == (["m1", "m2", "m3"], True)
    # A resume replays what is newer than `since`, which is itself older history.
    assert await join(since=ids[1]) == (["m2", "m3"], True)
    assert await join(since=ids[-1]) == ([], True)
    assert await join(since="0000000000000001-nobody") == (["m1", "m2", "m3"], True)  # reset


async def test_a_join_that_replays_nothing_still_says_whether_history_exists(
    tmp_path: Any, nursery: trio.Nursery, connect: Any
) -> None:
    url = (await start_server(nursery, make_settings(tmp_path, history_on_join=0))).chat_socket_url
    async with connect(url, "alice") as alice:
        replay, joined = await alice.join("general")
        assert (replay, joined["more"]) == ([], False)
        await alice.chat("general", "m0")
        async with connect(url, "bob") as bob:
            replay, joined = await bob.join("general")
            assert (replay, joined["more"]) == ([], True)


async def test_join_twice_and_too_many_rooms(
    tmp_path: Any, nursery: trio.Nursery, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, max_rooms=2))
    async with connect(server.chat_socket_url, "alice") as alice:
        await alice.join("a")
        await alice.send(type="join", room="a")
        await alice.expect("error", code="already_joined")
        await alice.join("b")
        await alice.send(type="join", room="c")
        await alice.expect("error", code="too_many_rooms")


async def test_oversized_frame_closes_1009(server: Server, transport: str, connect: Any) -> None:
    async with connect(server.url(transport), "alice") as alice:
        await alice.ws.send_message(json.dumps({"type": "ping", "pad": "x" * 17000}))
        await alice.expect("error", code="too_big")
        with pytest.raises(ConnectionClosed):
            await alice.recv()
        assert alice.ws.closed is not None
        assert alice.ws.closed.code == 1009


async def test_binary_frame_closes_1003(server: Server, transport: str, connect: Any) -> None:
    async with connect(server.url(transport), "alice") as alice:
        await alice.ws.send_message(b"\x00\x01")
        await alice.expect("error", code="binary_unsupported")
        with pytest.raises(ConnectionClosed):
            await alice.recv()
        assert alice.ws.closed is not None
        assert alice.ws.closed.code == 1003


async def test_flood_is_rate_limited_then_closed(
    nursery: trio.Nursery, tmp_path: Path, transport: str, connect: Any
) -> None:
    # A burst of 20 that refills one frame in 1000 s: none within the test, so the
    # counts are exact on any machine (the real clock runs; the test's bound holds).
    settings = make_settings(tmp_path, rate_limit=0.001, rate_burst=20, rate_strikes=20)
    server = await start_server(nursery, settings)
    async with connect(server.url(transport), "alice") as alice:
        for _ in range(25):
            await alice.send(type="ping")
        codes = [(await alice.recv()).get("code", "pong") for _ in range(25)]
        assert codes == ["pong"] * 20 + ["rate_limited"] * 5
        # keep flooding, one frame per answer (so the server never closes with unread
        # data, which TCP would turn into a reset): after 20 refusals in a row, 1008
        with pytest.raises(ConnectionClosed):
            await ping_until_closed(alice)
        assert alice.ws.closed is not None
        assert alice.ws.closed.code == 1008
    # 5 above, then 15 more: the 20th refusal in a row closes.
    assert server.node.statistics().errors["rate_limited"] == 20


async def ping_until_closed(client: Any) -> None:
    while True:
        await client.send(type="ping")
        await client.recv()


async def refused_status(url: str, origin: str) -> int:
    """Open a WebSocket by hand with an Origin header; return the refusal's HTTP status."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        response = b""
        # a refusal ends the connection: read to the end, so the server closes first
        while chunk := await stream.receive_some(1024):
            response += chunk
        return int(response.split(b" ", 2)[1])


async def test_foreign_origin_is_refused(server: Server, transport: str, connect: Any) -> None:
    url = server.url(transport)
    assert await refused_status(url, "http://evil.example") == 403
    assert server.node.statistics().errors["origin_refused"] == 1
    # the page's own origin (same host, the page's port) is allowed on both sockets
    async with connect(
        url, "alice", extra_headers=[(b"Origin", server.http_url.encode())]
    ) as alice:
        assert alice.welcome["name"] == "alice"


async def test_listed_origin_is_allowed(tmp_path: Any, nursery: trio.Nursery) -> None:
    server = await start_server(
        nursery, make_settings(tmp_path, allowed_origins=frozenset({"https://chat.example.com"}))
    )
    headers = [(b"Origin", b"https://chat.example.com")]
    async with open_websocket_url(server.chat_socket_url, extra_headers=headers) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"


async def test_nothing_of_a_client_remains_after_it_goes(
    server: Server, transport: str, connect: Any
) -> None:
    url = server.url(transport)
    node = server.node
    fds = len(os.listdir("/proc/self/fd"))
    async with connect(url, "watcher") as watcher:
        await watcher.join("general")
        async with connect(url, "clean") as clean:
            await clean.join("general")
            await clean.join("other")
        await watcher.expect("presence", joined="clean")
        await watcher.expect("presence", left="clean")
        # an abrupt disconnect: the TCP connection just goes away
        async with connect(url, "abrupt") as abrupt:
            await abrupt.join("general")
            await watcher.expect("presence", joined="abrupt")
            await abrupt.ws._stream.aclose()
        await watcher.expect("presence", left="abrupt")
        stats = node.hub.statistics()
        assert stats.subscribers == 1
        assert stats.subscriptions == 1
        assert node.statistics().connections == 1
    await eventually(
        lambda: not node.statistics().connections and not node.hub.statistics().subscriptions
    )
    assert not node.chat_socket.connections
    if transport == "chat_socket":
        # every socket of the four connections was closed, not left to the collector
        await eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds)
