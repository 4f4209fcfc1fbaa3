"""History: accepting messages, group commit, replay and paging, the store's threads.

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
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, TypeVar, TypeVarTuple

import trio

from .._errors import ProtocolError, StoreError
from ..protocol._wire import Ack, Deleted, ErrorEvent, Send, store_unavailable
from ..server._hub import Item
from ._store import Message

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..protocol._ids import IdClock
    from ..server._hub import Hub
    from ..server._ports import Member
    from ..settings._settings import Settings
    from ._api_sender import ApiSender
    from ._store import Store

log = logging.getLogger("trio_chat.node")

_Args = TypeVarTuple("_Args")
_R = TypeVar("_R")

# Reads of messages accepted but not yet committed (an item is one socket read's sends,
# at most 64 KiB of frames, or one peer's message): at most ~128 MiB of them. A full
# channel makes senders wait, which pushes back on their sockets while the disk catches up.
_COMMIT_QUEUE: Final = 2048
# Most messages per transaction, give or take one item: bounds one commit's latency.
_MAX_COMMIT_BATCH: Final = 2000
#: Seconds from a failed commit to the next attempt; doubled after each failure.
RETRY_FIRST: Final = 0.1
#: The longest wait between two attempts while the store keeps failing.
RETRY_MAX: Final = 5.0
# Store failures are logged at most this often (seconds), with how many were not.
_STORE_LOG_INTERVAL: Final = 60.0


class MessageOut(Protocol):
    """Where a committed local message goes to peers (`_cluster.Broadcaster`)."""

    def send_message(self, message: Message) -> None: ...

    def send_delete(self, room: str, message_id: str) -> None: ...


@dataclasses.dataclass(slots=True)
class _Pending:
    message: Message
    #: The local session that sent it; None for a message from another node.
    sender: Member | None
    #: In the store already: a worker of this host sharing it committed it and sent it.
    stored: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """What a client joining a room gets first (`History.replay`)."""

    #: Oldest first.
    messages: list[Message]
    #: The client's ``since`` is unknown or too old: it must clear the room first.
    reset: bool
    #: The room holds messages older than the oldest of ``messages``. Always True on a
    #: resume: the client's ``since`` is one of them.
    more: bool


class _SharedRead:
    """One read of a room's latest messages, and who waits for it."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: The messages; None if the read failed or was cancelled.
        self.result: list[Message] | None = None


