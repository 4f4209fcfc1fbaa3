"""The cluster link's trio shell: the multicast socket, the receive loop and the timers.

All protocol logic lives in the pure ``LinkState``; this module feeds it datagrams and timer
ticks and carries out what it asks: datagrams to send, events for the Node.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import trio

from .._errors import ChatError, ConfigError
from ..settings._settings import Settings
from ._events import Delivered, Gap, LinkEvent, LinkSettings, LinkStatistics
from ._packet import MAX_PACKET_SIZE, PacketCodec, derived_port
from ._state import LinkState

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._events import PeerInfo

log = logging.getLogger("trio_chat.link")

# The cluster settings' defaults are the operator's (`Settings`), declared once there.
_DEFAULTS: Final = Settings()
#: About one second of deliveries at the 1,000 messages/s we aim at: a consumer further
#: behind than that is stuck, not busy, and we would rather heal than queue without end.
EVENT_BUFFER: Final = 1024
#: Membership changes and gaps waiting for a full event channel; past this the consumer is
#: considered stuck and the link fails loudly (the worker restarts and heals from history).
HELD_LIMIT: Final = 1024
_MIB: Final = 1024 * 1024


class DatagramTransport(Protocol):
    """What the link needs from the network: the multicast socket, or a fake in tests."""

    def send_nowait(self, data: bytes) -> bool:
        """Send one datagram to the group without blocking; False if it was not sent."""
        ...

    async def receive(self) -> bytes:
        """Wait for the next datagram to the group (any size; oversized ones get dropped)."""
        ...


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Everything a ``ClusterLink`` needs; times in seconds.

    ``incarnation`` is this process's start time in ms (``new_incarnation()``); a node id
    is stable per worker slot on a host, so a restarted worker is a newer incarnation.
    ``port`` 0 (the default) means the secret's own port, `derived_port`.
    """

    secret: bytes
    cluster_id: str
    node_id: str
    incarnation: int
    http_url: str
    port: int = 0
    group: str = _DEFAULTS.cluster_group
    interface: str = _DEFAULTS.cluster_interface
    #: 0 keeps datagrams on this host; 1 reaches the LAN segment.
    ttl: int = _DEFAULTS.cluster_ttl
    #: Must stay on for workers of one host to hear each other.
    loop: bool = True
    rcvbuf: int = 4 * _MIB
    heartbeat_interval: float = 1.0
    suspect_after: float = 5.0
    dead_after: float = 6.5
    buffer_packets: int = 8192
    buffer_bytes: int = 8 * _MIB
    max_peers: int = 256

    def __post_init__(self) -> None:
        if self.port == 0:
            # Frozen: the derived port is set once, here, as if it had been given.
            object.__setattr__(self, "port", derived_port(self.secret))
        try:
            group = ipaddress.IPv4Address(self.group)
            ipaddress.IPv4Address(self.interface)
        except ValueError as exc:
            raise ConfigError(
                f"cluster group and interface must be IPv4 addresses: {exc}"
            ) from None
        if not group.is_multicast:
            raise ConfigError(f"cluster group {self.group} is not a multicast address")
        if not 0 < self.port < 65536 or not 0 <= self.ttl <= 255:
            raise ConfigError("cluster port must be 1-65535 and TTL 0-255")

    def settings(self) -> LinkSettings:
        """The state machine's timers and bounds."""
        return LinkSettings(
            heartbeat_interval=self.heartbeat_interval,
            suspect_after=self.suspect_after,
            dead_after=self.dead_after,
            buffer_packets=self.buffer_packets,
            buffer_bytes=self.buffer_bytes,
            max_peers=self.max_peers,
        )


