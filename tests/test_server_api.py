"""The server API (docs/auth.md): publish, delete (tombstones), disconnect, and its key.

A real server in-process on 127.0.0.1 (``start_server``), real HTTP (httpx) and real
chat-socket clients. Across workers and through ``kill -9``: tests/test_server_api_processes.py.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_chat.node._store import MemoryStore, Message, SqliteStore

from conftest import make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server

KEY: Final = "k" * 32
AUTH: Final = {"Authorization": f"Bearer {KEY}"}
ROOM: Final = "general"


@pytest.fixture
async def api_server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    return await start_server(nursery, make_settings(tmp_path, api_key=KEY.encode()))


async def _publish(server: Server, body: dict[str, Any], room: str = ROOM) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        return await http.post(f"/api/rooms/{room}/messages", json=body, headers=AUTH)


async def _delete(server: Server, message_id: str, room: str = ROOM) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        return await http.delete(f"/api/rooms/{room}/messages/{message_id}", headers=AUTH)


async def _stored(server: Server, room: str = ROOM) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        page = (await http.get(f"/api/rooms/{room}/messages")).json()
    messages: list[dict[str, Any]] = page["messages"]
    return messages


async def test_the_api_is_404_without_a_key(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for method, path in [
            ("POST", f"/api/rooms/{ROOM}/messages"),
            ("DELETE", f"/api/rooms/{ROOM}/messages/0000000000000001-n"),
            ("POST", "/api/users/alice/disconnect"),
        ]:
            answer = await http.request(method, path, json={"text": "x"}, headers=AUTH)
            assert answer.status_code == 404, (method, path)
    assert await _stored(server) == []


async def test_a_wrong_or_missing_key_is_refused(api_server: Server) -> None:
    async with httpx.AsyncClient(base_url=api_server.http_url) as http:
        for headers in [{}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}]:
            answer = await http.post(
                f"/api/rooms/{ROOM}/messages", json={"text": "x"}, headers=headers
            )
            assert answer.status_code == 401, headers
            # Its body was not read: the connection is not used again (a publish sent
            # next on it could wait for ever for its body).
            assert answer.headers["connection"] == "close"
            answer = await http.post("/api/users/alice/disconnect", headers=headers)
            assert answer.status_code == 401, headers
    assert await _stored(api_server) == []


async def test_publish_is_acked_after_commit_and_reaches_the_room(
    api_server: Server, connect: Any
) -> None:
    async with connect(api_server.chat_socket_url, "bob") as bob:
        await bob.join(ROOM)
        answer = await _publish(api_server, {"text": "deploy done", "from": "ci"})
        assert answer.status_code == 201
        message_id = answer.json()["id"]
        assert answer.json() == {"id": message_id}
        event = await bob.next_of("message")
        assert (event["id"], event["from"], event["text"]) == (message_id, "ci", "deploy done")
    assert [m["id"] for m in await _stored(api_server)] == [message_id]


async def test_a_cid_retry_is_not_stored_twice(api_server: Server) -> None:
    first = await _publish(api_server, {"text": "once", "cid": "job-1"})
    again = await _publish(api_server, {"text": "once", "cid": "job-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    assert [m["text"] for m in await _stored(api_server)] == ["once"]


@pytest.mark.parametrize(
    ("room", "body", "code"),
    [
        ("no room!", {"text": "x"}, "bad_room"),
        (ROOM, {"text": "   "}, "empty_text"),
        (ROOM, {"text": "x" * 5000}, "text_too_long"),
        (ROOM, {"text": "x", "cid": ""}, "bad_cid"),
        (ROOM, {"text": "x", "from": "a\u200bb"}, "bad_name"),
        (ROOM, {"from": "x"}, "bad_field"),
        (ROOM, [1, 2], "bad_field"),
    ],
)
async def test_bad_input_gets_the_protocols_code(
    api_server: Server, room: str, body: Any, code: str
) -> None:
    answer = await _publish(api_server, body, room)
    assert (answer.status_code, answer.json()["code"]) == (400, code)


async def test_bad_json_and_a_huge_body_are_refused(api_server: Server) -> None:
    async with httpx.AsyncClient(base_url=api_server.http_url) as http:
        path = f"/api/rooms/{ROOM}/messages"
        answer = await http.post(path, content=b"{nope", headers=AUTH)
        assert (answer.status_code, answer.json()["code"]) == (400, "bad_json")
        huge = b'{"text": "' + b"x" * (api_server.node.settings.max_frame + 1) + b'"}'
        answer = await http.post(path, content=huge, headers=AUTH)
        assert answer.status_code == 413
    assert await _stored(api_server) == []


async def test_delete_tells_the_room_and_leaves_a_tombstone(
    api_server: Server, connect: Any
) -> None:
    kept = (await _publish(api_server, {"text": "keep"})).json()["id"]
    gone = (await _publish(api_server, {"text": "secret", "cid": "c1"})).json()["id"]
    async with connect(api_server.chat_socket_url, "bob") as bob:
        await bob.join(ROOM)
        answer = await _delete(api_server, gone)
        assert answer.status_code == 204
        assert await bob.next_of("deleted") == {"type": "deleted", "room": ROOM, "id": gone}
        # The second delete is a no-op: the same answer, and nothing sent again.
        assert (await _delete(api_server, gone)).status_code == 204
        await bob.send(type="ping")
        assert (await bob.recv())["type"] == "pong"
    stored = await _stored(api_server)
    assert stored[0]["text"] == "keep"
    assert stored[1] == {
        "type": "message",
        "room": ROOM,
        "id": gone,
        "from": "server",
        "ts": stored[1]["ts"],
        "deleted": True,
    }
    async with connect(api_server.chat_socket_url, "carol") as carol:
        replay, _ = await carol.join(ROOM, since=kept)
        assert [(m["id"], m.get("deleted"), "text" in m) for m in replay] == [(gone, True, False)]


async def test_delete_of_an_unknown_id_or_a_bad_id(api_server: Server) -> None:
    answer = await _delete(api_server, "0000000000000001-nobody")
    assert (answer.status_code, answer.json()["code"]) == (404, "unknown_id")
    answer = await _delete(api_server, "not-an-id")
    assert (answer.status_code, answer.json()["code"]) == (400, "bad_id")
    message_id = (await _publish(api_server, {"text": "x"}, "other")).json()["id"]
    answer = await _delete(api_server, message_id)
    assert answer.status_code == 404, "a message of another room is not this room's"


async def test_a_tombstone_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_key=KEY.encode())
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, settings)
        gone = (await _publish(first, {"text": "secret"})).json()["id"]
        assert (await _delete(first, gone)).status_code == 204
        first.shutdown.set()
    async with trio.open_nursery() as nursery:
        second = await start_server(nursery, settings)
        assert [(m["id"], m.get("deleted")) for m in await _stored(second)] == [(gone, True)]
        assert (await _delete(second, gone)).status_code == 204
        second.shutdown.set()


async def test_disconnect_closes_every_connection_of_the_user(
    api_server: Server, connect: Any
) -> None:
    async with (
        connect(api_server.chat_socket_url, "alice") as alice,
        connect(api_server.fallback_url, "bob") as bob,
    ):
        async with httpx.AsyncClient(base_url=api_server.http_url) as http:
            answer = await http.post("/api/users/alice/disconnect", headers=AUTH)
        assert (answer.status_code, answer.json()) == (200, {"closed": 1})
        with pytest.raises(ConnectionClosed):
            await alice.recv()
        assert alice.ws.closed is not None
        assert (alice.ws.closed.code, alice.ws.closed.reason) == (
            4003,
            "disconnected by the server",
        )
        await bob.send(type="ping")
        assert (await bob.next_of("pong"))["type"] == "pong"


async def test_nobody_deletes_over_the_socket_in_open_mode(
    api_server: Server, connect: Any
) -> None:
    # An admin token's delete is in tests/test_auth.py.
    message_id = (await _publish(api_server, {"text": "spam"})).json()["id"]
    async with connect(api_server.chat_socket_url, "mod") as mod:
        await mod.join(ROOM)
        await mod.send(type="delete", room=ROOM, id=message_id)
        assert (await mod.next_of("error"))["code"] == "forbidden"
    assert [m["text"] for m in await _stored(api_server)] == ["spam"]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_tombstone_may_come_before_its_message(kind: str, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3") if kind == "sqlite" else MemoryStore()
    message = Message(id="0000000000000001-n", room=ROOM, sender="a", text="t", ts=0.0)
    try:
        assert store.tombstone(ROOM, message.id)
        assert not store.tombstone(ROOM, message.id)
        store.write([message])
        assert [(m.deleted, m.text) for m in store.latest(ROOM, 5)] == [(True, "")]
        assert [m.deleted for m in store.from_origin("n", "", 5)] == [True]
    finally:
        store.close()


def test_a_file_from_before_tombstones_gets_its_table(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE messages (id TEXT PRIMARY KEY, room TEXT NOT NULL, sender TEXT NOT NULL,"
        " text TEXT NOT NULL, ts REAL NOT NULL, cid TEXT, dedupe TEXT, origin TEXT NOT NULL)"
        " WITHOUT ROWID;"
        "INSERT INTO messages VALUES ('0000000000000001-n', 'general', 'a', 'hi', 0, NULL,"
        " NULL, 'n');"
    )
    old.close()
    store = SqliteStore(path)
    try:
        assert [m.deleted for m in store.latest(ROOM, 5)] == [False]
        assert store.tombstone(ROOM, "0000000000000001-n")
        assert [(m.deleted, m.text) for m in store.latest(ROOM, 5)] == [(True, "")]
    finally:
        store.close()