class History:
    """The node's messages: accepted, committed, broadcast, read back.

    Args:
      settings: the replay and resume bounds.
      store: the history engine.
      hub: where committed messages and acks go.
      ids: this node's message id clock.
      peers: where committed local messages go, or None without a cluster.
      count_error: counts a refusal by its code.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hub: Hub,
        ids: IdClock,
        peers: MessageOut | None,
        count_error: Callable[[str], None],
    ) -> None:
        self.store = store
        self._settings = settings
        self._hub = hub
        self._ids = ids
        self._peers = peers
        self._count_error = count_error
        self._commit_send, self._commit_receive = trio.open_memory_channel[list[_Pending]](
            _COMMIT_QUEUE
        )
        self._read_limiter = trio.CapacityLimiter(1)
        #: Reads of a room's latest page not begun yet, that joiners share (`_latest`).
        self._latest_reads: dict[tuple[str, int], _SharedRead] = {}
        self._write_limiter = trio.CapacityLimiter(1)
        self.messages_in = 0
        self.commits = 0
        self.committed = 0
        self.duplicates = 0
        #: False from a failed write until a write succeeds again (``/healthz``).
        self.store_up = True
        #: Store operations that failed, by ``"write"`` / ``"read"``.
        self.store_failures: collections.Counter[str] = collections.Counter()
        # While the store is down: when the commit task tries again (trio time).
        self._retry_at = 0.0
        self._store_logged_at = -_STORE_LOG_INTERVAL
        self._store_unlogged = 0

    # -- accepting ----------------------------------------------------------------------

    async def submit(self, member: Member, commands: list[Send]) -> None:
        """Accept a client's messages (one read's): id them, queue them for commit as one
        item. Each ack follows its commit.

        Cancellation: a checkpoint; waits while the commit queue is full. If cancelled
        no message was accepted (no ack is sent; the client retries with its cids).

        Raises:
          StoreError: the store is down and its next attempt is not due yet.
        """
        self.messages_in += len(commands)
        if not self.store_up and trio.current_time() < self._retry_at:
            await trio.lowlevel.checkpoint()
            raise StoreError("the store is down; the next attempt is not due yet")
        # One clock read for the batch: its messages are accepted in the same instant.
        now_ns = time.time_ns()
        ts, millis = now_ns / 1e9, now_ns // 1_000_000
        name, uid, next_id = member.name, member.uid, self._ids.next_id
        # A retried cid is caught by the store, in the commit's own transaction: no
        # lookup per send, and two copies arriving together cannot both be stored.
        batch = [
            _Pending(
                Message(
                    id=next_id(millis),
                    room=command.room,
                    sender=name,
                    uid=uid,
                    text=command.text,
                    ts=ts,
                    cid=command.cid,
                    dedupe=None if command.cid is None else member.retry_key(command.cid),
                ),
                member,
            )
            for command in commands
        ]
        await self._commit_send.send(batch)

    async def publish(self, sender: ApiSender, command: Send) -> Ack | ErrorEvent:
        """Accept a message from the server API and wait for its commit's answer.

        Raises:
          StoreError: as `submit`.
        """
        await self.submit(sender, [command])
        await sender.answered.wait()
        assert sender.answer is not None
        return sender.answer

    def submit_would_wait(self) -> bool:
        """Whether `submit` would wait now: the commit queue is full (the store is behind)."""
        stats = self._commit_send.statistics()
        return stats.current_buffer_used >= stats.max_buffer_size

    async def deliver_remote(self, messages: list[Message], *, live: bool = False) -> None:
        """Store and broadcast messages other nodes accepted, in order: one commit item,
        so a run that arrived together is one commit and one hub item.

        Args:
          live: they came from the bus, so each was in its sender's store before it was
            sent: those of a worker of this host that shares our store (SQLite) are
            broadcast without being written again (a heal writes them, in case the store
            lost them).

        Cancellation: a checkpoint; waits while the commit queue is full.
        """
        pending = []
        for message in messages:
            self._ids.witness(message.id)
            stored = live and self._shares_store(message.origin)
            pending.append(_Pending(message, None, stored))
        await self._commit_send.send(pending)

    def _shares_store(self, origin: str) -> bool:
        """Whether node ``origin`` writes to our store: ``<host id>-<slot>``, our host's."""
        host, dash, _ = origin.rpartition("-")
        ours, our_dash, _ = self._ids.node_id.rpartition("-")
        return self.store.shared_by_workers and bool(dash and our_dash) and host == ours

    # -- deleting -----------------------------------------------------------------------

    async def delete(self, room: str, message_id: str) -> bool:
        """Tombstone a stored message of ``room``; tell the room's members and the peers.

        Returns:
          Whether it was deleted now; False if it already was (nothing is sent again).

        Raises:
          ProtocolError: ``room`` has no message ``message_id`` (``unknown_id``).
          StoreError: the store failed; nothing was deleted.
        """
        if not await self.read_store(self.store.contains, room, message_id):
            raise ProtocolError("unknown_id", f"{room!r} has no message {message_id!r}")
        if not await self._tombstone(room, message_id):
            return False
        if self._peers is not None:
            self._peers.send_delete(room, message_id)
        await self._hub.publish(room, Deleted(room=room, id=message_id))
        return True

    async def deliver_remote_delete(self, room: str, message_id: str) -> None:
        """Store a peer's tombstone and tell this node's members of ``room``.

        They are told even if the tombstone was already stored: workers of one host share
        the store, and the worker that deleted told only its own clients.
        """
        # A failure is counted and logged. The clients here still hear of the delete, but
        # this node's store reads the message back undeleted: a known limit (docs/auth.md).
        with contextlib.suppress(StoreError):
            await self._tombstone(room, message_id)
        await self._hub.publish(room, Deleted(room=room, id=message_id))

    async def _tombstone(self, room: str, message_id: str) -> bool:
        try:
            if self.store.blocking:
                return await trio.to_thread.run_sync(
                    self.store.tombstone, room, message_id, limiter=self._write_limiter
                )
            await trio.lowlevel.checkpoint()
            return self.store.tombstone(room, message_id)
        except StoreError as exc:
            self._store_failed("tombstone", exc)
            raise

    # -- committing ---------------------------------------------------------------------

    async def run_commits(self) -> NoReturn:
        """The group commit task: a node task, it runs until cancelled."""
        # Other nodes' messages from a failed commit: written first at the next attempt.
        held: list[_Pending] = []
        delay = RETRY_FIRST
        while True:
            if held:
                await trio.sleep_until(self._retry_at)
                batch, held = held, []
            else:
                batch = list(await self._commit_receive.receive())
            while len(batch) < _MAX_COMMIT_BATCH:
                try:
                    batch.extend(self._commit_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                duplicates = await self._write([p.message for p in batch if not p.stored])
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
        refusals = []
        for pending in batch:
            message = pending.message
            if pending.sender is None:
                held.append(pending)
                continue
            self._count_error("store_unavailable")
            refusal = store_unavailable(message.room, message.cid)
            refusals.append(Item(message.room, refusal, only=pending.sender))
        if refusals:
            await self._hub.publish_many(refusals)
        else:
            await trio.lowlevel.checkpoint()  # other nodes' messages only: nothing awaited
        return held

    async def _publish_commit(self, batch: list[_Pending], duplicates: dict[str, str]) -> None:
        """Broadcast, forward and ack what one commit stored, in order: one hub item."""
        self.commits += 1
        self.committed += len(batch) - len(duplicates)
        items = []
        for pending in batch:
            message = pending.message
            first = duplicates.get(message.id)
            if first is not None:
                self.duplicates += 1
                if pending.sender is not None:
                    ack = Ack(id=first, cid=message.cid, duplicate=True)
                    items.append(Item(message.room, ack, only=pending.sender))
                continue
            if pending.sender is not None and self._peers is not None:
                self._peers.send_message(message)
            items.append(Item(message.room, message.event()))
            if pending.sender is not None:
                ack = Ack(id=message.id, cid=message.cid)
                items.append(Item(message.room, ack, only=pending.sender))
        if items:
            await self._hub.publish_many(items)
        else:
            await trio.lowlevel.checkpoint()  # a batch of other nodes' duplicates awaits nothing

    # -- reading ------------------------------------------------------------------------

    async def replay(self, room: str, since: str | None) -> Replay:
        """What a client joining ``room`` gets first.

        Without ``since``: the latest messages. With it: every message after it, up to
        the resume bound; past the bound, or for an id the room does not have, the
        latest messages and ``reset`` (the client reloads the room).
        """
        reset = since is not None
        if since is not None and await self.read_store(self.store.contains, room, since):
            bound = self._settings.resume_max
            missed = await self.read_store(self.store.after, room, since, bound + 1)
            if len(missed) <= bound:
                return Replay(missed, reset=False, more=True)
        latest = self._settings.history_on_join
        # One more than the page: whether it exists is whether older history does.
        newest = await self._latest(room, latest + 1)
        more = len(newest) > latest
        return Replay(newest[1:] if more else newest, reset=reset, more=more)

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
        if not messages:
            # All in the store already (`_Pending.stored`): nothing to write.
            await trio.lowlevel.checkpoint()
            return {}
        if self.store.blocking:
            return await trio.to_thread.run_sync(
                self.store.write, messages, limiter=self._write_limiter
            )
        # Before the write, as the thread's start is: once written, the caller must learn it.
        await trio.lowlevel.checkpoint()
        return self.store.write(messages)

    async def _latest(self, room: str, limit: int) -> list[Message]:
        """``store.latest(room, limit)``, read once for every join that asks before the
        read begins.

        A join storm into one room would otherwise cost a thread round trip per join, one
        join at a time (reads take turns). Sharing misses nothing: each joiner subscribed
        to the room before it asked, so a read that begins later holds every message
        committed before its live stream starts (what both carry, the session drops).

        Cancellation: a waiter's cancel leaves the read to the others; if the reader is
        cancelled or the store fails, each waiter asks again.
        """
        key = (room, limit)
        shared = self._latest_reads.get(key)
        if shared is not None:
            await shared.done.wait()
            if shared.result is not None:
                return shared.result
            return await self._latest(room, limit)
        shared = self._latest_reads[key] = _SharedRead()

        def started() -> None:
            # Who asks from now on needs a read that begins after they subscribed.
            del self._latest_reads[key]

        try:
            shared.result = await self.read_store(self.store.latest, room, limit, started=started)
        finally:
            if self._latest_reads.get(key) is shared:
                del self._latest_reads[key]
            shared.done.set()
        return shared.result

    async def read_store(
        self,
        fn: Callable[[*_Args], _R],
        *args: *_Args,
        started: Callable[[], None] | None = None,
    ) -> _R:
        """Call the store's read method ``fn`` off the event loop; ``started`` is called
        when its turn comes (reads take turns), just before it begins.

        Raises:
          StoreError: the store failed (counted and logged here); refuse that request.
        """
        try:
            if self.store.blocking:
                async with self._read_limiter:
                    if started is not None:
                        started()
                    # One read at a time (the limiter): the default thread limiter is free.
                    return await trio.to_thread.run_sync(fn, *args)
            if started is not None:
                started()
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
        self.store_failures[op] += 1
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
