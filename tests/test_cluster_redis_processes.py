"""Three real server processes through one real redis-server: delivery, `kill -9`, catch-up.

Each server is ``hypercorn trio_chat:app`` with its own data dir and ``TRIO_CHAT_CLUSTER=
redis``; redis-server runs on a free port in the test's temporary directory with AOF on
(tests/test_cluster_redis.py's fixture). Nothing sleeps to wait: members wait for frames,
the restarted node's history is polled with a deadline.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from test_cluster_redis import RedisServer, redis_aof

from _netns import Member, connect_member, metric
from _server_process import BIN, ServerProcess, free_port

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("redis_aof")]
__all__ = ["redis_aof"]

ROOM = "lobby"
#: The issue's bound: a killed node's members leave everywhere within this.
LEAVE_LIMIT = 10.0
# Three servers starting on a shared 2-core machine, then their keys seen by all.
STARTUP = 30.0


def redis_servers(tmp_path: Path, redis: RedisServer) -> list[ServerProcess]:
    secret = secrets.token_urlsafe(24)
    env = {
        "TRIO_CHAT_CLUSTER": "redis",
        "TRIO_CHAT_REDIS_URL": redis.url,
        "TRIO_CHAT_CLUSTER_SECRET": secret,
    }
    return [ServerProcess(tmp_path / name, tmp_path / f"{name}.log", env=env) for name in "abc"]


async def within(limit: float, predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (it asks a server over HTTP) until it holds, for ``limit`` s."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (state in another process: no event)
            await trio.sleep(0.05)


def redis_peers(server: ServerProcess) -> float:
    value = metric(httpx.get(server.http_url + "/metrics").text, "trio_chat_cluster_peers")
    assert value is not None
    return value


@pytest.mark.timeout(120)
async def test_three_processes_deliver_once_and_a_killed_node_leaves_and_catches_up(
    redis_aof: RedisServer, tmp_path: Path
) -> None:
    servers = redis_servers(tmp_path, redis_aof)
    try:
        for server in servers:
            await server.start()
        # Each heartbeat (2 s) sees the keys of servers started since.
        await within(STARTUP, lambda: all(redis_peers(s) == 2 for s in servers))
        # The command an operator runs, with a server's own settings.
        result = await trio.run_process(
            [str(BIN / "trio-chat"), "cluster"],
            env=servers[0].env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        report = result.stdout.decode()
        assert result.returncode == 0, report + result.stderr.decode()
        assert f"Redis at {redis_aof.url} (TRIO_CHAT_REDIS_URL)" in report, report
        assert "connected; stream trio-chat:messages" in report, report
        for server in servers:
            assert f"HTTP {server.http_url}, key expires in" in report, report
        async with trio.open_nursery() as nursery:
            members: list[Member] = [
                await connect_member(nursery, "127.0.0.1", s.ws_port, f"user-{n}")
                for s, n in zip(servers, "abc", strict=True)
            ]
            for member in members:
                await member.join(ROOM)
            names = {m.name for m in members}
            for member in members:
                await member.wait_for(lambda m=member: m.members(ROOM) == names, "everyone")
            sent = [f"{m.name} {i}" for i in range(5) for m in members]
            for i in range(5):
                for member in members:
                    await member.say(ROOM, f"{member.name} {i}")
            for member in members:
                await member.wait_for(
                    lambda m=member: set(m.texts(ROOM)) == set(sent), "every message"
                )
            for member in members:
                assert all(n == 1 for n in member.texts(ROOM).values()), member.texts(ROOM)
                for sender in names:
                    mine = [
                        t
                        for t in (x["text"] for x in member.messages(ROOM))
                        if t.startswith(sender + " ")
                    ]
                    assert mine == [f"{sender} {i}" for i in range(5)]
            a, b, c = members
            killed = time.monotonic()
            # SIGKILL to the group: no goodbye reaches Redis or a peer.
            await servers[2].kill()
            for member in (a, b):
                await member.wait_for(
                    lambda m=member: c.name not in m.members(ROOM), "c leave", LEAVE_LIMIT
                )
            assert time.monotonic() - killed < LEAVE_LIMIT
            missed = [f"{m.name} missed {i}" for i in range(5) for m in (a, b)]
            for i in range(5):
                for member in (a, b):
                    await member.say(ROOM, f"{member.name} missed {i}")
            await servers[2].start()
            expected = sorted(sent + missed)
            await within(STARTUP, lambda: sorted(servers[2].stored_texts(ROOM)) == expected)
            nursery.cancel_scope.cancel()
    finally:
        for server in servers:
            await server.kill()


async def test_a_bad_redis_url_stops_serve_with_one_line_naming_the_variable(
    tmp_path: Path,
) -> None:
    """Before any start (no worker to restart in a loop), and without the password."""
    env = {
        **os.environ,
        "TRIO_CHAT_DATA_DIR": str(tmp_path / "data"),
        "TRIO_CHAT_CLUSTER": "redis",
        "TRIO_CHAT_REDIS_URL": "redis://:hunter2-secret@127.0.0.1:99999/0",
        "TRIO_CHAT_CLUSTER_SECRET": secrets.token_urlsafe(24),
    }
    with trio.fail_after(STARTUP):
        result = await trio.run_process(
            [str(BIN / "trio-chat"), "serve", "--bind", f"127.0.0.1:{free_port()}"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.startswith("trio-chat: TRIO_CHAT_REDIS_URL="), stderr
    assert stderr.count("\n") == 1, stderr
    assert "hunter2-secret" not in stderr, stderr
    assert not result.stdout
