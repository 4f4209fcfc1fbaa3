"""The node's side of the cluster: what it sends its peers and what it does with theirs.

Every committed local message, presence change and typing notice goes to the link as one
payload. From the link come peers' payloads (in order per sender, exactly once), peers
arriving and leaving, and gaps the link could not repair. A gap is healed from history:
first from the store (workers of one host share one SQLite file, and the sender commits
before it sends), then from peers' HTTP API. A message is delivered to clients at most
once whichever way it came: ids already seen are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING, Final, NoReturn

import httpx
import msgspec
import trio

from ._errors import ConfigError, StoreError
from ._identity import create_once
from ._link import ClusterLink, LinkConfig
from ._link_events import Delivered, Gap, PeerDown, PeerStatus, PeerUp
from ._names import name_keys
from ._protocol import Presence, TypingEvent
from ._store import Message

if TYPE_CHECKING:
    from ._config import Settings
    from ._identity import NodeIdentity
    from ._node import Node

log = logging.getLogger("trio_chat.cluster")
# One line per heal request is noise; failures are logged here.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Ids of remote messages recently delivered; a repair or a heal that brings one again
# is dropped. Far more than a gap can span.
_RECENT_IDS: Final = 100_000
# Presence is re-announced this often, so a peer that missed an update converges.
_SNAPSHOT_INTERVAL: Final = 15.0
#: Most messages one heal request asks for (and `/api/cluster/messages` gives).
HEAL_PAGE: Final = 1000
_HEAL_TIMEOUT: Final = 10.0
#: A signed heal request is accepted this many seconds either side of its time stamp
#: (peers' clocks must agree that closely), and only once.
SIGNATURE_AGE: Final = 30.0
#: Signatures remembered to refuse their replay. Only correctly signed requests are
#: remembered, and peers send a few a second at most: past this, something is wrong,
#: and refusing (the peer retries at the next gap) is safer than forgetting.
SEEN_SIGNATURES: Final = 10_000
HEAL_HEADER: Final = "X-Trio-Chat-Cluster"
# Digits of a signature's time stamp (Unix seconds), at most: more is not a time.
_STAMP_DIGITS: Final = 12
# A catch-up whose store read failed tries again after this long, doubled up to the max.
_STORE_RETRY_FIRST: Final = 0.5
_STORE_RETRY_MAX: Final = 30.0


class RemoteMessage(msgspec.Struct, tag="m", array_like=True):
    message: Message


class RemotePresence(msgspec.Struct, tag="p", array_like=True):
    room: str
    name: str
    joined: bool


class RemoteTyping(msgspec.Struct, tag="t", array_like=True):
    room: str
    name: str


class Snapshot(msgspec.Struct, tag="s", array_like=True):
    rooms: dict[str, list[str]]


Payload = RemoteMessage | RemotePresence | RemoteTyping | Snapshot

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final[msgspec.msgpack.Decoder[Payload]] = msgspec.msgpack.Decoder(Payload)
_messages_decoder: Final = msgspec.json.Decoder(list[Message])


def cluster_secret(settings: Settings) -> bytes:
    """The cluster secret: set, read from the key file, or (host mode) made once.

    Raises:
      ConfigError: the key file cannot be read, or holds too short a secret.
    """
    if settings.cluster_secret is not None:
        return settings.cluster_secret
    path = settings.cluster_key_file
    if path is None:
        path = settings.data_dir / "cluster.key"
        # Readable by the owner only: whoever reads it can join the cluster.
        create_once(path, secrets.token_urlsafe(32), 0o600)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster key file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"the cluster key in {path} is shorter than 16 bytes")
    return secret


def link_config(settings: Settings, identity: NodeIdentity, *, http_url: str) -> LinkConfig:
    """The link's configuration for this node."""
    return LinkConfig(
        secret=cluster_secret(settings),
        cluster_id=f"trio-chat/{settings.cluster_group}:{settings.cluster_port}",
        node_id=identity.node_id,
        incarnation=identity.incarnation,
        http_url=http_url,
        port=settings.cluster_port,
        group=settings.cluster_group,
        interface=settings.cluster_interface,
        ttl=settings.cluster_ttl,
    )


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


