"""The server API on ``trio-chat serve --workers 2`` (a host cluster on loopback).

Publish, delete and disconnect reach the clients of both workers, whichever worker the
HTTP call landed on; a tombstone survives ``kill -9`` of every process and shows in a
resume on both workers. Each test has its own cluster port and secret (TTL 0, 127.0.0.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio
from test_cluster_processes import cluster_env, new_secret

from _netns import Member, connect_member
from _server_process import ServerProcess, free_udp_port

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

KEY: Final = "backend-key-0123456789"
AUTH: Final = {"Authorization": f"Bearer {KEY}"}
ROOM: Final = "lobby"


async def _on_both_workers(nursery: trio.Nursery, server: ServerProcess, name: str) -> list[Member]:
    """One client called ``name`` on each of the two workers (names are unique per node)."""
    found: dict[str, Member] = {}
    with trio.fail_after(15):
        while len(found) < 2:
            member = await connect_member(nursery, server.host, server.ws_port, name)
            if member.node in found:
                await member.close()
                await trio.sleep(0.01)  # poll interval: the kernel picks the worker
            else:
                assert member.name == name, member
                found[member.node] = member
    return list(found.values())


def _deleted_event(member: Member, message_id: str) -> bool:
    return any(e["type"] == "deleted" and e["id"] == message_id for e in member.events)


@pytest.mark.timeout(90)
async def test_publish_delete_and_disconnect_across_workers(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        workers=2,
        cli=True,
        env=cluster_env(free_udp_port(), new_secret(), TRIO_CHAT_API_KEY=KEY),
    )
    try:
        await server.start()
        await server.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        async with httpx.AsyncClient(base_url=server.http_url) as http, trio.open_nursery() as n:
            members = await _on_both_workers(n, server, "alice")
            for member in members:
                await member.join(ROOM)

            async def publish(body: dict[str, Any]) -> dict[str, Any]:
                answer = await http.post(f"/api/rooms/{ROOM}/messages", json=body, headers=AUTH)
                assert answer.status_code == 201, answer.text
                result: dict[str, Any] = answer.json()
                return result

            wrong = await http.post(
                f"/api/rooms/{ROOM}/messages", json={"text": "x"}, headers={"Authorization": "x"}
            )
            assert wrong.status_code == 401
            before = (await publish({"text": "before", "from": "bot"}))["id"]
            secret = (await publish({"text": "secret", "cid": "job-7"}))["id"]
            assert await publish({"text": "secret", "cid": "job-7"}) == {
                "id": secret,
                "duplicate": True,
            }
            for member in members:
                await member.wait_texts(ROOM, {"before", "secret"})
            assert [m["text"] for m in server.stored(ROOM)] == ["before", "secret"]

            answer = await http.delete(f"/api/rooms/{ROOM}/messages/{secret}", headers=AUTH)
            assert answer.status_code == 204
            for member in members:
                await member.wait_for(lambda m=member: _deleted_event(m, secret), "deleted")

            answer = await http.post("/api/users/alice/disconnect", headers=AUTH)
            assert (answer.status_code, answer.json()) == (200, {"closed": 1})
            for member in members:
                await member.wait_for(lambda m=member: m.disconnected, "the close")
                closed = member.client.ws.closed
                assert closed is not None
                assert (closed.code, closed.reason) == (4003, "disconnected by the server")
                await member.close()

        await server.kill()
        await server.start()
        await server.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        async with trio.open_nursery() as nursery:
            for member in await _on_both_workers(nursery, server, "bob"):
                await member.join(ROOM, since=before)
                (replayed,) = member.messages(ROOM)
                assert (replayed["id"], replayed.get("deleted")) == (secret, True), member
                assert "text" not in replayed
                await member.close()
    finally:
        await server.kill()
