"""The node's side of the cluster: what it sends its peers and what it does with theirs.

Every committed local message, presence change and typing notice goes to the `Bus` as one
payload (`Broadcaster`). From the bus come peers' payloads (in order per sender, exactly
once), peers arriving and leaving, and gaps the engine could not repair (`Cluster`). A gap
is healed from history: first from the store (workers of one host share one SQLite file,
and the sender commits before it sends), then from a peer (`Bus.fetch`). A message is
delivered to clients at most once whichever way it came: ids already seen are skipped.
Presence changes go to `Presence`, the one path to the hub. Nothing here knows which
engine runs the bus.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Final, NoReturn

import msgspec
import trio

from .._errors import StoreError
from ._bus import MAX_PAYLOAD, Gap, Payload, PeerDown, PeerUp

# At run time: msgspec resolves `RemoteMessage`'s field annotation when decoding.
from ._store import Message  # noqa: TC001

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._bus import Bus, BusEvent
    from ._history import History
    from ._presence import Presence

log = logging.getLogger("trio_chat.cluster")

# Ids of remote messages recently delivered; a repair or a heal that brings one again
# is dropped. Far more than a gap can span.
_RECENT_IDS: Final = 100_000
# Events taken at once from the bus (what is ready), so a burst is one commit.
_RUN_MAX: Final = 500
# Presence is re-announced this often, so a peer that missed an update converges.
_SNAPSHOT_INTERVAL: Final = 15.0
#: Most messages one heal request asks for (and `/api/cluster/messages` gives).
HEAL_PAGE: Final = 1000
#: A signed heal request is accepted this many seconds either side of its time stamp
#: (peers' clocks must agree that closely), and only once.
SIGNATURE_AGE: Final = 30.0
#: Signatures remembered to refuse their replay. Only correctly signed requests are
#: remembered, and peers send a few a second at most: past this, something is wrong,
#: and refusing (the peer retries at the next gap) is safer than forgetting.
SEEN_SIGNATURES: Final = 10_000
#: The header that carries a heal request's signature.
HEAL_HEADER: Final = "X-Trio-Chat-Cluster"
# Digits of a signature's time stamp (Unix seconds), at most: more is not a time.
_STAMP_DIGITS: Final = 12
# A catch-up whose store read failed tries again after this long, doubled up to the max.
_STORE_RETRY_FIRST: Final = 0.5
_STORE_RETRY_MAX: Final = 30.0


class RemoteMessage(msgspec.Struct, tag="m", array_like=True):
    message: Message


# New fields go last, with a default: a peer of an older version ignores what follows
# the fields it knows, and its payloads decode here with the defaults.


class RemotePresence(msgspec.Struct, tag="p", array_like=True):
    room: str
    name: str
    joined: bool
    #: The session's `Member.owner` on a join (open mode, with a ``client_id``), else b"".
    owner: bytes = b""


class RemoteTyping(msgspec.Struct, tag="t", array_like=True):
    room: str
    name: str


class Snapshot(msgspec.Struct, tag="s", array_like=True):
    """A node's whole presence, or a part of it: one too big for a payload is sent in
    parts, in order, numbered from 0, each but the last with ``more``; their rooms add up."""

    rooms: dict[str, list[str]]
    #: The owners of the names that have one (`RemotePresence.owner`).
    owners: dict[str, bytes] = msgspec.field(default_factory=dict)
    more: bool = False
    part: int = 0


class RemoteDelete(msgspec.Struct, tag="d", array_like=True):
    """A tombstone: every node stores it (idempotent) and tells its members."""

    room: str
    id: str


class RemoteDisconnect(msgspec.Struct, tag="x", array_like=True):
    """Close every connection of ``user`` (server API)."""

    user: str


Body = RemoteMessage | RemotePresence | RemoteTyping | Snapshot | RemoteDelete | RemoteDisconnect

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final[msgspec.msgpack.Decoder[Body]] = msgspec.msgpack.Decoder(Body)


def decode_body(data: bytes) -> Body:
    """A payload `Broadcaster` encoded.

    Raises:
      msgspec.DecodeError: it is not one.
    """
    return _decoder.decode(data)


def sign_heal_request(
    secret: bytes, origin: str, after: str, limit: str, now: float, nonce: str | None = None
) -> str:
    """The ``X-Trio-Chat-Cluster`` header for a heal request: ``stamp:nonce:mac``.

    The MAC covers the whole query (origin, after, limit), the time stamp and a random
    nonce, so a captured request can be neither altered nor, with `HealRequests`,
    sent again.
    """
    stamp = f"{now:.0f}"
    nonce = secrets.token_hex(16) if nonce is None else nonce
    signed = msgspec.json.encode(["heal", stamp, nonce, origin, after, limit])
    return f"{stamp}:{nonce}:{hmac.new(secret, signed, hashlib.sha256).hexdigest()}"


class HealRequests:
    """Checks the signatures of heal requests, and refuses each one's second use.

    Args:
      secret: the cluster secret.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        #: Signatures accepted, with when they stop being valid, oldest first.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def check_untrusted(self, origin: str, after: str, limit: str, header: str, now: float) -> bool:
        """Whether ``header`` signs this query, is fresh, and was never used before."""
        stamp, _, rest = header.partition(":")
        nonce, _, _ = rest.partition(":")
        if not (len(stamp) <= _STAMP_DIGITS and stamp.isascii() and stamp.isdigit()):
            return False
        if abs(now - int(stamp)) > SIGNATURE_AGE:
            return False
        expected = sign_heal_request(self._secret, origin, after, limit, int(stamp), nonce)
        if not hmac.compare_digest(expected.encode(), header.encode()):
            return False
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if header in self._seen:
            log.debug("refused a replayed heal request")
            return False
        if len(self._seen) >= SEEN_SIGNATURES:
            log.warning("refused a heal request: %d others in %g s", len(self._seen), SIGNATURE_AGE)
            return False
        self._seen[header] = int(stamp) + SIGNATURE_AGE
        return True


