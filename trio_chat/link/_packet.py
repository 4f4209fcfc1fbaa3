"""The cluster link's datagram format and crypto: pure, no trio, no clock.

A packet is a clear header followed by an AEAD-sealed body::

    magic "TCL" | version u8 | key id u32 | cluster tag 8B | node id len u8 | node id
    | incarnation u64 | packet counter u64 | ChaCha20-Poly1305(body) with 16-byte tag

The whole header is the AEAD's associated data, so none of it can be altered. The key is
derived with HKDF-SHA256 from the shared cluster secret, the cluster id, the node id and its
incarnation: every node incarnation has its own key, and the packet counter (strictly
increasing per incarnation) is the nonce, so a nonce is never reused under one key.

The body is a msgpack ``Envelope``: the sender's wall clock in ms (for the freshness check of
incarnations we have not seen yet) and one message. ``ReplayWindow`` refuses a counter seen
before; it lives per (node, incarnation) in the link state and is created only after a packet
of that incarnation authenticated and was fresh: nothing unauthenticated creates state.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._errors import BadPacket, ConfigError

#: Every datagram fits in 1200 bytes: below any LAN or tunnel MTU, so IP never fragments
#: it (a lost IP fragment loses the whole datagram).
MAX_PACKET_SIZE: Final = 1200
MAGIC: Final = b"TCL"
VERSION: Final = 1
MAX_NODE_ID_BYTES: Final = 64
MAX_URL_BYTES: Final = 256
#: 64 KiB payloads over ~1000-byte fragments: 66 fragments; 128 leaves room for long node ids.
MAX_FRAGMENTS: Final = 128
MAX_NAK_RANGES: Final = 32
MAX_ACKS: Final = 128
#: A secret shorter than this is a password, not a key.
MIN_SECRET_BYTES: Final = 16
TAG_SIZE: Final = 16
#: msgspec bounds must fit an int64; ms timestamps and counters stay far below.
_U64_MAX: Final = 2**63 - 1
_PREFIX: Final = struct.Struct(">3sBI8sB")
_TAIL: Final = struct.Struct(">QQ")
_SALT: Final = b"trio-chat cluster link v1"
#: Generous upper bound of an envelope's bytes around a data chunk (msgpack array headers,
#: tag, five integers up to 9 bytes each, bin header): ``max_chunk`` subtracts it.
_DATA_OVERHEAD: Final = 48
#: Twice any sensible cluster's incarnations; the oldest entry goes first.
_KEY_CACHE_SIZE: Final = 512

U64 = Annotated[int, msgspec.Meta(ge=0, le=_U64_MAX)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NODE_ID_BYTES)]


class ForeignPacket(BadPacket):
    """Another cluster, another secret or another protocol version: not for us."""


class ForgedPacket(BadPacket):
    """Authentication failed: the packet was altered or made without the secret."""


class ReplayedPacket(BadPacket):
    """An authentic packet seen before, or an old incarnation's packet sent again."""


class StalePacket(BadPacket):
    """Authentic but from an incarnation we may not start trusting (not fresh, or retired)."""


class Data(msgspec.Struct, frozen=True, array_like=True, tag="D"):
    """One fragment of a broadcast; one sequence number per fragment."""

    seq: U64
    frag_index: Annotated[int, msgspec.Meta(ge=0, lt=MAX_FRAGMENTS)]
    frag_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_FRAGMENTS)]
    chunk: bytes
    repair: bool = False

    def __post_init__(self) -> None:
        if self.frag_index >= self.frag_count or self.seq == 0:
            raise ValueError("fragment index out of range or sequence 0")


class Ack(msgspec.Struct, frozen=True, array_like=True):
    """What the heartbeat's sender has delivered, in order, from one incarnation."""

    node: NodeId
    incarnation: U64
    delivered: U64


class Heartbeat(msgspec.Struct, frozen=True, array_like=True, tag="H"):
    """Liveness, the sender's HTTP address, its sequence window, and acks of its peers.

    ``high_seq`` (highest sequence sent) lets receivers see tail loss; ``low_seq`` (lowest
    sequence still repairable) tells them what is gone for good.
    """

    http_url: Annotated[str, msgspec.Meta(max_length=MAX_URL_BYTES)]
    high_seq: U64
    low_seq: U64
    hello: bool
    acks: Annotated[list[Ack], msgspec.Meta(max_length=MAX_ACKS)]


class Nak(msgspec.Struct, frozen=True, array_like=True, tag="N"):
    """Missing sequence ranges (inclusive) of one sender incarnation."""

    target: NodeId
    incarnation: U64
    ranges: Annotated[list[tuple[U64, U64]], msgspec.Meta(min_length=1, max_length=MAX_NAK_RANGES)]

    def __post_init__(self) -> None:
        if any(first > last or first == 0 for first, last in self.ranges):
            raise ValueError("bad range")


