"""Clients for the cluster tests, on loopback or in network namespaces, and the namespaces.

- `open_stream`, `http_get`: a connection or a request made from inside a namespace
  (`_server_process.ServerProcess` runs a server in one with ``ip netns exec``).
- `Member`: a chat client that records every event it receives, so a test can wait for
  a condition ("bob sees carol's message") with a deadline instead of sleeping.
- `Lan`: three network namespaces ("hosts") joined by a bridge that lives in a fourth
  namespace. Nothing is added to the root namespace: the simulated LAN cannot reach the
  machine's real interfaces, so no multicast ever leaves the machine.

A thread enters a namespace with ``setns(2)`` (only that thread moves), opens its socket
there and comes back; a socket stays in the namespace it was made in. This is how the
test process, which stays in the root namespace, talks to servers inside namespaces.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from conftest import Client, _close

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The default bound on waiting for a client to see something.
WAIT: Final = 10.0

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# -- namespaces ---------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Move the calling thread into network namespace ``netns`` (None: stay) for a while.

    Only the calling thread moves, so call this in a worker thread, never in the trio
    thread. The thread always comes back: trio reuses its worker threads.
    """
    if netns is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


async def open_stream(host: str, port: int, netns: str | None = None) -> trio.SocketStream:
    """A TCP connection to ``host:port``, made from inside ``netns`` when given."""
    if netns is None:
        return await trio.open_tcp_stream(host, port)

    def connect() -> socket.socket:
        with entered(netns):
            return socket.create_connection((host, port), timeout=5)

    sock = await trio.to_thread.run_sync(connect)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def http_get(url: str, netns: str | None = None) -> tuple[int, str]:
    """GET ``url`` (from inside ``netns`` when given): status and body; 0 if unreachable."""
    # No proxy, whatever the environment says: these addresses are private to the test.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> tuple[int, str]:
        with entered(netns):
            try:
                with opener.open(url, timeout=2) as response:
                    return int(response.status), response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, ""
            except OSError:
                return 0, ""

    return await trio.to_thread.run_sync(get)


_WORKER_LABEL: Final = re.compile(r'\{worker="[^"]*"[},]')


def without_worker(text: str) -> str:
    """A ``/metrics`` page with the ``worker`` label taken out of every sample.

    For tests that read one node's page: its samples then read as they would unlabelled.
    """
    return _WORKER_LABEL.sub(lambda m: "{" if m.group().endswith(",") else "", text)


def metric(text: str, name: str) -> float | None:
    """The value of sample ``name`` (no labels but ``worker``) in a Prometheus text page."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", without_worker(text), re.MULTILINE)
    return float(match.group(1)) if match else None


# -- clients ------------------------------------------------------------------------------


class Member:
    """A connected chat client and everything it has received, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.name: str = client.welcome["name"]
        self.node: str = client.welcome["node"]
        self.events: list[dict[str, Any]] = []
        self.disconnected = False
        self._changed = trio.Event()
        self._close_requested = trio.Event()
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return f"<{self.name}@{self.node}>"

    async def _read(self) -> None:
        try:
            while True:
                self.events.append(await self.client.recv())
                self._notify()
        except ConnectionClosed:
            self.disconnected = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], Any], what: str, limit: float = WAIT) -> Any:
        """Wait until ``predicate()`` is true (checked at each event); return its value."""
        with trio.move_on_after(limit):
            while not (result := predicate()):
                await self._changed.wait()
            return result
        recent = "\n  ".join(map(str, self.events[-15:]))
        raise AssertionError(f"{self!r} saw no {what} within {limit} s; last events:\n  {recent}")

    async def send(self, **command: Any) -> None:
        await self.client.send(**command)

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        """Join ``room``; return the ``joined`` event (replayed messages are in `events`)."""
        start = len(self.events)
        await self.send(type="join", room=room, **extra)
        return await self.wait_for(
            lambda: next(
                (e for e in self.events[start:] if e["type"] == "joined" and e["room"] == room),
                None,
            ),
            f"joined {room}",
        )

    async def say(self, room: str, text: str) -> str:
        """Send ``text``; return its id once acked (the ack means: stored)."""
        cid = f"{self.name}:{text}"
        await self.send(type="send", room=room, text=text, cid=cid)
        ack = await self.wait_for(
            lambda: next((e for e in self.events if e["type"] == "ack" and e["cid"] == cid), None),
            f"ack of {text!r}",
        )
        return str(ack["id"])

    def messages(self, room: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "message" and e["room"] == room]

    def texts(self, room: str) -> collections.Counter[str]:
        """How many times each text of ``room`` arrived (replays and live alike)."""
        return collections.Counter(m["text"] for m in self.messages(room))

    def members(self, room: str) -> set[str]:
        """Who is in ``room`` as this client knows it: the last ``joined``, then presence."""
        names: set[str] = set()
        for event in self.events:
            if event.get("room") != room:
                continue
            if event["type"] == "joined":
                names = set(event["members"])
            elif event["type"] == "presence":
                if "joined" in event:
                    names.add(event["joined"])
                if "left" in event:
                    names.discard(event["left"])
        return names

    async def wait_texts(self, room: str, texts: set[str], limit: float = WAIT) -> None:
        """Wait until every text of ``texts`` has arrived; each must arrive exactly once."""
        await self.wait_for(lambda: texts <= set(self.texts(room)), f"all of {texts}", limit)
        twice = {t: n for t, n in self.texts(room).items() if n > 1}
        assert not twice, f"{self!r} received messages more than once: {twice}"

    async def wait_members(self, room: str, names: set[str], limit: float = WAIT) -> None:
        await self.wait_for(lambda: self.members(room) == names, f"members {names}", limit)

    async def close(self) -> None:
        """Close the connection cleanly (the server sees a normal close)."""
        self._close_requested.set()
        await self._closed.wait()