class Broadcaster:
    """Sends this node's messages, presence and typing to its peers, one payload each.

    Args:
      bus: the cluster engine.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    def _send(self, body: Body) -> None:
        self._bus.send(_encoder.encode(body))

    def send_message(self, message: Message) -> None:
        self._send(RemoteMessage(message))

    def send_delete(self, room: str, message_id: str) -> None:
        self._send(RemoteDelete(room, message_id))

    def send_disconnect(self, user: str) -> None:
        self._send(RemoteDisconnect(user))

    def send_presence(self, room: str, name: str, *, joined: bool, owner: bytes) -> None:
        self._send(RemotePresence(room, name, joined, owner))

    def send_typing(self, room: str, name: str) -> None:
        self._send(RemoteTyping(room, name))

    def send_snapshot(self, rooms: dict[str, list[str]], owners: dict[str, bytes]) -> None:
        for part in snapshot_parts(rooms, owners):
            self._send(part)


# A part's encoding beside its entries: tag, array and map headers, ``more``.
_PART_OVERHEAD: Final = 64


def snapshot_parts(rooms: dict[str, list[str]], owners: dict[str, bytes]) -> list[Snapshot]:
    """``rooms`` and ``owners`` as `Snapshot` parts that each encode to at most
    `MAX_PAYLOAD` bytes (a room too big for one is split over several)."""
    parts = [Snapshot({}, {}, more=True)]
    size = 0
    for room, names in rooms.items():
        if not names:
            parts[-1].rooms[room] = []
        for name in names:
            owner = owners.get(name)
            cost = _entry_size(parts[-1], room, name, owner)
            if size + cost > MAX_PAYLOAD - _PART_OVERHEAD:
                parts.append(Snapshot({}, {}, more=True, part=len(parts)))
                size, cost = 0, _entry_size(parts[-1], room, name, owner)
            parts[-1].rooms.setdefault(room, []).append(name)
            if owner:
                parts[-1].owners[name] = owner
            size += cost
    parts[-1].more = False
    return parts


def _entry_size(part: Snapshot, room: str, name: str, owner: bytes | None) -> int:
    """At least what adding ``name`` (in ``room``, of ``owner``) adds to ``part``'s
    encoding: msgpack adds at most 5 bytes to a string or a list."""
    size = len(name.encode()) + 5
    if room not in part.rooms:
        size += len(room.encode()) + 10
    if owner and name not in part.owners:
        size += len(name.encode()) + len(owner) + 10
    return size


class Cluster:
    """Acts on what the bus brings: peers' messages and presence, peers up and down, gaps.

    Args:
      bus: the cluster engine.
      history: where peers' messages are stored and broadcast, and healing reads.
      presence: where peers' presence goes.
      disconnect: closes a user's connections on this node (peers' server API calls).
    """

    def __init__(
        self,
        bus: Bus,
        history: History,
        presence: Presence,
        disconnect: Callable[[str], int],
    ) -> None:
        self.bus = bus
        #: Signs and checks requests for a node's history (``/api/cluster/messages``).
        self.secret = bus.heal_secret
        self.heal_requests = HealRequests(bus.heal_secret)
        self._out = Broadcaster(bus)
        self._history = history
        self._presence = presence
        self._disconnect = disconnect
        #: The newest message id delivered from each origin: where a heal starts.
        self._last_from: dict[str, str] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Each peer's snapshot so far, while its parts arrive (`Snapshot.more`).
        self._snapshots: dict[str, Snapshot] = {}
        self.gaps_healed = 0
        self.healed_messages = 0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the bus and act on its events until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run)
            nursery.start_soon(self._announce_forever)
            task_status.started()
            while True:
                events = [await self.bus.receive()]
                while len(events) < _RUN_MAX:
                    try:
                        events.append(self.bus.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._on_events(events, nursery)

    async def _on_events(self, events: list[BusEvent], nursery: trio.Nursery) -> None:
        """Act on events in their order. What arrived together is handled together: a run
        of messages among them is delivered as one (one commit, one hub item), not a
        commit, a hub item and a fan-out round each."""
        run: list[Message] = []
        for event in events:
            body = self._decode(event) if isinstance(event, Payload) else None
            if isinstance(body, RemoteMessage):
                if self._first_time(body.message):
                    run.append(body.message)
                continue
            await self._deliver(run, live=True)
            run = []
            match event:
                case Payload() if isinstance(body, RemoteDelete):
                    await self._history.deliver_remote_delete(body.room, body.id)
                case Payload(origin=origin):
                    self._on_body(origin, body)
                case PeerUp(node=peer):
                    log.info("peer %s is up", peer)
                    self._snapshots.pop(peer, None)
                    self._send_snapshot()
                    nursery.start_soon(self._catch_up, peer)
                case PeerDown(node=peer, reason=reason):
                    log.info("peer %s is down (%s)", peer, reason)
                    self._snapshots.pop(peer, None)
                    self._presence.peer_down(peer)
                case Gap(origin=origin, detail=detail):
                    log.warning("gap from %s (%s): healing from history", origin, detail)
                    nursery.start_soon(self._heal, origin)
        await self._deliver(run, live=True)

    async def _announce_forever(self) -> NoReturn:
        while True:
            await trio.sleep(_SNAPSHOT_INTERVAL)
            self._send_snapshot()

    def _send_snapshot(self) -> None:
        self._out.send_snapshot(self._presence.local_rooms(), self._presence.local_owners())

    @staticmethod
    def _decode(payload: Payload) -> Body | None:
        try:
            return _decoder.decode(payload.data)
        except msgspec.DecodeError:
            # Authenticated, so a peer of ours sent it: a bug or another version.
            log.error("dropped an undecodable payload from %s", payload.origin)
            return None

    def _on_body(self, origin: str, body: Body | None) -> None:
        """Act on a payload other than a message or a delete."""
        match body:
            case RemotePresence(room=room, name=name, joined=joined, owner=owner):
                self._presence.remote_change(origin, room, name, joined=joined, owner=owner)
            case RemoteTyping(room=room, name=name):
                self._presence.remote_typing(room, name)
            case Snapshot():
                self._on_snapshot(origin, body)
            case RemoteDisconnect(user=user):
                self._disconnect(user)

    def _on_snapshot(self, origin: str, part: Snapshot) -> None:
        """Gather a peer's snapshot part by part; apply it once whole."""
        whole = self._snapshots.pop(origin, None)
        if part.part == 0:
            whole = part
        elif whole is None or whole.part != part.part - 1:
            # A gap took the parts before it: the next snapshot will be whole.
            log.info(
                "dropped part %d of a snapshot of %s: parts before it were lost", part.part, origin
            )
            return
        else:
            for room, names in part.rooms.items():
                whole.rooms.setdefault(room, []).extend(names)
            whole.owners.update(part.owners)
            whole.part = part.part
        if part.more:
            self._snapshots[origin] = whole
        else:
            self._presence.remote_snapshot(origin, whole.rooms, whole.owners)

    def _first_time(self, message: Message) -> bool:
        """Whether ``message`` is new here (recorded as seen, and where its origin's
        heal would start, if so)."""
        if message.id in self._recent:
            return False
        self._recent[message.id] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)
        origin = message.origin
        if message.id > self._last_from.get(origin, ""):
            self._last_from[origin] = message.id
        return True

    async def _deliver(self, messages: list[Message], *, live: bool = False) -> None:
        """Store and broadcast ``messages`` (new ones, in order) as one commit item;
        ``live``: from the bus (`History.deliver_remote`)."""
        if messages:
            await self._history.deliver_remote(messages, live=live)
        else:
            await trio.lowlevel.checkpoint()

    # -- healing ------------------------------------------------------------------------

    async def _catch_up(self, origin: str) -> None:
        """A peer came up: get what it accepted that we never stored.

        The bus delivers a peer's messages from the first time we hear it; what it
        sent before (while we were down, or before we started) comes from history, from
        just after the newest message of it we stored. While our store cannot say which
        that is, this waits (with backoff) rather than guess and replay old messages.
        """
        history = self._history
        delay = _STORE_RETRY_FIRST
        while True:
            try:
                newest = await history.read_store(history.store.newest_from, origin)
                break
            except StoreError:
                await trio.sleep(delay)
                delay = min(delay * 2, _STORE_RETRY_MAX)
        self._last_from[origin] = max(self._last_from.get(origin, ""), newest or "")
        await self._heal(origin)

    async def _heal(self, origin: str) -> None:
        after = self._last_from.get(origin, "")
        fresh = [m for m in await self._from_store(origin, after) if self._first_time(m)]
        await self._deliver(fresh)
        healed = len(fresh)
        # What the store lacked: the bus asks a peer (the multicast engine: its HTTP API).
        fresh = [m for m in await self.bus.fetch(origin, after, HEAL_PAGE) if self._first_time(m)]
        await self._deliver(fresh)
        healed += len(fresh)
        self.gaps_healed += 1
        self.healed_messages += healed
        if healed:
            log.info("healed %d messages from %s", healed, origin)

    async def _from_store(self, origin: str, after: str) -> list[Message]:
        history = self._history
        try:
            return await history.read_store(history.store.from_origin, origin, after, HEAL_PAGE)
        except StoreError:
            # History logged it; the peers' history serves instead.
            await trio.lowlevel.checkpoint()
            return []

    def statistics(self) -> dict[str, int]:
        counts = self.bus.statistics()
        counts.update(gaps_healed=self.gaps_healed, healed_messages=self.healed_messages)
        return counts
