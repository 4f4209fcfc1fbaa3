"""The HTTP side against hostile input, over real sockets: failure boundaries."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from trio_websocket import ConnectionClosed

from trio_chat._session import Session

if TYPE_CHECKING:
    from conftest import Server


async def read_until_closed(client: Any) -> None:
    while True:
        await client.recv()


def samples(metrics: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))


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
