"""A cluster of real server processes on one host, over real multicast on loopback.

Network rules: every process here runs the cluster link on interface 127.0.0.1 with TTL 0
(host mode, or LAN mode forced onto loopback), on a cluster port and with a secret of
its own test, so nothing leaves the machine and concurrent tests never hear each other.
Nothing sleeps to wait: tests wait for frames (`Member.wait_for`) or poll ``/metrics``
with deadlines, and every process is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from typing import TYPE_CHECKING

import pytest
import trio
from trio_websocket import ConnectionClosed

from _netns import WAIT, Member, connect_member
from _server_process import BIN, ServerProcess, free_udp_port, worker_pids

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
    nursery: trio.Nursery, server: ServerProcess, count: int, limit: float = 15.0
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
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
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
        await server.kill()


async def start_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        await server.spawn()
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(server.wait_ready)


def three_servers(tmp_path: Path, env: dict[str, str]) -> list[ServerProcess]:
    return [
        ServerProcess(
            tmp_path / f"data{i}",
            tmp_path / f"server{i}.log",
            env=env,
        )
        for i in range(3)
    ]


async def wait_peers(servers: list[ServerProcess], count: int) -> None:
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(server.wait_metric, "trio_chat_cluster_peers", lambda v: v == count)


async def one_member_each_chatting(
    nursery: trio.Nursery, servers: list[ServerProcess]
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
            servers[2].signal(signal.SIGKILL, group=True)
            await victim.wait_for(lambda: victim.disconnected, "the connection drop")
            async with trio.open_nursery() as waits:
                for member in alive:
                    waits.start_soon(member.wait_members, ROOM, alive_names, DETECT_LIMIT)
            detected = time.monotonic() - killed_at
            assert detected < DETECT_LIMIT, detected
            await chat_round(alive, "while down")
            await servers[2].kill()

            # Same data directory: same node id, a newer incarnation.
            await servers[2].start()
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
            await server.kill()


@pytest.mark.timeout(45)
async def test_messages_sent_while_a_process_was_down_reach_it(tmp_path: Path) -> None:
    servers = three_servers(tmp_path, cluster_env(free_udp_port(), new_secret()))
    try:
        await start_all(servers)
        async with trio.open_nursery() as nursery:
            members = await one_member_each_chatting(nursery, servers)
            *alive, victim = members
            last_seen = victim.messages(ROOM)[-1]["id"]

            servers[2].signal(signal.SIGKILL, group=True)
            await victim.wait_for(lambda: victim.disconnected, "the connection drop")
            await servers[2].kill()
            missed = await chat_round(alive, "while down")
            # Restarted at once, before the others declare it dead: they see a newer
            # incarnation of the same node.
            await servers[2].start()
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
            await server.kill()


@pytest.mark.timeout(30)
async def test_cluster_check_lists_the_running_peers(tmp_path: Path) -> None:
    env = cluster_env(free_udp_port(), new_secret())
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        workers=2,
        env=env,
    )
    try:
        await server.start()
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
        await server.kill()


async def history(server: ServerProcess, room: str) -> list[tuple[str, str]]:
    """Every message of ``room`` in the store as (text, id), oldest first (HTTP API)."""
    found: list[tuple[str, str]] = []
    before = ""
    while True:
        status, body = await server.get(f"/api/rooms/{room}/messages?limit=200{before}")
        assert status == 200, status
        page = json.loads(body)
        found[:0] = [(m["text"], m["id"]) for m in page["messages"]]
        if not page["more"]:
            return found
        before = f"&before={page['messages'][0]['id']}"


async def send_acked(member: Member, text: str, cid: str) -> str | None:
    """Send ``text`` to ROOM; its id once acked, None if the connection drops first."""
    try:
        await member.send(type="send", room=ROOM, text=text, cid=cid)
    except ConnectionClosed:
        return None

    def ack_or_drop() -> dict[str, str] | bool:
        ack = next((e for e in member.events if e["type"] == "ack" and e["cid"] == cid), None)
        return ack or member.disconnected

    ack = await member.wait_for(ack_or_drop, f"the ack of {text!r}")
    return ack["id"] if isinstance(ack, dict) else None


class Chatter:
    """One client sending to ROOM at a steady pace; on a drop it reconnects (the kernel
    picks a live worker), resumes with ``since``, and retries the unacked send with the
    same cid, as the page does.
    """

    #: Most sends per client (a bound on the test, whatever happens).
    LIMIT = 300
    #: Pace of the sends: a steady flow across the kill, not a flood.
    INTERVAL = 0.05

    def __init__(self, server: ServerProcess, member: Member) -> None:
        self.server = server
        self.connections = [member]
        self.acked: dict[str, str] = {}
        #: The ``since`` of its last resume.
        self.resumed_since = ""
        self._progress = trio.Event()

    @property
    def member(self) -> Member:
        return self.connections[-1]

    async def run(self, nursery: trio.Nursery, stop: trio.Event) -> None:
        name = self.member.name
        while not stop.is_set() and len(self.acked) < self.LIMIT:
            text = f"{name} #{len(self.acked)}"
            message_id = await send_acked(self.member, text, cid=f"c{len(self.acked)}")
            if message_id is None:
                self.resumed_since = self.member.messages(ROOM)[-1]["id"]
                server = self.server
                self.connections.append(
                    await connect_member(nursery, server.host, server.ws_port, name)
                )
                await self.member.join(ROOM, since=self.resumed_since)
                continue
            self.acked[text] = message_id
            self._progress.set()
            self._progress = trio.Event()
            await trio.sleep(self.INTERVAL)

    async def wait_acked(self, count: int) -> None:
        with trio.fail_after(WAIT):
            while len(self.acked) < count:
                await self._progress.wait()

    def texts_seen(self) -> set[str]:
        return {text for member in self.connections for text in member.texts(ROOM)}


async def poll_health(server: ServerProcess, failures: list[str], stop: trio.Event) -> None:
    """GET /healthz every 50 ms until ``stop``; record each one that fails twice in a row.

    A request the killed worker had just accepted dies with it: a client's immediate
    retry (which lands on a live worker) must succeed.
    """
    while not stop.is_set():
        status, _ = await server.get("/healthz")
        if status != 200:
            status, _ = await server.get("/healthz")
            if status != 200:
                failures.append(f"{time.monotonic():.2f}: {status}")
        await trio.sleep(0.05)  # poll interval: no event exists for another process


#: A killed worker must serve again within this (restart delay 0.5 s, then its start).
RESTART_LIMIT = 5.0


@pytest.mark.timeout(90)
async def test_kill_9_of_one_worker_the_others_serve_on(tmp_path: Path) -> None:
    """``trio-chat serve --workers 3``: kill -9 one worker while clients on every worker
    send. Nobody else notices, nothing acked is lost, the worker is back in seconds."""
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        workers=3,
        cli=True,
        env=cluster_env(free_udp_port(), new_secret()),
    )
    try:
        await server.start()
        async with trio.open_nursery() as nursery:
            members = await members_on_distinct_nodes(nursery, server, 3)
            await all_join(members)
            pids = worker_pids(server.proc.pid, server.data_dir)
            assert set(pids) == {m.node for m in members}, pids
            chatters = [Chatter(server, m) for m in members]
            *others, victim = chatters
            stop, health_failures = trio.Event(), []
            async with trio.open_nursery() as traffic:
                traffic.start_soon(poll_health, server, health_failures, stop)
                for chatter in chatters:
                    traffic.start_soon(chatter.run, nursery, stop)
                for chatter in chatters:
                    await chatter.wait_acked(5)

                victim_node = victim.member.node
                killed_pid = pids[victim_node]
                os.kill(killed_pid, signal.SIGKILL)
                with trio.fail_after(RESTART_LIMIT):
                    while pids.get(victim_node, killed_pid) == killed_pid:
                        await trio.sleep(0.05)  # poll interval: no event for another process
                        pids = worker_pids(server.proc.pid, server.data_dir)
                    # Serving again: a new client lands on it, under the same node id.
                    while True:
                        member = await connect_member(nursery, server.host, server.ws_port, "x")
                        if member.node == victim_node:
                            break
                        await member.close()
                # Chat on across the restart a little longer before stopping.
                for chatter in chatters:
                    await chatter.wait_acked(len(chatter.acked) + 10)
                stop.set()

            assert not health_failures, health_failures
            assert len(victim.connections) == 2, "the killed worker's client reconnected once"
            for chatter in others:
                assert chatter.connections == [chatter.connections[0]], "no reconnect"
                assert not chatter.member.disconnected
            acked = {text: i for c in chatters for text, i in c.acked.items()}
            stored = await history(server, ROOM)
            assert not set(acked.items()) - set(stored), "acked messages are missing"
            texts = [text for text, _ in stored]
            assert len(texts) == len(set(texts)), "a retried send was stored twice"
            # The killed worker's client resumed: it has seen everything after its resume
            # point, live or replayed. (A message from another node with an id below that
            # point, still on its way when the worker died, is in history but not
            # replayed: docs/architecture.md, "Resume in a cluster".)
            after = {t for t, i in acked.items() if i > victim.resumed_since}
            await victim.member.wait_for(
                lambda: after <= victim.texts_seen(), "every acked message after its `since`"
            )
            for chatter in others:
                await chatter.member.wait_texts(ROOM, set(acked))
            nursery.cancel_scope.cancel()
    finally:
        await server.kill()