def new_incarnation() -> int:
    """A fresh incarnation: the current time in ms (later restarts get larger ones)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ClusterLinkStatistics:
    link: LinkStatistics
    #: The socket receive buffer the kernel granted (0 with an injected transport).
    rcvbuf: int
    #: Datagrams the kernel did not take (full buffer, no route): repaired by NAKs.
    send_failures: int
    #: Deliveries dropped because the event channel was full, reported as gaps.
    events_overflowed: int


class MulticastTransport:
    """The UDP socket joined to the cluster's group on one interface.

    Raises:
        ConfigError: the group cannot be joined on the interface (message says why).
    """

    def __init__(self, config: LinkConfig) -> None:
        self._address = (config.group, config.port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Every worker of the host binds the same group and port; each gets a copy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.rcvbuf)
            # Bound to the group, the socket sees only this group's datagrams.
            sock.bind(self._address)
            mreq = socket.inet_aton(config.group) + socket.inet_aton(config.interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            ifaddr = socket.inet_aton(config.interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ifaddr)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, config.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(config.loop))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot join cluster group {config.group}:{config.port} on interface "
                f"{config.interface}: {exc}"
            ) from None
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.rcvbuf < config.rcvbuf:
            log.warning(
                "cluster link: SO_RCVBUF %d bytes requested, kernel granted %d; raise "
                "net.core.rmem_max or bursts will be dropped (and repaired by NAKs)",
                config.rcvbuf,
                self.rcvbuf,
            )
        self._sock = sock
        self._trio_sock = trio.socket.from_stdlib_socket(sock)

    def send_nowait(self, data: bytes) -> bool:
        try:
            self._sock.sendto(data, self._address)
        except OSError:
            # Full buffer (EAGAIN, ENOBUFS) or no route: the datagram is lost like any other.
            return False
        return True

    async def receive(self) -> bytes:
        # One byte more than the link's maximum shows an oversized datagram as such.
        return await self._trio_sock.recv(MAX_PACKET_SIZE + 1)

    def close(self) -> None:
        self._trio_sock.close()


class _OverflowGap:
    """Deliveries of one origin dropped while the event channel was full."""

    __slots__ = ("first", "incarnation", "last", "origin")

    def __init__(self, event: Delivered) -> None:
        self.origin, self.incarnation = event.origin, event.incarnation
        self.first = self.last = event.seq


class ClusterLink:
    """One node's end of the cluster link.

    Args:
        config: group, identity, secret, timers.
        transport: a datagram layer to use instead of the multicast socket (tests). The
            caller keeps ownership of it.
        wall_clock: Unix time now, read once at start; the link's clock then advances
            with trio's (tests pass one derived from the virtual clock).

    Raises:
        ConfigError: the secret or node id is unusable.

    Events (``events``): ``Delivered``, ``PeerUp``, ``PeerDown``, ``Gap``. The link never
    waits for the consumer: a ``Delivered`` that does not fit in the channel is dropped and
    reported as a ``Gap`` of its origin (heal it from history); other events wait, in order,
    in a queue of at most ``HELD_LIMIT``, past which the link fails with ``ChatError``.
    """

    def __init__(
        self,
        config: LinkConfig,
        *,
        transport: DatagramTransport | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._wall_clock = wall_clock
        self._settings = config.settings()
        self._codec = PacketCodec(
            secret=config.secret,
            cluster_id=config.cluster_id,
            node_id=config.node_id,
            incarnation=config.incarnation,
        )
        self._injected = transport
        self._transport: DatagramTransport | None = None
        self._state: LinkState | None = None
        self._closed = False
        self._clock_base = 0.0
        self._timer_scope: trio.CancelScope | None = None
        self._rcvbuf = 0
        self._send_failures = 0
        self._events_overflowed = 0
        send, self.events = trio.open_memory_channel[LinkEvent](EVENT_BUFFER)
        self._event_send = send
        self._held: deque[LinkEvent | _OverflowGap] = deque()
        self._open_overflow: dict[tuple[str, int], _OverflowGap] = {}
        self._held_waiting = trio.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Join the group and run the link until cancelled.

        Raises:
            ConfigError: the group cannot be joined.
            ChatError: the event consumer is stuck (see the class docstring).

        Cancellation: on the way out the leave packet is sent. Sending never blocks, so no
        shielded wait is needed for it; the socket is closed.
        """
        if self._state is not None:
            raise RuntimeError("ClusterLink.run may be called only once")
        owned = None
        if self._injected is None:
            owned = MulticastTransport(self._config)
            self._rcvbuf = owned.rcvbuf
        transport = self._transport = owned or self._injected
        assert transport is not None
        # Wall-clock seconds that advance with trio's clock (virtual time in tests).
        self._clock_base = self._wall_clock() - trio.current_time()
        state = self._state = LinkState(
            codec=self._codec,
            node_id=self._config.node_id,
            incarnation=self._config.incarnation,
            http_url=self._config.http_url,
            now=self._now(),
            settings=self._settings,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers, state)
                nursery.start_soon(self._run_event_flusher)
                self._after_step(state)
                task_status.started()
                await self._run_receiver(transport, state)
        finally:
            self._closed = True
            state.leave(self._now())
            self._after_step(state)
            if owned is not None:
                owned.close()

    def broadcast(self, payload: bytes) -> None:
        """Send ``payload`` (at most 64 KiB) to every peer. Never blocks.

        Raises:
            RuntimeError: ``run`` has not started yet.
            trio.ClosedResourceError: the link has stopped.
            ValueError: the payload is too large.
        """
        if self._closed:
            raise trio.ClosedResourceError("the cluster link has stopped")
        if self._state is None:
            raise RuntimeError("ClusterLink.broadcast before run() started")
        self._state.broadcast(payload, self._now())
        self._after_step(self._state)

    def peers(self) -> list[PeerInfo]:
        """The nodes this link knows, with their HTTP address and status."""
        return [] if self._state is None else self._state.peers()

    def statistics(self) -> ClusterLinkStatistics:
        """The state machine's counters (zero before ``run``) and the shell's."""
        link = (
            LinkStatistics(**{f.name: 0 for f in fields(LinkStatistics)})
            if self._state is None
            else self._state.statistics()
        )
        return ClusterLinkStatistics(
            link, self._rcvbuf, self._send_failures, self._events_overflowed
        )

    def _now(self) -> float:
        return self._clock_base + trio.current_time()

    def _after_step(self, state: LinkState) -> None:
        """Carry out what the state machine asked for, and re-arm the timer."""
        assert self._transport is not None
        for datagram in state.datagrams_to_send():
            if not self._transport.send_nowait(datagram):
                self._send_failures += 1
        for event in state.take_events():
            self._queue(event)
        if self._timer_scope is not None:
            self._timer_scope.deadline = state.next_deadline() - self._clock_base

    async def _run_receiver(self, transport: DatagramTransport, state: LinkState) -> NoReturn:
        while True:
            data = await transport.receive()
            state.receive_datagram_untrusted(data, self._now())
            self._after_step(state)

    async def _run_timers(self, state: LinkState) -> NoReturn:
        while True:
            with trio.CancelScope(deadline=state.next_deadline() - self._clock_base) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            # Converting to trio's clock and back may land a hair before the deadline;
            # ticking at the deadline itself guarantees that the due timers run.
            state.tick(max(self._now(), state.next_deadline()))
            self._after_step(state)

    def _queue(self, event: LinkEvent) -> None:
        if not self._held:
            try:
                self._event_send.send_nowait(event)
            except trio.WouldBlock:
                pass
            except trio.BrokenResourceError:
                return  # The consumer closed the channel: it wants no more events.
            else:
                return
        item: LinkEvent | _OverflowGap = event
        if isinstance(event, Delivered):
            self._events_overflowed += 1
            key = (event.origin, event.incarnation)
            gap = self._open_overflow.get(key)
            if gap is not None:
                gap.last = event.seq
                return
            item = self._open_overflow[key] = _OverflowGap(event)
        if len(self._held) >= HELD_LIMIT:
            raise ChatError("cluster link: the event consumer is stuck")
        self._held.append(item)
        self._held_waiting.set()

    async def _run_event_flusher(self) -> NoReturn:
        """Wait for room in the event channel for the held events (the only await on it)."""
        while True:
            await self._held_waiting.wait()
            while self._held:
                item = self._held[0]
                if isinstance(item, _OverflowGap):
                    # Frozen now: later drops of this origin start a new gap behind it.
                    del self._open_overflow[item.origin, item.incarnation]
                    event: LinkEvent = Gap(item.origin, item.incarnation, item.first, item.last)
                else:
                    event = item
                try:
                    await self._event_send.send(event)
                except trio.BrokenResourceError:
                    self._held.clear()
                    break
                self._held.popleft()
            self._held_waiting = trio.Event()
