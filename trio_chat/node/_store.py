"""Message history: an embedded SQLite store (the default) and an in-memory one.

Both are synchronous and called off the event loop (`trio.to_thread`) by the node's
commit task, which batches what is waiting into one `Store.write` call: one transaction
for many messages (group commit). Inserts are idempotent on the message id, so every
process of a host may write every message it sees into one shared file.

A store that fails (disk full, I/O error, a lock held too long, a corrupt page) raises
`StoreError`, and only that: the node then degrades (refuses that request, retries its
writes) instead of stopping. Every other exception is a bug.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import sqlite3
import threading
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from .._errors import StoreError
from ..protocol._wire import MessageEvent

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class Message(msgspec.Struct, frozen=True, array_like=True):
    """A chat message as stored and as sent between cluster peers."""

    id: str
    room: str
    sender: str
    text: str
    ts: float
    cid: str | None = None
    #: ``<requested name>\\0<cid>``: finds a retried send, whichever connection it came on.
    dedupe: str | None = None
    # Fields added later go at the end with a default, so peers of an older version
    # still decode them: ``deleted`` (i11-api) came first, then ``uid`` (i11-auth).
    #: Tombstoned (``DELETE /api/rooms/<room>/messages/<id>``): read back without text.
    deleted: bool = False
    #: jwt mode: the sender's ``sub``.
    uid: str | None = None

    @property
    def origin(self) -> str:
        """The node that accepted the message (the id's suffix)."""
        return self.id[17:]

    def event(self) -> MessageEvent:
        if self.deleted:
            return MessageEvent(
                room=self.room,
                id=self.id,
                sender=self.sender,
                ts=self.ts,
                uid=self.uid,
                deleted=True,
            )
        return MessageEvent(
            room=self.room,
            id=self.id,
            sender=self.sender,
            text=self.text,
            ts=self.ts,
            cid=self.cid,
            uid=self.uid,
        )


class Store(Protocol):
    """What the node needs from a history engine. Every method may block (disk I/O).

    Every method but `close` raises `StoreError` when the engine fails; a failed `write`
    stored none of its messages.
    """

    #: Whether calls must go to a worker thread.
    blocking: bool
    #: Whether every worker of the host uses this same history (its data dir's file).
    shared_by_workers: bool

    def write(self, messages: list[Message]) -> dict[str, str]:
        """Insert ``messages`` in one transaction, ignoring ids already present.

        Returns:
          For each message not stored because another one already has its dedupe key
          (a retried send), its id mapped to the id of the one stored first.
        """

    def latest(self, room: str, limit: int) -> list[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""

    def after(self, room: str, since: str, limit: int) -> list[Message]:
        """Up to ``limit`` messages of ``room`` with ids above ``since``, oldest first."""

    def before(self, room: str, before: str | None, limit: int) -> list[Message]:
        """Up to ``limit`` messages of ``room`` with ids below ``before``, oldest first."""

    def contains(self, room: str, message_id: str) -> bool:
        """Whether ``room`` has the message ``message_id``."""

    def from_origin(self, origin: str, after: str, limit: int) -> list[Message]:
        """Up to ``limit`` messages accepted by node ``origin`` with ids above ``after``."""

    def tombstone(self, room: str, message_id: str) -> bool:
        """Mark ``message_id`` of ``room`` deleted, whether or not it is stored yet (a
        peer's delete may arrive before the message). Whether it was not marked before.
        """

    def newest_from(self, origin: str) -> str | None:
        """The newest id stored from node ``origin``, if any."""

    def close(self) -> None:
        """Release the engine's resources."""


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    room TEXT NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    ts REAL NOT NULL,
    cid TEXT,
    dedupe TEXT,
    origin TEXT NOT NULL,
    uid TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_room ON messages (room, id);
CREATE INDEX IF NOT EXISTS messages_origin ON messages (origin, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe_key ON messages (dedupe) WHERE dedupe IS NOT NULL;
"""
_COLUMNS: Final = (
    "id, room, sender, CASE WHEN EXISTS (SELECT 1 FROM tombstones t WHERE t.id = messages.id)"
    " THEN '' ELSE text END, ts, cid, dedupe,"
    " EXISTS (SELECT 1 FROM tombstones t WHERE t.id = messages.id), uid"
)
_TOMBSTONE: Final = "INSERT OR IGNORE INTO tombstones VALUES (?, ?)"


def _row(m: Message) -> tuple[object, ...]:
    return (m.id, m.room, m.sender, m.text, m.ts, m.cid, m.dedupe, m.origin, m.uid)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file made by an older version to the current schema."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    if "uid" not in columns:
        # Files from before jwt mode: their messages have no uid (NULL).
        db.execute("ALTER TABLE messages ADD COLUMN uid TEXT")
    # Deleted messages. A table of its own, so files from before deletes get it here, and
    # a tombstone can be stored before the message it deletes arrives from its node.
    db.execute(
        "CREATE TABLE IF NOT EXISTS tombstones (id TEXT PRIMARY KEY, room TEXT NOT NULL)"
        " WITHOUT ROWID"
    )


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Translate SQLite's failures into the node's one `StoreError`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{type(exc).__name__}: {exc}") from exc


class SqliteStore:
    """History in one SQLite file in WAL mode.

    ``synchronous=NORMAL`` in WAL mode keeps every committed transaction through a crash
    of the process (SIGKILL included); only a power loss may take the newest ones.
    Writes and reads use separate connections, each used by one thread at a time.

    Args:
      path: the database file; its folder is created if needed.
      factory: the `sqlite3.Connection` class to open it with (tests inject faults here).
    """

    blocking = True
    shared_by_workers = True

    def __init__(
        self, path: Path, *, factory: type[sqlite3.Connection] = sqlite3.Connection
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._factory = factory
        # Workers starting together would race to switch a new file to WAL, and SQLite
        # answers that race with "database is locked" at once, whatever the timeout.
        with open(path.with_name(path.name + ".init-lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
            _migrate(self._writer)
        self._reader = self._connect()
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        # Workers of one host share the file: wait for each other's locks.
        conn = sqlite3.connect(
            self.path,
            timeout=30,
            check_same_thread=False,
            isolation_level=None,
            factory=self._factory,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def write(self, messages: list[Message]) -> dict[str, str]:
        insert = "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        duplicates: dict[str, str] = {}
        with self._write_lock, _engine_errors():
            db = self._writer
            # A ROLLBACK that failed (an I/O error) can leave the last transaction open:
            # end it first, or no write would ever succeed again.
            _rollback(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                inserted = db.executemany(insert, [_row(m) for m in messages]).rowcount
                # Some were not inserted (ids already stored, or taken dedupe keys): a send
                # whose key is taken must learn the first one's id.
                for m in messages if inserted < len(messages) else ():
                    if m.dedupe is not None:
                        found = db.execute(
                            "SELECT id FROM messages WHERE dedupe = ?", (m.dedupe,)
                        ).fetchone()
                        if found is not None and found[0] != m.id:
                            duplicates[m.id] = found[0]
                # A deleted message healed from a peer keeps its tombstone.
                db.executemany(_TOMBSTONE, [(m.id, m.room) for m in messages if m.deleted])
                # In WAL mode the pages reach the disk here: a full disk fails the COMMIT,
                # which leaves the transaction open.
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return duplicates

    def _query(self, sql: str, args: tuple[object, ...]) -> list[Message]:
        with self._read_lock, _engine_errors():
            rows = self._reader.execute(sql, args).fetchall()
        # SQLite answers EXISTS with 0 or 1: peers decode the flag as a bool.
        return [
            Message(id_, room, sender, text, ts, cid, dedupe, bool(deleted), uid)
            for id_, room, sender, text, ts, cid, dedupe, deleted, uid in rows
        ]

    def latest(self, room: str, limit: int) -> list[Message]:
        return self.before(room, None, limit)

    def after(self, room: str, since: str, limit: int) -> list[Message]:
        return self._query(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND id > ? ORDER BY id LIMIT ?",
            (room, since, limit),
        )

    def before(self, room: str, before: str | None, limit: int) -> list[Message]:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (room, before if before is not None else "~", limit),
        )
        rows.reverse()
        return rows

    def contains(self, room: str, message_id: str) -> bool:
        with self._read_lock, _engine_errors():
            row = self._reader.execute(
                "SELECT 1 FROM messages WHERE id = ? AND room = ?", (message_id, room)
            ).fetchone()
        return row is not None

    def from_origin(self, origin: str, after: str, limit: int) -> list[Message]:
        return self._query(
            f"SELECT {_COLUMNS} FROM messages WHERE origin = ? AND id > ? ORDER BY id LIMIT ?",
            (origin, after, limit),
        )

    def newest_from(self, origin: str) -> str | None:
        with self._read_lock, _engine_errors():
            row = self._reader.execute(
                "SELECT max(id) FROM messages WHERE origin = ?", (origin,)
            ).fetchone()
        return None if row[0] is None else str(row[0])

    def tombstone(self, room: str, message_id: str) -> bool:
        with self._write_lock, _engine_errors():
            _rollback(self._writer)
            return self._writer.execute(_TOMBSTONE, (message_id, room)).rowcount == 1

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


def _rollback(db: sqlite3.Connection) -> None:
    """End the open transaction, if any (SQLite rolls some failures back by itself)."""
    if db.in_transaction:
        db.execute("ROLLBACK")


class MemoryStore:
    """History in this process's memory: fast, and gone when it exits."""

    blocking = False
    shared_by_workers = False

    def __init__(self) -> None:
        self._rooms: dict[str, list[Message]] = {}
        self._ids: set[str] = set()
        self._dedupe: dict[str, Message] = {}
        self._tombstones: set[str] = set()

    def write(self, messages: list[Message]) -> dict[str, str]:
        duplicates: dict[str, str] = {}
        for m in messages:
            if m.id in self._ids:
                continue
            if m.dedupe is not None:
                first = self._dedupe.setdefault(m.dedupe, m)
                if first is not m:
                    duplicates[m.id] = first.id
                    continue
            self._ids.add(m.id)
            if m.deleted:
                self._tombstones.add(m.id)
            room = self._rooms.setdefault(m.room, [])
            if not room or room[-1].id < m.id:
                room.append(m)
            else:
                bisect.insort(room, m, key=lambda x: x.id)
        return duplicates

    def latest(self, room: str, limit: int) -> list[Message]:
        return self.before(room, None, limit)

    def after(self, room: str, since: str, limit: int) -> list[Message]:
        msgs = self._rooms.get(room, [])
        start = bisect.bisect_right(msgs, since, key=lambda x: x.id)
        return self._marked(msgs[start : start + limit])

    def before(self, room: str, before: str | None, limit: int) -> list[Message]:
        msgs = self._rooms.get(room, [])
        end = len(msgs) if before is None else bisect.bisect_left(msgs, before, key=lambda x: x.id)
        return self._marked(msgs[max(0, end - limit) : end])

    def _marked(self, messages: list[Message]) -> list[Message]:
        """``messages``, the tombstoned ones as the SQLite store reads them back."""
        return [
            msgspec.structs.replace(m, text="", deleted=True)
            if m.id in self._tombstones and not m.deleted
            else m
            for m in messages
        ]

    def tombstone(self, room: str, message_id: str) -> bool:
        if message_id in self._tombstones:
            return False
        self._tombstones.add(message_id)
        return True

    def contains(self, room: str, message_id: str) -> bool:
        msgs = self._rooms.get(room, [])
        i = bisect.bisect_left(msgs, message_id, key=lambda x: x.id)
        return i < len(msgs) and msgs[i].id == message_id

    def from_origin(self, origin: str, after: str, limit: int) -> list[Message]:
        found = sorted(
            (
                m
                for msgs in self._rooms.values()
                for m in msgs
                if m.origin == origin and m.id > after
            ),
            key=lambda x: x.id,
        )
        return self._marked(found[:limit])

    def newest_from(self, origin: str) -> str | None:
        return max(
            (m.id for msgs in self._rooms.values() for m in msgs if m.origin == origin),
            default=None,
        )

    def close(self) -> None:
        self._rooms.clear()
