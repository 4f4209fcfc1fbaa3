"""The HTTP side: health, metrics, config for the page, history pages, the page itself."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.utils import LifespanFailureError
from trio_websocket import open_websocket_url

from trio_chat import ChatApp

from _netns import without_worker
from conftest import make_settings

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Server


async def test_healthz_config_and_page(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/healthz")).text == "ok\n"
        config = (await http.get("/api/config", headers={"Host": "localhost:8000"})).json()
        port = server.node.chat_socket_port
        assert config["ws_url"] == f"ws://localhost:{port}/ws"
        assert config["fallback_ws_url"] == "/ws"
        page = await http.get("/")
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        assert (await http.get("/app.js")).status_code == 200
        assert (await http.get("/no-such-file.js")).status_code == 404


async def test_metrics_count_what_happened(server: Server, connect: Any) -> None:
    async with connect(server.chat_socket_url, "alice") as alice:
        await alice.join("general")
        await alice.chat("general", "hello", "c-1")
        await alice.send(type="nonsense")
        await alice.expect("error", code="unknown_type")
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            text = without_worker((await http.get("/metrics")).text)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["trio_chat_connections"] == "1"
    assert samples["trio_chat_rooms"] == "1"
    assert samples["trio_chat_messages_in_total"] == "1"
    assert int(samples["trio_chat_messages_out_total"]) >= 1
    assert samples["trio_chat_store_messages_total"] == "1"
    assert samples['trio_chat_errors_total{code="unknown_type"}'] == "1"
    assert samples["trio_chat_slow_disconnects_total"] == "0"


async def test_history_pages_over_http(server: Server, connect: Any) -> None:
    async with connect(server.chat_socket_url, "alice") as alice:
        await alice.join("general")
        ids = [(await alice.chat("general", f"m{i}", f"c{i}"))["id"] for i in range(5)]
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        newest = (await http.get("/api/rooms/general/messages", params={"limit": 2})).json()
        assert [m["id"] for m in newest["messages"]] == ids[3:]
        assert newest["more"] is True
        older = await http.get(
            "/api/rooms/general/messages", params={"limit": 10, "before": ids[3]}
        )
        assert [m["text"] for m in older.json()["messages"]] == ["m0", "m1", "m2"]
        assert older.json()["more"] is False
        for params, code in [
            ({"limit": 0}, "bad_limit"),
            ({"limit": "many"}, "bad_limit"),
            ({"before": "not-an-id"}, "bad_id"),
        ]:
            response = await http.get("/api/rooms/general/messages", params=params)
            assert response.status_code == 400
            assert response.json()["code"] == code
        bad_room = await http.get("/api/rooms/no%20spaces/messages")
        assert bad_room.json()["code"] == "bad_room"
        unknown = await http.get(
            "/api/rooms/general/messages", params={"before": "00000000000000ff-x"}
        )
        assert unknown.status_code == 404
        assert unknown.json()["code"] == "unknown_id"


async def test_cluster_heal_api_needs_a_signature(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/api/cluster/messages", params={"origin": "x", "after": ""})
        assert response.status_code == 403


async def test_a_store_that_cannot_open_stops_the_server(tmp_path: Path) -> None:
    """Not OSError nor ConfigError: hypercorn must still hear of the failure, not serve on."""
    (tmp_path / "history.sqlite3").write_bytes(b"not a database, " * 512)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    with pytest.RaisesGroup(LifespanFailureError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, ChatApp(make_settings(tmp_path)), config)
            # serving on without the node would never end: the test's bound would fail it
            await trio.sleep_forever()


async def test_a_node_task_that_fails_stops_the_server(tmp_path: Path) -> None:
    """The commit task dies of a bug: the worker stops loudly, it does not limp on.

    (A failing disk is not a bug: the store raises `StoreError` and the node degrades;
    see test_store_faults.py.)
    """
    app = ChatApp(make_settings(tmp_path))
    config = Config()
    config.bind = ["127.0.0.1:0"]

    def buggy_write(messages: object) -> dict[str, str]:
        raise RuntimeError("a bug in the commit path")

    with pytest.RaisesGroup(LifespanFailureError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, app, config)
            assert app.node is not None
            app.node.store.write = buggy_write  # type: ignore[method-assign]
            url = f"ws://127.0.0.1:{app.node.chat_socket_port}/ws?name=alice"
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"type": "join", "room": "r"}))
                await ws.send_message(json.dumps({"type": "send", "room": "r", "text": "hi"}))
                await trio.sleep_forever()