async def _run_member(
    host: str,
    port: int,
    name: str,
    netns: str | None,
    client_id: str | None,
    *,
    task_status: trio.TaskStatus[Member] = trio.TASK_STATUS_IGNORED,
) -> None:
    stream = await open_stream(host, port, netns)
    query = f"name={name}" if client_id is None else f"name={name}&client_id={client_id}"
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, f"/ws?{query}")
        member: Member | None = None
        try:
            client = Client(ws)
            client.welcome = await client.expect("welcome")
            member = Member(client)
            reader = trio.CancelScope()
            nursery.start_soon(_read_until, member, reader)
            task_status.started(member)
            await member._close_requested.wait()
            reader.cancel()
        finally:
            with trio.move_on_after(3, shield=True):
                await _close(ws)
            if member is not None:
                member._closed.set()


async def _read_until(member: Member, scope: trio.CancelScope) -> None:
    with scope:
        await member._read()


async def connect_member(
    nursery: trio.Nursery,
    host: str,
    port: int,
    name: str,
    netns: str | None = None,
    client_id: str | None = None,
) -> Member:
    """Connect a `Member` to the chat socket at ``host:port``; it lives in ``nursery``.

    ``client_id``: the client's retry secret (``?client_id=``), which also keeps its name
    when it moves to another host.
    """
    member: Member = await nursery.start(_run_member, host, port, name, netns, client_id)
    return member


# -- a LAN of namespaces ------------------------------------------------------------------

#: Namespace names of this module start with this, then the pid of the test process.
PREFIX: Final = "tcnet"
SUBNET: Final = "10.231.0"


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if subprocess.run(["which", "ip"], capture_output=True, check=False).returncode != 0:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.decode().strip()}")


def remove_leftovers() -> None:
    """Delete namespaces a crashed earlier run of these tests left behind."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    for line in listing.stdout.decode().splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Lan:
    """Hosts ``h0..h{n-1}``, each a namespace with ``lan0`` = 10.231.0.(i+1)/24, on a bridge.

    The bridge ``br0`` and the host ends of the veth pairs (``p0``...) live in their own
    namespace, so the root namespace gets no interface, address or route. IGMP snooping is
    off on the bridge: with no querier on the segment (like many small switches) a
    snooping bridge may stop forwarding the group once memberships age out.
    """

    def __init__(self, hosts: int = 3) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.prefix}-br"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(hosts)]

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def create(self) -> None:
        remove_leftovers()
        _ip("netns", "add", self.bridge)
        for ns in self.hosts:
            _ip("netns", "add", ns)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("-n", self.bridge, "link", "add", f"p{i}", "type", "veth", "peer", "name", "lan0", "netns", ns)  # fmt: skip
            _ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "lan0")
            _ip("-n", ns, "link", "set", "lan0", "multicast", "on", "up")

    def destroy(self) -> None:
        for ns in [*self.hosts, self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    async def set_link(self, i: int, *, up: bool) -> None:
        """Plug host ``i``'s cable out (down) or back in (up), at the bridge end.

        The host keeps its address and its local connections (its own clients stay
        connected); it just cannot reach the segment.
        """
        state = "up" if up else "down"
        await trio.run_process(["ip", "-n", self.bridge, "link", "set", f"p{i}", state])


@contextlib.contextmanager
def made_lan(hosts: int) -> Iterator[Lan]:
    """A created `Lan` of ``hosts`` hosts, destroyed at the end.

    Skips the test where namespaces cannot be made, except under CI (which runs as
    root), where that is a failure.
    """
    reason = netns_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the network namespace tests: {reason}")
        pytest.skip(reason)
    lan = Lan(hosts)
    try:
        lan.create()
        yield lan
    finally:
        lan.destroy()
