"""A cluster of real server processes on one host, over real multicast on loopback.

Network rules: every process here runs the cluster link on interface 127.0.0.1 with TTL 0
(host mode, or LAN mode forced onto loopback), on a cluster port and with a secret of
its own test, so nothing leaves the machine and concurrent tests never hear each other.
Nothing sleeps to wait: tests wait for frames (`Member.wait_for`) or poll ``/metrics``
with deadlines, and every process is killed in a ``finally``.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import pytest
import trio

from _netns import BIN, ChatServer, Member, connect_member, free_port, free_udp_port

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

ROOM = "lobby"
#: Failure detection: dead after 6.5 s of silence, then presence is withdrawn.
DETECT_LIMIT = 10.0


def cluster_env(port: int, secret: str, **more: str) -> dict[str, str]:
    return {
        "TRIO_CHAT_CLUSTER": "host",
        "TRIO_CHAT_CLUSTER_INTERFACE": "127.0.0.1",
        "TRIO_CHAT_CLUSTER_TTL": "0",
        "TRIO_CHAT_CLUSTER_PORT": str(port),
        "TRIO_CHAT_CLUSTER_SECRET": secret,
        **more,
    }


def new_secret() -> str:
    return secrets.token_urlsafe(24)


async def members_on_distinct_nodes(
    nursery: trio.Nursery, server: ChatServer, count: int, limit: float = 15.0
) -> list[Member]:
    """Connect until ``count`` clients sit on ``count`` different workers.

    The chat socket is bound by every worker with SO_REUSEPORT: the kernel picks one of
    the workers already listening per connection (by address hash), so a few connections
    reach them all; a worker still starting is reached once it listens.
    """
    found: dict[str, Member] = {}
    attempts = 0
    with trio.move_on_after(limit):
        while True:
            attempts += 1
            member = await connect_member(nursery, server.host, server.ws_port, f"u{attempts}")
            if member.node not in found:
                found[member.node] = member
                if len(found) == count:
                    return list(found.values())
                continue
            await member.close()
            await trio.sleep(0.01)  # poll interval, bounded by limit
    raise AssertionError(f"{attempts} connections reached only the workers {sorted(found)}")


async def chat_round(members: list[Member], tag: str) -> set[str]:
    """Everyone says one line; everyone gets every line exactly once. Returns the texts."""
    texts = {f"{tag} from {m.name}" for m in members}
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(member.say, ROOM, f"{tag} from {member.name}")
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(member.wait_texts, ROOM, texts)
    return texts


async def all_join(members: list[Member]) -> None:
    """Everyone joins; presence converges to everyone, on every node."""
    for member in members:
        await member.join(ROOM)
    names = {m.name for m in members}
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(member.wait_members, ROOM, names)


def assert_exactly_once(members: list[Member]) -> None:
    """No message id arrived twice at any client, over the whole test."""
    for member in members:
        ids = [m["id"] for m in member.messages(ROOM)]
        assert len(ids) == len(set(ids)), f"{member!r} got duplicates: {member.texts(ROOM)}"


@pytest.mark.timeout(40)
async def test_three_workers_of_one_hypercorn_are_one_chat(tmp_path: Path) -> None:
    server = ChatServer(
        tmp_path / "data",
        tmp_path / "server.log",
        http_port=free_port(),
        ws_port=free_port(),
        workers=3,
        # No secret set: host mode makes a key file in the (fresh) shared data directory,
        # so this test's key is its own too.
        env={
            "TRIO_CHAT_CLUSTER": "host",
            "TRIO_CHAT_CLUSTER_INTERFACE": "127.0.0.1",
            "TRIO_CHAT_CLUSTER_TTL": "0",
            "TRIO_CHAT_CLUSTER_PORT": str(free_udp_port()),
        },
    )
    try:
        await server.start()
        await server.wait_ready()
        async with trio.open_nursery() as nursery:
            members = await members_on_distinct_nodes(nursery, server, 3)
            host_id = (tmp_path / "data" / "node" / "host-id").read_text().strip()
            assert {m.node.rpartition("-")[0] for m in members} == {host_id}
            await all_join(members)
            await chat_round(members, "hello")
            await chat_round(members, "again")
            leaver, *stay = members
            await leaver.close()
            for member in stay:
                await member.wait_members(ROOM, {m.name for m in stay})
            await chat_round(stay, "after")
            assert_exactly_once(members)
            assert "after" not in str(leaver.texts(ROOM))
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()


async def start_all(servers: list[ChatServer]) -> None:
    for server in servers:
        await server.start()
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(server.wait_ready)


def three_servers(tmp_path: Path, env: dict[str, str]) -> list[ChatServer]:
    return [
        ChatServer(
            tmp_path / f"data{i}",
            tmp_path / f"server{i}.log",
            http_port=free_port(),
            ws_port=free_port(),
            env=env,
        )
        for i in range(3)
    ]


async def wait_peers(servers: list[ChatServer], count: int) -> None:
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(server.wait_metric, "trio_chat_cluster_peers", lambda v: v == count)


async def one_member_each_chatting(
    nursery: trio.Nursery, servers: list[ChatServer]
) -> list[Member]:
    """Once the servers see each other: a client on each, all in ROOM, one round of chat."""
    await wait_peers(servers, len(servers) - 1)
    members = [
        await connect_member(nursery, s.host, s.ws_port, f"p{i}") for i, s in enumerate(servers)
    ]
    assert len({m.node for m in members}) == len(servers)
    await all_join(members)
    await chat_round(members, "hello")
    return members


@pytest.mark.timeout(60)
async def test_three_processes_failure_detection_and_restart(tmp_path: Path) -> None:
    servers = three_servers(tmp_path, cluster_env(free_udp_port(), new_secret()))
    try:
        await start_all(servers)
        async with trio.open_nursery() as nursery:
            members = await one_member_each_chatting(nursery, servers)
            *alive, victim = members
            alive_names = {m.name for m in alive}

            # kill -9: no Leave packet; the others must notice the silence.
            killed_at = time.monotonic()
            servers[2].kill9()
            await victim.wait_for(lambda: victim.disconnected, "the connection drop")
            async with trio.open_nursery() as waits:
                for member in alive:
                    waits.start_soon(member.wait_members, ROOM, alive_names, DETECT_LIMIT)
            detected = time.monotonic() - killed_at
            assert detected < DETECT_LIMIT, detected
            await chat_round(alive, "while down")
            await servers[2].stop()

            # Same data directory: same node id, a newer incarnation.
            await servers[2].start()
            await servers[2].wait_ready()
            await wait_peers(servers, 2)
            back = await connect_member(nursery, servers[2].host, servers[2].ws_port, "p2b")
            assert back.node == victim.node
            await back.join(ROOM)
            members = [*alive, back]
            async with trio.open_nursery() as waits:
                for member in members:
                    waits.start_soon(member.wait_members, ROOM, {m.name for m in members})
            await chat_round(members, "back")
            assert_exactly_once(members)
            nursery.cancel_scope.cancel()
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.timeout(45)
async def test_messages_sent_while_a_process_was_down_reach_it(tmp_path: Path) -> None:
    servers = three_servers(tmp_path, cluster_env(free_udp_port(), new_secret()))
    try:
        await start_all(servers)
        async with trio.open_nursery() as nursery:
            members = await one_member_each_chatting(nursery, servers)
            *alive, victim = members
            last_seen = victim.messages(ROOM)[-1]["id"]

            servers[2].kill9()
            await victim.wait_for(lambda: victim.disconnected, "the connection drop")
            await servers[2].stop()
            missed = await chat_round(alive, "while down")
            # Restarted at once, before the others declare it dead: they see a newer
            # incarnation of the same node.
            await servers[2].start()
            await servers[2].wait_ready()
            await wait_peers(servers, 2)

            back = await connect_member(nursery, servers[2].host, servers[2].ws_port, "p2b")
            await back.join(ROOM, since=last_seen)
            # From the replay, or live once the node heals the gap (under a second).
            await back.wait_texts(ROOM, missed, limit=5)
            members = [*alive, back]
            await chat_round(members, "back")
            assert_exactly_once(members)
            nursery.cancel_scope.cancel()
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.timeout(30)
async def test_cluster_check_lists_the_running_peers(tmp_path: Path) -> None:
    env = cluster_env(free_udp_port(), new_secret())
    server = ChatServer(
        tmp_path / "data",
        tmp_path / "server.log",
        http_port=free_port(),
        ws_port=free_port(),
        workers=2,
        env=env,
    )
    try:
        await server.start()
        await server.wait_ready()
        # Whichever worker answers, one peer means both workers are up.
        await server.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        host_id = (tmp_path / "data" / "node" / "host-id").read_text().strip()
        result = await trio.run_process(
            [str(BIN / "trio-chat"), "cluster", "--seconds", "3"],
            env={**server.env},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = result.stdout.decode()
        assert result.returncode == 0, out + result.stderr.decode()
        for slot in (0, 1):
            assert f"{host_id}-{slot} " in out, out
        assert server.http_url in out, out
        assert "loops back on 127.0.0.1" in out, out
        assert "OK: 2 peer(s) seen." in out, out
    finally:
        await server.stop()