class Ping(msgspec.Struct, frozen=True, array_like=True, tag="P"):
    """Asks a suspected node to answer with a heartbeat at once."""

    target: NodeId
    incarnation: U64


class Leave(msgspec.Struct, frozen=True, array_like=True, tag="L"):
    """Graceful shutdown: no sequence after ``high_seq`` will come."""

    high_seq: U64


Message = Data | Heartbeat | Nak | Ping | Leave


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    sent_ms: U64
    message: Message


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Envelope)


@dataclass(frozen=True, slots=True)
class Header:
    """The clear (but authenticated) part of a packet."""

    key_id: int
    cluster_tag: bytes
    node_id: str
    incarnation: int
    counter: int

    def encode(self) -> bytes:
        node = self.node_id.encode()
        return (
            _PREFIX.pack(MAGIC, VERSION, self.key_id, self.cluster_tag, len(node))
            + node
            + _TAIL.pack(self.incarnation, self.counter)
        )


@dataclass(frozen=True, slots=True)
class Packet:
    """An authenticated packet: who sent it, when (sender's clock) and what."""

    header: Header
    sent_ms: int
    message: Message


def cluster_tag(cluster_id: str) -> bytes:
    """The 8-byte tag naming a cluster on the wire (cheap early drop of other clusters)."""
    return hashlib.sha256(b"trio-chat cluster:" + cluster_id.encode()).digest()[:8]


#: Where `derived_port` puts a cluster: below Linux's ephemeral ports (32768-60999), which
#: any program's UDP socket may hold and so keep our group's port from being bound.
DERIVED_PORTS: Final = range(20000, 32768)


def derived_port(secret: bytes) -> int:
    """The cluster's UDP port when none is set: one per secret, the same on every node.

    Two deployments on one host, each with its own key, then multicast on different
    ports and never hear each other. The port tells no more of the secret than the key
    id every packet carries in clear (`key_fingerprint`).
    """
    digest = hashlib.sha256(b"trio-chat cluster port:" + secret).digest()
    return DERIVED_PORTS[int.from_bytes(digest[:4], "big") % len(DERIVED_PORTS)]


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(secret)


def key_fingerprint(secret: bytes) -> int:
    """A 32-bit id of the secret, sent in clear: tells "wrong secret" from "forged"."""
    return int.from_bytes(_hkdf(secret, b"key id", 4), "big")


def parse_header_untrusted(data: bytes) -> tuple[Header, int]:
    """Parse the clear header of a datagram.

    Returns:
        The header and its length (the offset of the sealed body).

    Raises:
        ForeignPacket: not a trio-chat link packet of our version.
        BadPacket: truncated or malformed.
    """
    if len(data) > MAX_PACKET_SIZE:
        raise BadPacket("datagram larger than the link's maximum")
    if len(data) < _PREFIX.size or data[: len(MAGIC)] != MAGIC:
        raise ForeignPacket("not a trio-chat link packet")
    _, version, key_id, tag, node_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ForeignPacket(f"link protocol version {version}, we speak {VERSION}")
    end = _PREFIX.size + node_len + _TAIL.size
    if node_len == 0 or node_len > MAX_NODE_ID_BYTES or len(data) < end + TAG_SIZE:
        raise BadPacket("truncated header")
    try:
        node_id = data[_PREFIX.size : _PREFIX.size + node_len].decode()
    except UnicodeDecodeError:
        raise BadPacket("node id is not UTF-8") from None
    incarnation, counter = _TAIL.unpack_from(data, _PREFIX.size + node_len)
    return Header(key_id, tag, node_id, incarnation, counter), end


