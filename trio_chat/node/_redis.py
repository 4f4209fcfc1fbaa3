"""Redis Streams as a `Bus`: the cluster beyond one LAN (DESIGN.md §6, issue 13).

Messages: what this node committed goes to one stream (``XADD ... MAXLEN ~``), an entry
per write batch (`_redis_stream`); each node reads it with ``XREAD BLOCK`` from the last
entry it processed (kept in its data dir), skipping its own. While Redis is away the node
chats on: what it could not add waits in a bounded queue, past which it is re-read from
the store (committed before sent) when Redis is back, so no acked message is lost. A read
that starts past the trimmed tail lost entries: a `Gap` for each live peer.

Presence: a key ``<prefix>:node:<id>`` per node with a TTL; one that appears is `PeerUp`,
one that expires `PeerDown`. Members, their changes and typing go to a short stream, read
from its tail at connect: lost while a node is away (snapshots repair it). Not pub/sub:
coredis 6.9's PubSub fails its cleanup when cancelled under trio (docs/cluster.md).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING, Final, NoReturn

import coredis
import coredis.exceptions
import msgspec
import trio

from ..settings._kinds import redact_url
from ._bus import BusEvent, Gap, Payload, PeerDown, PeerUp
from ._cluster import RemoteMessage, decode_body
from ._peer_http import fetch_from_peers
from ._redis_stream import (
    MalformedEntry,
    id_key,
    load_position,
    pack,
    save_position,
    text,
    unpack,
)
from ._redis_tls import certificate_failure, leaf_error, redis_client, tls_context

if TYPE_CHECKING:
    from pathlib import Path

    from coredis.response.types import StreamEntry

    from ._store import Message, Store

log = logging.getLogger("trio_chat.cluster")
# coredis logs each connect retry at INFO; the bus says once that Redis is away.
logging.getLogger("coredis").setLevel(logging.WARNING)

#: A node whose key is this old is dead (issue 13: members leave within 10 s).
PRESENCE_TTL: Final = 6.0
# Entries one XREAD asks for; a full batch means the reader is behind.
_READ_BATCH: Final = 500
#: Payloads one write takes from the queue, into one entry: one XADD of five payloads
#: cost ~420 µs of CPU, a pipeline of five XADDs ~770 µs.
WRITE_BATCH: Final = 500
# After a round that moved entries, the writer and the reader wait this long: at high
# rates the next XADD or XREAD then carries a batch (a coredis command costs a worker
# ~500 µs of CPU); at low rates nothing waits. 1 ms, not 2: see docs/benchmarks.md.
_LINGER: Final = 0.001
# How long one XREAD blocks, in ms: short enough that a cancelled read ends soon.
_READ_BLOCK_MS: Final = 1000
#: Messages waiting for Redis; past this they are re-read from the store instead.
QUEUE_MAX: Final = 10_000
# Ephemeral payloads (presence, typing) waiting to be added; dropped past this. Also the
# ephemeral stream's MAXLEN: enough for every node's burst between two reads.
_EPHEMERAL_MAX: Final = 1000
# Reconnect backoff, doubled up to the max.
_RETRY_FIRST: Final = 0.2
_RETRY_MAX: Final = 10.0
# Own messages re-read from the store per page after an overflow.
_BACKLOG_PAGE: Final = 500
_REDIS_ERRORS: Final = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)
#: The key prefix of a cluster (``<prefix>:messages``, ``<prefix>:node:<id>``).
PREFIX: Final = "trio-chat"
#: A node key's value: (incarnation, HTTP URL).
key_value: Final = msgspec.msgpack.Decoder(tuple[int, str])
_encoder: Final = msgspec.msgpack.Encoder()


class RedisBus:
    """A `Bus` over Redis Streams (messages; presence and typing) and keys with a TTL (peers).

    Args:
      url: the Redis URL (may hold a password: logged only through `redact_url`).
      node_id, incarnation, http_url: this node, as its peers see it.
      secret: the cluster secret, which signs heal requests.
      store: this node's store (its own messages are re-read from it after an overflow).
      state_dir: where the last processed stream id is kept.
      stream_max: the stream's ``MAXLEN ~``.
      prefix: names the keys; each cluster one.
      presence_ttl: a node silent this long is down.
      queue_max: own messages kept in memory while Redis is away (then the store).
      write_batch: own messages one write takes from the queue, into one entry.

    Raises:
      ConfigError: a TLS file the ``rediss://`` URL names cannot be loaded.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        incarnation: int,
        http_url: str,
        secret: bytes,
        store: Store,
        state_dir: Path,
        stream_max: int,
        prefix: str = PREFIX,
        presence_ttl: float = PRESENCE_TTL,
        queue_max: int = QUEUE_MAX,
        write_batch: int = WRITE_BATCH,
    ) -> None:
        self._url = url
        self._tls = tls_context(url)
        self._node_id = node_id
        self._incarnation = incarnation
        self._http_url = http_url
        self._secret = secret
        self._store = store
        self._stream_max = stream_max
        self._stream = f"{prefix}:messages"
        self._ephemeral_stream = f"{prefix}:ephemeral"
        self._key_prefix = f"{prefix}:node:"
        self._ttl = presence_ttl
        self._queue_max = queue_max
        self._write_batch = write_batch
        self._id_file = state_dir / f"redis-{node_id}.stream-id"
        #: The last stream entry processed (kept in ``_id_file``); "$": none yet.
        self._last_id = load_position(self._id_file)
        #: The last stream entry read (where the next XREAD starts).
        self._read_through = self._last_id
        #: The last ephemeral entry read; from the stream's tail at each connect.
        self._ephemeral_through = "0-0"
        self._saved_at = 0.0
        #: The newest entry id handed out (`receive`, `receive_nowait`): processed when
        #: the cluster calls `receive` again.
        self._handed: str | None = None
        #: Own messages committed, not yet in the stream: (message id, payload).
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        #: Set when the queue overflowed: its oldest message, and own messages after it
        #: come from the store.
        self._backlog: tuple[str, bytes] | None = None
        self._overflows = 0
        #: The newest own message id added to the stream.
        self._added_through = ""
        self._ephemeral: collections.deque[bytes] = collections.deque(maxlen=_EPHEMERAL_MAX)
        self._wake = trio.Event()
        # Events wait here for `receive`; bounded: the reader waits, Redis keeps the rest.
        self._events_in, self._events = trio.open_memory_channel[tuple[BusEvent, str | None]](
            _READ_BATCH
        )
        #: Live peers: node id -> (incarnation, HTTP URL).
        self._peers: dict[str, tuple[int, str]] = {}
        self._connected = False
        #: Whether this outage was logged: once at WARNING, each retry at DEBUG.
        self._outage_logged = False
        self._stats = collections.Counter[str](
            redis_stream_lag_ms=0,
            redis_reconnects=0,
            redis_spilled=0,
            redis_heals=0,
            redis_malformed=0,
        )

    # -- the Bus ------------------------------------------------------------------------

    @property
    def heal_secret(self) -> bytes:
        return self._secret

    def send(self, payload: bytes) -> None:
        body = decode_body(payload)
        if isinstance(body, RemoteMessage):
            if len(self._queue) >= self._queue_max:
                # Every one of them is in the store (committed before sent): the oldest
                # is kept, the rest re-read from the store after it.
                if self._backlog is None:
                    self._backlog = self._queue[0]
                    log.warning(
                        "%d messages wait for Redis: the rest will be re-read from the store",
                        self._queue_max,
                    )
                self._overflows += 1
                self._stats["redis_spilled"] += len(self._queue)
                self._queue.clear()
            self._queue.append((body.message.id, payload))
        elif self._connected:
            self._ephemeral.append(payload)
        self._wake.set()

    async def receive(self) -> BusEvent:
        if self._handed is not None:
            self._last_id = self._handed
            self._handed = None
        return self._hand(await self._events.receive())

    def receive_nowait(self) -> BusEvent:
        return self._hand(self._events.receive_nowait())

    def _hand(self, item: tuple[BusEvent, str | None]) -> BusEvent:
        event, stream_id = item
        if stream_id is not None:
            self._handed = stream_id
        return event

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        peers = [(node, url) for node, (_, url) in self._peers.items()]
        return await fetch_from_peers(self._secret, peers, origin, after, limit)

    def peers(self) -> dict[str, str]:
        """The live peers (their keys have not expired) and their HTTP addresses."""
        return {node: url for node, (_, url) in self._peers.items()}

    def statistics(self) -> dict[str, int]:
        counts = dict(self._stats)
        counts.update(
            redis_connected=int(self._connected),
            redis_queued=len(self._queue),
            peers=len(self._peers),
        )
        return counts

    # -- running ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Connect, and again with backoff whenever Redis goes; local chat never waits."""
        task_status.started()
        shown = redact_url(self._url)
        delay = _RETRY_FIRST
        try:
            while True:
                try:
                    await self._connect_and_serve(shown)
                except* coredis.exceptions.AuthenticationError as group:
                    log.error(
                        "Redis at %s refused the credentials in TRIO_CHAT_REDIS_URL (%s):"
                        " chatting locally, retrying every %g s",
                        shown,
                        leaf_error(group),
                        _RETRY_MAX,
                    )
                    delay = _RETRY_MAX
                except* _REDIS_ERRORS as group:
                    untrusted = certificate_failure(leaf_error(group))
                    if untrusted is not None:
                        log.error(
                            "Redis at %s (TRIO_CHAT_REDIS_URL) sent a TLS certificate that"
                            " failed the check (%s): name the CA that signed it in the URL,"
                            " ?ssl_ca_certs=FILE; chatting locally, retrying every %g s",
                            shown,
                            untrusted.verify_message or untrusted,
                            _RETRY_MAX,
                        )
                        delay = _RETRY_MAX
                    else:
                        level = logging.DEBUG if self._outage_logged else logging.WARNING
                        log.log(
                            level,
                            "Redis at %s (TRIO_CHAT_REDIS_URL) is unreachable (%s): chatting"
                            " locally, queueing messages for it, retrying with backoff",
                            shown,
                            leaf_error(group),
                        )
                        self._outage_logged = True
                if self._connected:
                    self._connected = False
                    delay = _RETRY_FIRST
                self._stats["redis_reconnects"] += 1
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
        finally:
            self._save_last_id()

    async def _connect_and_serve(self, shown: str) -> NoReturn:
        client = redis_client(self._url, self._tls)
        async with client:
            await client.ping()
            log.info("connected to Redis at %s", shown)
            self._connected = True
            self._outage_logged = False
            if self._read_through == "$":
                self._read_through = await self._newest(client, self._stream)
            self._ephemeral_through = await self._newest(client, self._ephemeral_stream)
            self._wake.set()
            async with trio.open_nursery() as nursery:
                await self._heartbeat(client)
                await self._check_trimmed(client)
                nursery.start_soon(self._heartbeat_forever, client)
                nursery.start_soon(self._write_forever, client)
                nursery.start_soon(self._read_forever, client)
                await trio.sleep_forever()
        raise AssertionError("unreachable")

    @staticmethod
    async def _newest(client: coredis.Redis[bytes], stream: str) -> str:
        newest = await client.xrevrange(stream, "+", "-", count=1)
        return text(newest[0].identifier) if newest else "0-0"

    # -- presence -----------------------------------------------------------------------

    async def _heartbeat_forever(self, client: coredis.Redis[bytes]) -> NoReturn:
        while True:
            await trio.sleep(self._ttl / 3)
            await self._heartbeat(client)

    async def _heartbeat(self, client: coredis.Redis[bytes]) -> None:
        value = _encoder.encode((self._incarnation, self._http_url))
        px = int(self._ttl * 1000)
        await client.set(self._key_prefix + self._node_id, value, px=px)
        keys = [k async for k in client.scan_iter(match=self._key_prefix + "*", count=1000)]
        values = await client.mget(keys) if keys else ()
        now: dict[str, tuple[int, str]] = {}
        for key, raw in zip(keys, values, strict=True):
            node = key.decode()[len(self._key_prefix) :]
            if raw is None or node == self._node_id:
                continue
            try:
                now[node] = key_value.decode(raw)
            except msgspec.DecodeError:
                log.error("ignored the malformed Redis key %s", key.decode())
        for node in self._peers.keys() - now.keys():
            del self._peers[node]
            await self._events_in.send((PeerDown(node, "its Redis key expired"), None))
        for node, seen in now.items():
            known = self._peers.get(node)
            self._peers[node] = seen
            if known is None or known[0] != seen[0]:
                await self._events_in.send((PeerUp(node), None))

    # -- messages -----------------------------------------------------------------------

    async def _write_forever(self, client: coredis.Redis[bytes]) -> NoReturn:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._ephemeral:
                # Taken before they are sent: ephemeral, and lost if Redis goes meanwhile.
                count = min(len(self._ephemeral), self._write_batch)
                ephemeral = [self._ephemeral.popleft() for _ in range(count)]
                await self._add_to(client, self._ephemeral_stream, ephemeral, _EPHEMERAL_MAX)
            if self._backlog is not None:
                await self._add_backlog(client, self._backlog)
            # In order: after an overflow the backlog goes first, at the next round.
            while self._queue and self._backlog is None:
                batch = list(itertools.islice(self._queue, self._write_batch))
                await self._add(client, batch)
                # Unless an overflow cleared the queue meanwhile (the backlog has it): new
                # messages go at the end, so the batch is still its head.
                if self._queue and self._queue[0][0] == batch[0][0]:
                    for _ in batch:
                        self._queue.popleft()
            if self._backlog is not None:
                self._wake.set()
            await trio.sleep(_LINGER)

    async def _add_backlog(self, client: coredis.Redis[bytes], first: tuple[str, bytes]) -> None:
        after = first[0]
        await self._add(client, [first])
        while True:
            overflows = self._overflows
            if self._store.blocking:
                page = await trio.to_thread.run_sync(
                    self._store.from_origin, self._node_id, after, _BACKLOG_PAGE
                )
            else:
                await trio.lowlevel.checkpoint()
                page = self._store.from_origin(self._node_id, after, _BACKLOG_PAGE)
            if page:
                await self._add(client, [(m.id, _encoder.encode(RemoteMessage(m))) for m in page])
                after = page[-1].id
            if len(page) < _BACKLOG_PAGE and overflows == self._overflows:
                # Caught up: the queue holds everything sent since it was last cleared
                # (what the store gave too is skipped by id).
                self._backlog = None
                log.info("re-added the messages that overflowed the Redis queue")
                return

    async def _add(self, client: coredis.Redis[bytes], batch: list[tuple[str, bytes]]) -> None:
        """Add own messages, in order, skipping those already added (by id)."""
        fresh = [payload for message_id, payload in batch if message_id > self._added_through]
        if fresh:
            await self._add_to(client, self._stream, fresh, self._stream_max)
            self._added_through = batch[-1][0]
        else:
            await trio.lowlevel.checkpoint()

    async def _add_to(
        self, client: coredis.Redis[bytes], stream: str, payloads: list[bytes], maxlen: int
    ) -> None:
        """``XADD`` the payloads, in order, as few entries as hold them (`pack`), in one
        pipeline: one round trip for them all."""
        origin = self._node_id.encode()
        async with client.pipeline(transaction=False) as pipe:
            for fields in pack(origin, payloads):
                pipe.xadd(
                    stream,
                    fields,
                    trim_strategy=coredis.PureToken.MAXLEN,
                    threshold=maxlen,
                    trim_operator=coredis.PureToken.APPROXIMATELY,
                )

    async def _read_forever(self, client: coredis.Redis[bytes]) -> NoReturn:
        while True:
            response = await client.xread(
                {self._stream: self._read_through, self._ephemeral_stream: self._ephemeral_through},
                count=_READ_BATCH,
                block=_READ_BLOCK_MS,
            )
            items: list[tuple[BusEvent, str | None]] = []
            for entry in response.get(self._ephemeral_stream.encode(), ()) if response else ():
                self._ephemeral_through = text(entry.identifier)
                items.extend((Payload(o, data), None) for o, data in self._unpack(entry))
            entries = response.get(self._stream.encode(), ()) if response else ()
            for entry in entries:
                stream_id = text(entry.identifier)
                self._read_through = stream_id
                payloads = self._unpack(entry)
                # The position moves past the entry once its last payload is processed.
                for i, (origin, data) in enumerate(payloads, 1):
                    items.append((Payload(origin, data), stream_id if i == len(payloads) else None))
            # No yield while there is room: what one read brought is one run for the cluster.
            for item in items:
                try:
                    self._events_in.send_nowait(item)
                except trio.WouldBlock:
                    await self._events_in.send(item)
            if entries:
                newest = id_key(text(entries[-1].identifier))[0]
                self._stats["redis_stream_lag_ms"] = max(0, int(time.time() * 1000) - newest)
            else:
                self._stats["redis_stream_lag_ms"] = 0
                if self._handed is None and not self._events.statistics().current_buffer_used:
                    # All handed on and processed: own entries at the end count too.
                    self._last_id = self._read_through
            await self._save_last_id_soon()
            if len(entries) == _READ_BATCH:
                await self._check_trimmed(client)
            if response:
                await trio.sleep(_LINGER)

    def _unpack(self, entry: StreamEntry) -> list[tuple[str, bytes]]:
        """A peer's entry as (origin, payload) pairs; none for our own or a malformed one."""
        try:
            origin, payloads = unpack(entry)
        except MalformedEntry as exc:
            self._stats["redis_malformed"] += 1
            log.error(
                "skipped the malformed Redis stream entry %s (%s): a writer that is not a"
                " trio-chat node of this version shares the key prefix",
                text(entry.identifier),
                exc,
            )
            return []
        return [] if origin == self._node_id else [(origin, data) for data in payloads]

    async def _check_trimmed(self, client: coredis.Redis[bytes]) -> None:
        """Whether entries after the last one read were trimmed: a `Gap` for each peer if so."""
        position = self._read_through
        if position == "0-0":
            await trio.lowlevel.checkpoint()
            return
        first = await client.xrange(self._stream, "-", "+", count=1)
        if not first or id_key(text(first[0].identifier)) <= id_key(position):
            return
        self._stats["redis_heals"] += 1
        log.warning(
            "the Redis stream was trimmed past this node's position (%s, the oldest entry is %s):"
            " healing every peer's messages from history",
            position,
            text(first[0].identifier),
        )
        for node in self._peers:
            await self._events_in.send((Gap(node, f"stream trimmed after {position}"), None))

    # -- the stream position ------------------------------------------------------------

    async def _save_last_id_soon(self) -> None:
        """Save the position at most once a second (what a crash loses is re-read and
        deduplicated), in a thread: on a busy disk the write and rename took up to 50 ms,
        a stall of every delivery of this node had it run on the event loop."""
        if self._last_id == "$" or time.monotonic() - self._saved_at < 1.0:
            await trio.lowlevel.checkpoint()
            return
        self._saved_at = time.monotonic()
        await trio.to_thread.run_sync(self._save_last_id)

    def _save_last_id(self) -> None:
        if self._last_id != "$":
            save_position(self._id_file, self._last_id)
