"""The node: one server process's chat state and the tasks that serve it.

A node owns the hub (rooms and fan-out), the store and its commit task, the chat socket,
and (when clustered) the multicast link. `Node.run` starts all of them in one nursery:
if any of them fails, the node fails, loudly.

Message flow: a session's ``send`` becomes a `Message` with a fresh id and goes into the
commit channel. The commit task writes everything waiting in one transaction, then, in
order, broadcasts each message to its room, sends it to cluster peers, and acks it to its
sender: an ack always means "stored", and a client never sees a message that a restart
could take back.

A store that fails (`StoreError`: disk full, I/O error, locked, corrupt) does not stop the
node; it degrades. A failed commit acks nothing: its local senders get the error
``store_unavailable`` (they retry with the same cid), and other nodes' messages are kept
and written first at the next attempt. The commit task retries with backoff
(`RETRY_FIRST` doubling to `RETRY_MAX`); until the retry is due, new sends are refused at
once instead of queueing behind a dead disk. A failed history read refuses that one
request. ``store_up`` (``/healthz``) is False from a failed write to the next good one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING, Final, NoReturn, TypeVar, TypeVarTuple

import trio

from ._boundary import FailureBoundary
from ._chat_socket import handle_chat_socket
from ._cluster import Cluster
from ._errors import ProtocolError, StoreError
from ._hub import Hub
from ._ids import IdClock
from ._limits import ConnectionLimits, default_max_connections
from ._names import name_keys, prototypes
from ._protocol import Ack, Presence, store_unavailable
from ._store import MemoryStore, Message, SqliteStore, Store
from ._websocket import CLOSE_GOING_AWAY, WebSocketServer

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Settings
    from ._link import LinkConfig
    from ._protocol import Send, TypingEvent
    from ._session import Session

log = logging.getLogger("trio_chat.node")

_Args = TypeVarTuple("_Args")
_R = TypeVar("_R")

# Messages accepted but not yet committed. A full channel makes senders wait, which
# pushes back on their sockets while the disk catches up.
_COMMIT_QUEUE: Final = 8192
# Most messages per transaction: bounds one commit's latency.
_MAX_COMMIT_BATCH: Final = 2000
#: Seconds from a failed commit to the next attempt; doubled after each failure.
RETRY_FIRST: Final = 0.1
#: The longest wait between two attempts while the store keeps failing.
RETRY_MAX: Final = 5.0
# Store failures are logged at most this often (seconds), with how many were not.
_STORE_LOG_INTERVAL: Final = 60.0


@dataclasses.dataclass(slots=True)
class _Pending:
    message: Message
    #: The local session that sent it; None for a message from another node.
    sender: Session | None


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
      node_id: this node's stable id (see `claim_node_id`).
      store: the history engine; `open_store` picks it from the settings.
      link: the cluster link's configuration, or None to run alone.
    """

    def __init__(
        self, settings: Settings, node_id: str, store: Store, link: LinkConfig | None = None
    ) -> None:
        self.settings = settings
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
        self.cluster = Cluster(self, link) if link is not None else None
        self.ids = IdClock(node_id)
        self.sessions: set[Session] = set()
        #: The `name_keys` of the names of this node's sessions.
        self._skeletons: set[str] = set()
        # Unicode's confusables take ~75 ms to load: now, not in the first client's turn.
        prototypes()
        self._commit_send, self._commit_receive = trio.open_memory_channel[_Pending](_COMMIT_QUEUE)
        self._read_limiter = trio.CapacityLimiter(1)
        self._write_limiter = trio.CapacityLimiter(1)
        self.chat_socket = WebSocketServer(
            functools.partial(handle_chat_socket, self),
            failures=self.failures,
            limits=self.limits,
            count_error=self.count_error,
            max_message=settings.max_frame,
            backlog_limit=settings.backlog,
            keepalive_interval=settings.keepalive_interval,
        )
        self.chat_socket_port: int | None = None
        self._messages_in = 0
        self._commits = 0
        self._committed = 0
        self._duplicates = 0
        self._fallback_slow = 0
        self.errors: collections.Counter[str] = collections.Counter()
        #: False from a failed write until a write succeeds again (``/healthz``).
        self.store_up = True
        # While the store is down: when the commit task tries again (trio time).
        self._retry_at = 0.0
        self._store_failures: collections.Counter[str] = collections.Counter()
        self._store_logged_at = -_STORE_LOG_INTERVAL
        self._store_unlogged = 0

    # -- names --------------------------------------------------------------------------

    def claim_name(self, wanted: str) -> str:
        """Reserve ``wanted``, or ``wanted-2``, ``wanted-3``… if it is taken.

        Taken: a name in use has the same confusable skeleton, case aside (``alice`` spelt with a
        Cyrillic ``a``, U+0430, is ``alice``), on this node or in a room on a peer
        (`Cluster.name_skeletons`). Two nodes granting one name at the same instant both
        keep it (docs/protocol.md).

        Args:
          wanted: a valid, normalized name (`normalize_name_untrusted`).
        """
        remote = frozenset() if self.cluster is None else self.cluster.name_skeletons()
        name, n = wanted, 1
        while not (
            name_keys(name).isdisjoint(self._skeletons) and name_keys(name).isdisjoint(remote)
        ):
            n += 1
            name = f"{wanted[:28]}-{n}"
        self._skeletons.update(name_keys(name))
        return name

    def rename(self, session: Session, wanted: str) -> None:
        self._skeletons.difference_update(name_keys(session.name))
        session.name = self.claim_name(wanted)

    # -- rooms and presence -------------------------------------------------------------

    async def join(
        self, room: str, session: Session, since: str | None
    ) -> tuple[list[Message], bool]:
        """Subscribe ``session`` to ``room``, read what it gets first (`replay`), then tell
        the room (cluster-wide) it arrived.

        Broadcasts reach the session from the subscription on; it holds them back until
        it has sent the replay.

        Raises:
          StoreError: the replay could not be read. The session was never in the room:
            no subscription is left and nobody was told.

        Cancellation: as a failed read.
        """
        self.hub.subscribe(room, session)
        try:
            replay = await self.replay(room, since)
        except BaseException:
            self.hub.unsubscribe(room, session)
            raise
        self._presence(room, Presence(room=room, joined=session.name), session)
        if self.cluster is not None:
            self.cluster.send_presence(room, session.name, joined=True)
        return replay

    def leave(self, room: str, session: Session) -> None:
        if self.hub.unsubscribe(room, session):
            self._presence(room, Presence(room=room, left=session.name), session)
            if self.cluster is not None:
                self.cluster.send_presence(room, session.name, joined=False)

    def _presence(self, room: str, event: Presence, session: Session) -> None:
        # Presence is state, not history: when the queue is full the event is dropped
        # and the members list in the next ``joined`` is still right.
        self.hub.publish_nowait(room, event, exclude=session)

    def members(self, room: str) -> list[str]:
        """Who is in ``room``: here first, then on other nodes."""
        local = self.hub.members(room)
        if self.cluster is None:
            return local
        return list(dict.fromkeys(local + self.cluster.members(room)))

    def typing(self, room: str, event: TypingEvent, session: Session) -> None:
        self.hub.publish_nowait(room, event, exclude=session)
        if self.cluster is not None:
            self.cluster.send_typing(room, session.name)

    def register(self, session: Session) -> None:
        self.sessions.add(session)

    def release(self, session: Session) -> None:
        """Forget a session that ended: leave its rooms, free its name. Never blocks."""
        for room in self.hub.rooms_of(session):
            self.leave(room, session)
        self.sessions.discard(session)
        self._skeletons.difference_update(name_keys(session.name))

    # -- messages -----------------------------------------------------------------------

    async def submit(self, session: Session, command: Send) -> None:
        """Accept a client's message: id it, queue it for commit. The ack follows commit.

        Cancellation: a checkpoint; waits while the commit queue is full. If cancelled
        the message was not accepted (no ack is sent; the client retries with its cid).

        Raises:
          StoreError: the store is down and its next attempt is not due yet.
        """
        self._messages_in += 1
        if not self.store_up and trio.current_time() < self._retry_at:
            await trio.lowlevel.checkpoint()
            raise StoreError("the store is down; the next attempt is not due yet")
        # A retried cid is caught by the store, in the commit's own transaction: no
        # lookup per send, and two copies arriving together cannot both be stored.
        dedupe = None if command.cid is None else session.retry_key(command.cid)
        message = Message(
            id=self.ids.next_id(time.time_ns() // 1_000_000),
            room=command.room,
            sender=session.name,
            text=command.text,
            ts=time.time(),
            cid=command.cid,
            dedupe=dedupe,
        )
        await self._commit_send.send(_Pending(message, session))

    def submit_would_wait(self) -> bool:
        """Whether `submit` would wait now: the commit queue is full (the store is behind)."""
        stats = self._commit_send.statistics()
        return stats.current_buffer_used >= stats.max_buffer_size

    async def _run_commits(self) -> NoReturn:
        # Other nodes' messages from a failed commit: written first at the next attempt.
        held: list[_Pending] = []
        delay = RETRY_FIRST
        while True:
            if held:
                await trio.sleep_until(self._retry_at)
                batch, held = held, []
            else:
                batch = [await self._commit_receive.receive()]
            while len(batch) < _MAX_COMMIT_BATCH:
                try:
                    batch.append(self._commit_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                duplicates = await self._write([p.message for p in batch])
            except StoreError as exc:
                self._retry_at = trio.current_time() + delay
                delay = min(delay * 2, RETRY_MAX)
                self._store_failed("write", exc)
                held = await self._refuse_commit(batch)
                continue
            delay = RETRY_FIRST
            if not self.store_up:
                self.store_up = True
                log.warning("the store accepts writes again")
            await self._publish_commit(batch, duplicates)

    async def _refuse_commit(self, batch: list[_Pending]) -> list[_Pending]:
        """Tell a failed commit's local senders; return the other nodes' messages."""
        held = []
        for pending in batch:
            message = pending.message
            if pending.sender is None:
                held.append(pending)
                continue
            self.count_error("store_unavailable")
            refusal = store_unavailable(message.room, message.cid)
            await self.hub.publish_to(pending.sender, message.room, refusal)
        await trio.lowlevel.checkpoint()  # other nodes' messages only: nothing awaited
        return held

    async def _publish_commit(self, batch: list[_Pending], duplicates: dict[str, str]) -> None:
        """Broadcast, forward and ack what one commit stored, in order."""
        self._commits += 1
        self._committed += len(batch) - len(duplicates)
        for pending in batch:
            message = pending.message
            first = duplicates.get(message.id)
            if first is not None:
                self._duplicates += 1
                if pending.sender is not None:
                    ack = Ack(id=first, cid=message.cid, duplicate=True)
                    await self.hub.publish_to(pending.sender, message.room, ack)
                continue
            if pending.sender is not None and self.cluster is not None:
                self.cluster.send_message(message)
            await self.hub.publish(message.room, message.event())
            if pending.sender is not None:
                ack = Ack(id=message.id, cid=message.cid)
                await self.hub.publish_to(pending.sender, message.room, ack)
        await trio.lowlevel.checkpoint()  # a batch of other nodes' duplicates awaits nothing

    async def deliver_remote(self, message: Message) -> None:
        """Store and broadcast a message another node accepted.

        Cancellation: a checkpoint; waits while the commit queue is full.
        """
        self.ids.witness(message.id)
        await self._commit_send.send(_Pending(message, None))

    async def replay(self, room: str, since: str | None) -> tuple[list[Message], bool]:
        """What a client joining ``room`` gets first, and whether it must reset.

        Without ``since``: the latest messages. With it: every message after it, up to
        the resume bound; past the bound, or for an id the room does not have, the
        latest messages and ``reset`` (the client reloads the room).
        """
        latest = self.settings.history_on_join
        if since is None:
            return await self.read_store(self.store.latest, room, latest), False
        if not await self.read_store(self.store.contains, room, since):
            return await self.read_store(self.store.latest, room, latest), True
        bound = self.settings.resume_max
        missed = await self.read_store(self.store.after, room, since, bound + 1)
        if len(missed) > bound:
            return await self.read_store(self.store.latest, room, latest), True
        return missed, False

    async def page(self, room: str, before: str | None, limit: int) -> tuple[list[Message], bool]:
        """A page of ``room``'s history older than ``before``, and whether more exist.

        Raises:
          ProtocolError: ``before`` is not a message of ``room`` (``unknown_id``).
        """
        if before is not None and not await self.read_store(self.store.contains, room, before):
            raise ProtocolError("unknown_id", f"{room!r} has no message {before!r}")
        messages = await self.read_store(self.store.before, room, before, limit + 1)
        return messages[-limit:], len(messages) > limit

    async def _write(self, messages: list[Message]) -> dict[str, str]:
        if self.store.blocking:
            return await trio.to_thread.run_sync(
                self.store.write, messages, limiter=self._write_limiter
            )
        # Before the write, as the thread's start is: once written, the caller must learn it.
        await trio.lowlevel.checkpoint()
        return self.store.write(messages)

    async def read_store(self, fn: Callable[[*_Args], _R], *args: *_Args) -> _R:
        """Call the store's read method ``fn`` off the event loop.

        Raises:
          StoreError: the store failed (counted and logged here); refuse that request.
        """
        try:
            if self.store.blocking:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)
            await trio.lowlevel.checkpoint()
            return fn(*args)
        except StoreError as exc:
            self._store_failed("read", exc)
            raise

    def _store_failed(self, op: str, exc: StoreError) -> None:
        """Count a failed store operation; log it, at most once a `_STORE_LOG_INTERVAL`.

        A failure of every request while the disk is full must not fill the rest of it
        with log lines; a write failure that takes the store down is always logged.
        """
        self._store_failures[op] += 1
        going_down = op == "write" and self.store_up
        if going_down:
            self.store_up = False
        now = time.monotonic()
        if not going_down and now - self._store_logged_at < _STORE_LOG_INTERVAL:
            self._store_unlogged += 1
            return
        skipped, self._store_unlogged = self._store_unlogged, 0
        self._store_logged_at = now
        log.error(
            "store %s failed%s: %s%s",
            op,
            " (degraded: refusing sends until a write succeeds)" if going_down else "",
            exc,
            f" ({skipped} more store failures not logged)" if skipped else "",
        )

    # -- accounting ---------------------------------------------------------------------

    def count_slow(self) -> None:
        """Count a client closed as slow by a ``/ws`` transport or by its session (lag
        held during a join); the chat socket's write path counts its own."""
        self._fallback_slow += 1

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def statistics(self) -> NodeStatistics:
        return NodeStatistics(
            connections=len(self.sessions),
            messages_in=self._messages_in,
            commits=self._commits,
            committed=self._committed,
            duplicates=self._duplicates,
            slow_disconnects=self._fallback_slow + self.chat_socket.statistics().slow_closes,
            errors=dict(self.errors),
            store_up=self.store_up,
            store_failures=dict(self._store_failures),
        )

    # -- running ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the hub, the commit task, the cluster link and the chat socket until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hub.run)
            nursery.start_soon(self._run_commits)
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