class PacketCodec:
    """Seals our packets and opens our peers' for one cluster and secret.

    Args:
        secret: the shared cluster secret (at least 16 bytes).
        cluster_id: the cluster's name; a different one never authenticates.
        node_id: our node id (at most 64 UTF-8 bytes).
        incarnation: our incarnation (a ms timestamp of our start).

    Raises:
        ConfigError: the secret is too short or the node id too long.
    """

    def __init__(self, *, secret: bytes, cluster_id: str, node_id: str, incarnation: int) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        if not 0 < len(node_id.encode()) <= MAX_NODE_ID_BYTES:
            raise ConfigError(f"the node id must be 1 to {MAX_NODE_ID_BYTES} UTF-8 bytes")
        self._secret = secret
        self._cluster_tag = cluster_tag(cluster_id)
        self._key_id = key_fingerprint(secret)
        self._node_id = node_id
        self._incarnation = incarnation
        self._aead = self._derive(node_id, incarnation)
        self._counter = 0
        self._header_size = len(Header(0, b"", node_id, 0, 0).encode())
        # Our clear header up to its counter: how the datagrams we sent begin.
        own = Header(self._key_id, self._cluster_tag, node_id, incarnation, 0).encode()
        self._own_prefix = own[: -_TAIL.size // 2]
        # Keys of peers that already authenticated (HKDF per packet would cost ~20 us),
        # bounded since replayed authentic packets of old incarnations also get here.
        self._peer_keys: dict[tuple[str, int], ChaCha20Poly1305] = {}

    @property
    def max_chunk(self) -> int:
        """The largest data fragment that fits in one of our packets."""
        return MAX_PACKET_SIZE - self._header_size - TAG_SIZE - _DATA_OVERHEAD

    @property
    def body_budget(self) -> int:
        """The most bytes an encoded envelope may take in one of our packets."""
        return MAX_PACKET_SIZE - self._header_size - TAG_SIZE

    def _derive(self, node_id: str, incarnation: int) -> ChaCha20Poly1305:
        info = b"key" + self._cluster_tag + incarnation.to_bytes(8, "big") + node_id.encode()
        return ChaCha20Poly1305(_hkdf(self._secret, info, 32))

    @staticmethod
    def encoded_size(sent_ms: int, message: Message) -> int:
        """The size of an envelope's encoding (for packing heartbeats to the budget)."""
        return len(_encoder.encode(Envelope(sent_ms, message)))

    def seal(self, message: Message, *, now: float) -> bytes:
        """Encode, encrypt and authenticate one message with the next packet counter.

        Raises:
            ValueError: the message does not fit in one packet (a bug of the caller).
        """
        self._counter += 1
        header = Header(
            self._key_id, self._cluster_tag, self._node_id, self._incarnation, self._counter
        ).encode()
        body = _encoder.encode(Envelope(int(now * 1000), message))
        nonce = self._counter.to_bytes(12, "big")
        packet = header + self._aead.encrypt(nonce, body, header)
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"link packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
        return packet

    def is_own_untrusted(self, data: bytes) -> bool:
        """Whether ``data``'s clear header names us, this incarnation, as its sender.

        The kernel loops every datagram we send back to us (the workers of this host
        need multicast loopback). Unauthenticated: such a datagram is dropped unopened,
        which is all an authentic or a forged one could get.
        """
        return data.startswith(self._own_prefix)

    def open_untrusted(self, data: bytes) -> Packet:
        """Authenticate, decrypt and decode a datagram.

        This creates no state for an unknown sender except, once the packet authenticated,
        an entry in a bounded cache of keys.

        Raises:
            ForeignPacket: another cluster, secret or version.
            ForgedPacket: authentication failed.
            BadPacket: malformed.
        """
        header, end = parse_header_untrusted(data)
        if header.cluster_tag != self._cluster_tag:
            raise ForeignPacket("packet of another cluster")
        if header.key_id != self._key_id:
            raise ForeignPacket("packet sealed with another cluster secret")
        peer = (header.node_id, header.incarnation)
        aead = self._peer_keys.get(peer) or self._derive(*peer)
        try:
            body = aead.decrypt(header.counter.to_bytes(12, "big"), data[end:], data[:end])
        except InvalidTag:
            raise ForgedPacket("authentication failed") from None
        if peer not in self._peer_keys:
            if len(self._peer_keys) >= _KEY_CACHE_SIZE:
                del self._peer_keys[next(iter(self._peer_keys))]
            self._peer_keys[peer] = aead
        try:
            envelope = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise BadPacket(f"malformed body: {exc}") from None
        return Packet(header, envelope.sent_ms, envelope.message)


class ReplayWindow:
    """Which packet counters of one sender incarnation were already accepted.

    A sliding bitmap (RFC 4303 §3.4.3): counters more than ``size`` below the highest are
    refused, since we cannot tell whether they were seen.
    """

    __slots__ = ("_bits", "_highest", "_size")

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._highest = 0
        self._bits = 0

    def accept(self, counter: int) -> bool:
        """Record ``counter``; return False if it was seen before or is too old to tell."""
        if counter > self._highest:
            shift = counter - self._highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self._size) - 1)
            self._highest = counter
            return True
        offset = self._highest - counter
        if counter == 0 or offset >= self._size or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True


def is_fresh(sent_ms: int, now: float, max_skew: float) -> bool:
    """Whether a packet's send time is within ``max_skew`` seconds of our clock ``now``.

    Only packets of incarnations we do not know yet are checked: a recorded packet replayed
    later, after we forgot (or never saw) its incarnation, must not revive it.
    """
    return abs(sent_ms / 1000 - now) <= max_skew