class Cluster:
    """Joins a node to its peers through the multicast link.

    Args:
      node: the node to serve.
      config: the link's configuration (`link_config`).
    """

    def __init__(self, node: Node, config: LinkConfig) -> None:
        self.node = node
        self.secret = config.secret
        self.heal_requests = HealRequests(config.secret)
        self.link = ClusterLink(config)
        #: Members of each room on each peer: peer -> room -> name -> connections.
        self._presence: dict[str, dict[str, collections.Counter[str]]] = {}
        #: Skeletons of the names in ``_presence``; None when presence changed since.
        self._skeletons: frozenset[str] | None = None
        #: The newest message id delivered from each origin: where a heal starts.
        self._last_from: dict[str, str] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.gaps_healed = 0
        self.healed_messages = 0

    # -- out ----------------------------------------------------------------------------

    def _send(self, payload: Payload) -> None:
        self.link.broadcast(_encoder.encode(payload))

    def send_message(self, message: Message) -> None:
        self._send(RemoteMessage(message))

    def send_presence(self, room: str, name: str, *, joined: bool) -> None:
        self._send(RemotePresence(room, name, joined))

    def send_typing(self, room: str, name: str) -> None:
        self._send(RemoteTyping(room, name))

    def _send_snapshot(self) -> None:
        hub = self.node.hub
        self._send(Snapshot({room: hub.members(room) for room in hub.room_names()}))

    def members(self, room: str) -> list[str]:
        """Names in ``room`` on other nodes."""
        names: dict[str, None] = {}
        for rooms in self._presence.values():
            names.update(dict.fromkeys(rooms.get(room, ())))
        return list(names)

    def names(self) -> set[str]:
        """Every name in a room on another node (peers announce no one else)."""
        return {
            name for rooms in self._presence.values() for names in rooms.values() for name in names
        }

    def name_skeletons(self) -> frozenset[str]:
        """The confusable skeletons of `names`, kept until presence changes.

        A join storm claims many names while remote presence stands still: each claim
        is then a set lookup, not a pass over every remote name.
        """
        if self._skeletons is None:
            self._skeletons = frozenset(key for name in self.names() for key in name_keys(name))
        return self._skeletons

    # -- in -----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the link and act on its events until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.link.run)
            nursery.start_soon(self._announce_forever)
            task_status.started()
            async for event in self.link.events:
                match event:
                    case Delivered(origin=origin, payload=payload):
                        await self._on_payload(origin, payload)
                    case PeerUp(node=peer):
                        log.info("peer %s is up", peer)
                        self._send_snapshot()
                        nursery.start_soon(self._catch_up, peer)
                    case PeerDown(node=peer, reason=reason):
                        log.info("peer %s is down (%s)", peer, reason)
                        self._forget(peer)
                    case Gap(origin=origin, first_seq=first, last_seq=last):
                        log.warning(
                            "gap from %s (seq %d-%d): healing from history", origin, first, last
                        )
                        nursery.start_soon(self._heal, origin)
        raise AssertionError("the link's event channel closed")

    async def _announce_forever(self) -> NoReturn:
        while True:
            await trio.sleep(_SNAPSHOT_INTERVAL)
            self._send_snapshot()

    async def _on_payload(self, origin: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()  # only a message awaits (its delivery)
        try:
            payload = _decoder.decode(data)
        except msgspec.DecodeError:
            # Authenticated, so a peer of ours sent it: a bug or another version.
            log.error("dropped an undecodable payload from %s", origin)
            return
        match payload:
            case RemoteMessage(message=message):
                await self._deliver(message)
            case RemotePresence(room=room, name=name, joined=joined):
                self._apply_presence(origin, room, name, joined=joined)
            case RemoteTyping(room=room, name=name):
                self.node.hub.publish_nowait(room, TypingEvent(room=room, sender=name))
            case Snapshot(rooms=rooms):
                self._apply_snapshot(origin, rooms)

    async def _deliver(self, message: Message) -> bool:
        if message.id in self._recent:
            await trio.lowlevel.checkpoint()
            return False
        self._recent[message.id] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)
        origin = message.origin
        if message.id > self._last_from.get(origin, ""):
            self._last_from[origin] = message.id
        await self.node.deliver_remote(message)
        return True

    def _apply_presence(self, peer: str, room: str, name: str, *, joined: bool) -> None:
        self._skeletons = None
        rooms = self._presence.setdefault(peer, {})
        names = rooms.setdefault(room, collections.Counter())
        if joined:
            names[name] += 1
            if names[name] == 1:
                self.node.hub.publish_nowait(room, Presence(room=room, joined=name))
        elif names[name] > 0:
            names[name] -= 1
            if names[name] == 0:
                del names[name]
                self.node.hub.publish_nowait(room, Presence(room=room, left=name))

    def _apply_snapshot(self, peer: str, rooms: dict[str, list[str]]) -> None:
        old = self._presence.get(peer, {})
        new = {room: collections.Counter(names) for room, names in rooms.items()}
        hub = self.node.hub
        for room in old.keys() | new.keys():
            before, after = set(old.get(room, ())), set(new.get(room, ()))
            for name in after - before:
                hub.publish_nowait(room, Presence(room=room, joined=name))
            for name in before - after:
                hub.publish_nowait(room, Presence(room=room, left=name))
        self._presence[peer] = new
        self._skeletons = None

    def _forget(self, peer: str) -> None:
        self._apply_snapshot(peer, {})
        del self._presence[peer]
        self._skeletons = None

    # -- healing ------------------------------------------------------------------------

    async def _catch_up(self, origin: str) -> None:
        """A peer came up: get what it accepted that we never stored.

        The link delivers a peer's messages from the first heartbeat we hear on; what it
        sent before (while we were down, or before we started) comes from history, from
        just after the newest message of it we stored. While our store cannot say which
        that is, this waits (with backoff) rather than guess and replay old messages.
        """
        delay = _STORE_RETRY_FIRST
        while True:
            try:
                newest = await self.node.read_store(self.node.store.newest_from, origin)
                break
            except StoreError:
                await trio.sleep(delay)
                delay = min(delay * 2, _STORE_RETRY_MAX)
        self._last_from[origin] = max(self._last_from.get(origin, ""), newest or "")
        await self._heal(origin)

    async def _heal(self, origin: str) -> None:
        after = self._last_from.get(origin, "")
        healed = 0
        for source in [self._from_store, self._from_peers]:
            for message in await source(origin, after):
                healed += await self._deliver(message)
        self.gaps_healed += 1
        self.healed_messages += healed
        if healed:
            log.info("healed %d messages from %s", healed, origin)

    async def _from_store(self, origin: str, after: str) -> list[Message]:
        try:
            return await self.node.read_store(self.node.store.from_origin, origin, after, HEAL_PAGE)
        except StoreError:
            # The node logged it; the peers' history serves instead.
            await trio.lowlevel.checkpoint()
            return []

    async def _from_peers(self, origin: str, after: str) -> list[Message]:
        peers = [
            p
            for p in self.link.peers()
            if p.http_url and p.status in (PeerStatus.ALIVE, PeerStatus.SUSPECT)
        ]
        # The origin has everything it sent; any other peer has what it received.
        peers.sort(key=lambda p: p.node != origin)
        for peer in peers:
            url = f"{peer.http_url}/api/cluster/messages"
            limit = str(HEAL_PAGE)
            signature = sign_heal_request(self.secret, origin, after, limit, time.time())
            params = {"origin": origin, "after": after, "limit": limit}
            try:
                with trio.fail_after(_HEAL_TIMEOUT):
                    async with httpx.AsyncClient() as client:
                        response = await client.get(
                            url, params=params, headers={HEAL_HEADER: signature}
                        )
                response.raise_for_status()
                return _messages_decoder.decode(response.content)
            except (httpx.HTTPError, trio.TooSlowError, msgspec.DecodeError) as exc:
                log.warning("healing from %s failed: %s", peer.node, exc)
        await trio.lowlevel.checkpoint()  # with no peer to ask, nothing else awaited
        return []

    def statistics(self) -> dict[str, int]:
        link = self.link.statistics()
        counts = dataclasses.asdict(link.link)
        counts.update(
            rcvbuf=link.rcvbuf,
            send_failures=link.send_failures,
            events_overflowed=link.events_overflowed,
            gaps_healed=self.gaps_healed,
            healed_messages=self.healed_messages,
        )
        return counts
