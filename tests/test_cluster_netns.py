"""A simulated LAN: three hosts (network namespaces) on a bridge, one server on each.

Network rules: the LAN is made of namespaces only (see `_netns.Lan`): the bridge lives in
a namespace of its own, so the root namespace gets no interface, address or route, and
no datagram can leave the machine. The servers run in LAN mode (TTL 1) on their
``lan0`` address with a secret and a cluster port of this test.

Needs root and iproute2; skipped otherwise, except under CI (which runs as root), where
a missing capability is a failure.
"""

from __future__ import annotations

import secrets
import signal
from typing import TYPE_CHECKING

import pytest
import trio

from _netns import Lan, Member, connect_member, made_lan, metric
from _server_process import ServerProcess, free_udp_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

ROOM = "lan"
HTTP_PORT = 8000  # Each host is a namespace of its own: fixed ports cannot collide.
WS_PORT = 8001
#: A cut longer than failure detection (dead after 6.5 s): peers are declared dead and
#: come back with the same incarnation, a healed partition.
DETECT_LIMIT = 10.0


@pytest.fixture
def lan() -> Iterator[Lan]:
    with made_lan(3) as lan:
        yield lan


async def say_all(members: list[Member], tag: str) -> set[str]:
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(member.say, ROOM, f"{tag} from {member.name}")
    return {f"{tag} from {m.name}" for m in members}


async def all_receive(members: list[Member], texts: set[str], limit: float = 10.0) -> None:
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(member.wait_texts, ROOM, texts, limit)


@pytest.mark.timeout(60)
async def test_three_hosts_chat_and_a_cut_off_host_catches_up(lan: Lan, tmp_path: Path) -> None:
    env = {
        "TRIO_CHAT_CLUSTER": "lan",
        "TRIO_CHAT_CLUSTER_TTL": "1",
        "TRIO_CHAT_CLUSTER_PORT": str(free_udp_port()),
        "TRIO_CHAT_CLUSTER_SECRET": secrets.token_urlsafe(24),
    }
    servers = [
        ServerProcess(
            tmp_path / f"data{i}",
            tmp_path / f"host{i}.log",
            host=lan.address(i),
            http_port=HTTP_PORT,
            ws_port=WS_PORT,
            env={**env, "TRIO_CHAT_CLUSTER_INTERFACE": lan.address(i)},
            netns=ns,
        )
        for i, ns in enumerate(lan.hosts)
    ]
    try:
        for server in servers:
            await server.spawn()
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(server.wait_ready)
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(server.wait_metric, "trio_chat_cluster_peers", lambda v: v == 2)
        async with trio.open_nursery() as nursery:
            members = [
                await connect_member(nursery, s.host, s.ws_port, f"h{i}", s.netns)
                for i, s in enumerate(servers)
            ]
            for member in members:
                await member.join(ROOM)
            everyone = {m.name for m in members}
            for member in members:
                await member.wait_members(ROOM, everyone)
            await all_receive(members, await say_all(members, "hello"))

            # Host 2's cable is pulled: it keeps its clients but hears nobody.
            *rest, cut = members

            # A short cut: nobody is even suspected; NAKs and repairs fill the holes.
            await lan.set_link(2, up=False)
            brief = await say_all(members, "brief cut")
            await all_receive(rest, brief - {f"brief cut from {cut.name}"})
            await lan.set_link(2, up=True)
            await all_receive(members, brief)
            assert metric(await servers[2].metrics(), "trio_chat_cluster_naks_sent")

            # A long cut: both sides declare the other dead, then the partition heals.
            await lan.set_link(2, up=False)
            during = await say_all(members, "during the cut")
            await all_receive(rest, during - {f"during the cut from {cut.name}"})
            for member in rest:
                await member.wait_members(ROOM, {m.name for m in rest}, DETECT_LIMIT)
            await cut.wait_members(ROOM, {cut.name}, DETECT_LIMIT)
            await lan.set_link(2, up=True)
            for member in members:
                await member.wait_members(ROOM, everyone)
            await all_receive(members, during)

            await all_receive(members, await say_all(members, "after"))
            for member in members:
                ids = [m["id"] for m in member.messages(ROOM)]
                assert len(ids) == len(set(ids)), member.texts(ROOM)
            nursery.cancel_scope.cancel()
    finally:
        for server in servers:
            await server.kill()


@pytest.mark.timeout(45)
async def test_a_client_that_moves_before_its_host_is_declared_dead_keeps_its_name(
    lan: Lan, tmp_path: Path
) -> None:
    env = {
        "TRIO_CHAT_CLUSTER": "lan",
        "TRIO_CHAT_CLUSTER_TTL": "1",
        "TRIO_CHAT_CLUSTER_PORT": str(free_udp_port()),
        "TRIO_CHAT_CLUSTER_SECRET": secrets.token_urlsafe(24),
    }
    victim, survivor = servers = [
        ServerProcess(
            tmp_path / f"data{i}",
            tmp_path / f"host{i}.log",
            host=lan.address(i),
            http_port=HTTP_PORT,
            ws_port=WS_PORT,
            env={**env, "TRIO_CHAT_CLUSTER_INTERFACE": lan.address(i)},
            netns=lan.hosts[i],
        )
        for i in range(2)
    ]
    try:
        for server in servers:
            await server.start()
        await survivor.wait_metric("trio_chat_cluster_peers", lambda v: v == 1)
        async with trio.open_nursery() as nursery:
            # Her page's retry secret: her old session's name is hers, not someone else's.
            secret = secrets.token_urlsafe(16)
            alice = await connect_member(
                nursery, victim.host, WS_PORT, "alice", victim.netns, secret
            )
            bob = await connect_member(nursery, survivor.host, WS_PORT, "bob", survivor.netns)
            for member in (alice, bob):
                await member.join(ROOM)
            await bob.wait_members(ROOM, {"alice", "bob"})
            victim.signal(signal.SIGKILL, group=True)
            await alice.wait_for(lambda: alice.disconnected, "the connection drop")
            # The page's first retry, through a load balancer to the other host, long
            # before that host declares hers dead (~6.5 s).
            other = await connect_member(nursery, survivor.host, WS_PORT, "alice", survivor.netns)
            moved = await connect_member(
                nursery, survivor.host, WS_PORT, "alice", survivor.netns, secret
            )
            assert (other.name, moved.name) == ("alice-2", "alice")
            await moved.join(ROOM)
            await survivor.wait_metric("trio_chat_cluster_peers", lambda v: v == 0)
            # Whatever the detection published has reached them: each hears its own join.
            for member in (bob, moved):
                await member.join("after")
                assert member.members(ROOM) == {"alice", "bob"}
            assert moved.name == "alice"
            nursery.cancel_scope.cancel()
    finally:
        for server in servers:
            await server.kill()
