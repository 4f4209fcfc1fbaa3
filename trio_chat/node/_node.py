"""The node: one server process's chat service, composed of its parts, and their nursery.

Parts, each one job: `Presence` (who is in which room, here and on peers: the one path of
presence to the hub and the cluster), `Names` (nicknames), `History` (accepting
messages, group commit, replay, paging, the store's threads) and, when clustered,
`Cluster` (the node's side of the `Bus`). The hub and the chat socket come from the
server layer. The node implements the sessions' `ChatService` port by delegating to
its parts.

`Node.run` starts every node task in one nursery: the hub's fan-out, the commit task, the
cluster (with its bus), the chat socket. If any of them fails, the node fails, loudly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import TYPE_CHECKING, NoReturn

import trio

from ..protocol._codes import CLOSE_DISCONNECTED, CLOSE_GOING_AWAY
from ..protocol._ids import IdClock
from ..protocol._proxies import TrustedProxies
from ..server._auth import Tokens
from ..server._boundary import FailureBoundary
from ..server._chat_socket import handle_chat_socket
from ..server._hub import Hub
from ..server._limits import ConnectionLimits, default_max_connections
from ..server._listener import WebSocketServer
from ._api_sender import ApiSender
from ._cluster import Broadcaster, Cluster
from ._history import History, Replay
from ._names import Names
from ._presence import Presence
from ._store import MemoryStore, Message, SqliteStore, Store

if TYPE_CHECKING:
    import ssl

    from ..protocol._wire import Ack, ErrorEvent, Send, TypingEvent
    from ..server._ports import Member
    from ..settings._settings import Settings
    from ._bus import Bus


@dataclasses.dataclass(frozen=True)
class NodeStatistics:
    connections: int
    messages_in: int
    commits: int
    committed: int
    duplicates: int
    slow_disconnects: int
    errors: dict[str, int]
    #: False from a failed write until a write succeeds again.
    store_up: bool
    #: Store operations that failed, by ``"write"`` / ``"read"``.
    store_failures: dict[str, int]


class Node:
    """One process's chat service.

    Args:
      settings: the validated settings.
      node_id: this node's stable id (see `claim_identity`).
      store: the history engine; `open_store` picks it from the settings.
      bus: the cluster engine (`MulticastBus`), or None to run alone.
      tls: the chat socket's TLS context (`Settings.chat_socket_tls`), None for ``ws://``.
    """

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        store: Store,
        bus: Bus | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        #: jwt mode's token checker (reads the public key file: a ConfigError if bad).
        self.tokens = Tokens(settings) if settings.auth == "jwt" else None
        self.node_id = node_id
        self.store = store
        self.hub = Hub()
        #: Where exceptions from serving one client are counted and logged (rate-limited).
        self.failures = FailureBoundary()
        #: Client slots, overall and per address, for the chat socket and ``/ws`` both.
        self.limits = ConnectionLimits(
            settings.max_connections or default_max_connections(),
            settings.max_connections_per_ip,
        )
        #: Peers whose forwarding headers name the client, on both sockets.
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.ids = IdClock(node_id)
        self.errors: collections.Counter[str] = collections.Counter()
        peers = None if bus is None else Broadcaster(bus)
        self._peers = peers
        self.presence = Presence(self.hub, peers, settings.presence_names_max)
        self.names = Names(self.presence)
        self.history = History(settings, store, self.hub, self.ids, peers, self.count_error)
        self.cluster = (
            None if bus is None else Cluster(bus, self.history, self.presence, self.disconnect_here)
        )
        self.sessions: set[Member] = set()
        self.chat_socket = WebSocketServer(
            functools.partial(handle_chat_socket, self),
            failures=self.failures,
            limits=self.limits,
            count_error=self.count_error,
            max_message=settings.max_frame,
            backlog_limit=settings.backlog,
            keepalive_interval=settings.keepalive_interval,
            proxies=self.proxies,
            node_id=node_id,
            tls=tls,
        )
        self.chat_socket_port: int | None = None
        self._fallback_slow = 0

    # -- the sessions' port (server/_ports.py ChatService) ------------------------------

    def claim_name(self, wanted: str, owner: bytes) -> str:
        return self.names.claim(wanted, owner)

    def rename(self, member: Member, wanted: str) -> None:
        self.names.rename(member, wanted)

    def register(self, member: Member) -> None:
        self.sessions.add(member)

    def release(self, member: Member) -> None:
        """Forget a session that ended: leave its rooms, free its name. Never blocks."""
        for room in self.presence.rooms_of(member):
            self.presence.leave(room, member)
        self.sessions.discard(member)
        self.names.release(member)

    async def join(self, room: str, member: Member, since: str | None) -> Replay:
        """Subscribe ``member`` to ``room``, read what it gets first (`History.replay`),
        then tell the room (cluster-wide) it arrived.

        Broadcasts reach the session from the subscription on; it holds them back until
        it has sent the replay.

        Raises:
          StoreError: the replay could not be read. The session was never in the room:
            no subscription is left and nobody was told.

        Cancellation: as a failed read.
        """
        self.presence.subscribe(room, member)
        try:
            replay = await self.history.replay(room, since)
        except BaseException:
            self.presence.unsubscribe_quietly(room, member)
            raise
        self.presence.announce(room, member)
        return replay

    def leave(self, room: str, member: Member) -> None:
        self.presence.leave(room, member)

    def rooms_of(self, member: Member) -> frozenset[str]:
        return self.presence.rooms_of(member)

    def members(self, room: str) -> list[str]:
        """Who is in ``room``: here first, then on other nodes."""
        return self.presence.members(room)

    def snapshot(self, room: str) -> tuple[list[str], int]:
        return self.presence.snapshot(room)

    def typing(self, room: str, event: TypingEvent, member: Member) -> None:
        self.presence.typing(room, event, member)

    async def submit(self, member: Member, commands: list[Send]) -> None:
        await self.history.submit(member, commands)

    def submit_would_wait(self) -> bool:
        return self.history.submit_would_wait()

    async def page(self, room: str, before: str | None, limit: int) -> tuple[list[Message], bool]:
        return await self.history.page(room, before, limit)

    async def delete(self, room: str, message_id: str) -> bool:
        return await self.history.delete(room, message_id)

    def count_slow(self) -> None:
        """Count a client closed as slow by a ``/ws`` transport or by its session (lag
        held during a join); the chat socket's write path counts its own."""
        self._fallback_slow += 1

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    # -- the server API (app/_api.py) ----------------------------------------------------

    async def publish(self, sender: str, command: Send, uid: str | None) -> Ack | ErrorEvent:
        """Store and broadcast a message from the app's backend; the commit's answer.

        Raises:
          StoreError: the store is down and its next attempt is not due yet.
        """
        return await self.history.publish(ApiSender(sender, uid), command)

    def disconnect(self, user: str) -> int:
        """Close every connection of ``user`` on every node; how many were here."""
        if self._peers is not None:
            self._peers.send_disconnect(user)
        return self.disconnect_here(user)

    def disconnect_here(self, user: str) -> int:
        """Close this node's connections of ``user`` with 4003; how many."""
        closing = [s for s in self.sessions if s.user == user]
        for session in closing:
            session.close(CLOSE_DISCONNECTED, "disconnected by the server")
        return len(closing)

    # -- for the app --------------------------------------------------------------------

    @property
    def store_up(self) -> bool:
        """False from a failed store write until a write succeeds again (``/healthz``)."""
        return self.history.store_up

    def statistics(self) -> NodeStatistics:
        history = self.history
        return NodeStatistics(
            connections=len(self.sessions),
            messages_in=history.messages_in,
            commits=history.commits,
            committed=history.committed,
            duplicates=history.duplicates,
            slow_disconnects=self._fallback_slow + self.chat_socket.statistics().slow_closes,
            errors=dict(self.errors),
            store_up=history.store_up,
            store_failures=dict(history.store_failures),
        )

    # -- running ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the hub, the commit task, big rooms' head counts, the cluster and the chat socket
        until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hub.run)
            nursery.start_soon(self.history.run_commits)
            nursery.start_soon(self.presence.run_counts)
            if self.cluster is not None:
                await nursery.start(self.cluster.run)
            if self.settings.ws_bind is not None:
                host, port = self.settings.ws_bind
                self.chat_socket_port = await nursery.start(self.chat_socket.serve, host, port)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def shutdown(self) -> None:
        """Stop accepting, close every client with 1001, wait a grace period.

        May be called more than once. Cancellation: bounded by
        ``settings.shutdown_grace``; whatever is still open then is cut when the node's
        nursery is cancelled.
        """
        for session in list(self.sessions):
            session.close(CLOSE_GOING_AWAY, "server shutting down")
        await self.chat_socket.shutdown(
            CLOSE_GOING_AWAY, "server shutting down", self.settings.shutdown_grace
        )


def open_store(settings: Settings) -> Store:
    """The store the settings ask for."""
    if settings.store == "memory":
        return MemoryStore()
    return SqliteStore(settings.data_dir / "history.sqlite3")
