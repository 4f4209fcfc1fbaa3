"""The cluster link's packet codec: pure, synchronous, clock-free."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat._errors import BadPacket, ConfigError
from trio_chat.link._packet import (
    MAX_PACKET_SIZE,
    Ack,
    Data,
    ForeignPacket,
    ForgedPacket,
    Heartbeat,
    Leave,
    Message,
    Nak,
    PacketCodec,
    Ping,
    ReplayWindow,
    is_fresh,
    parse_header_untrusted,
)

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000.0
_PACKAGE = pathlib.Path(__file__).parent.parent / "trio_chat"
# The pure layers: the whole protocol and settings packages but the settings' one look
# at the host (settings/_host_checks.py binds a socket), and the link's codec, events and
# state machine (its socket shell and diagnostics are trio). The import-linter contract
# in pyproject.toml says the same for `make lint`.
PURE_MODULES = sorted(
    str(path.relative_to(_PACKAGE))
    for pattern in (
        "protocol/*.py",
        "settings/*.py",
        "link/_packet.py",
        "link/_events.py",
        "link/_peer.py",
        "link/_state.py",
    )
    for path in _PACKAGE.glob(pattern)
    if path.name != "_host_checks.py"
)


def codec(node: str = "a", *, secret: bytes = SECRET, cluster: str = "test") -> PacketCodec:
    return PacketCodec(secret=secret, cluster_id=cluster, node_id=node, incarnation=1_000)


MESSAGES: list[Message] = [
    Data(1, 0, 1, b"payload"),
    Data(7, 2, 3, b"", repair=True),
    Heartbeat("http://10.0.0.1:8000", 9, 3, True, [Ack("b", 5, 2), Ack("c", 6, 0)]),
    Nak("b", 5, [(1, 3), (7, 7)]),
    Ping("b", 5),
    Leave(12),
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_trio_and_read_no_clock(module: str) -> None:
    source = (_PACKAGE / module).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {"trio", "time", "socket", "random"} & {name.split(".")[0] for name in imported}


@pytest.mark.parametrize("message", MESSAGES)
def test_round_trip(message: Message) -> None:
    sender, receiver = codec("a"), codec("b")
    packet = receiver.open_untrusted(sender.seal(message, now=NOW))
    assert packet.message == message
    assert packet.sent_ms == int(NOW * 1000)
    assert (packet.header.node_id, packet.header.incarnation) == ("a", 1_000)
    assert packet.header.counter == 1


def test_counter_increases_per_packet() -> None:
    sender, receiver = codec("a"), codec("b")
    counters = [
        receiver.open_untrusted(sender.seal(Leave(0), now=NOW)).header.counter for _ in "xyz"
    ]
    assert counters == [1, 2, 3]


def test_a_full_chunk_fits_in_one_packet() -> None:
    sender = codec("n" * 64)
    data = Data(2**62, 127, 128, b"x" * sender.max_chunk, repair=True)
    assert len(sender.seal(data, now=NOW)) <= MAX_PACKET_SIZE
    with pytest.raises(ValueError, match="exceeds"):
        sender.seal(Data(1, 0, 1, b"x" * MAX_PACKET_SIZE), now=NOW)


def test_another_cluster_or_secret_is_foreign() -> None:
    packet = codec("a").seal(Leave(0), now=NOW)
    with pytest.raises(ForeignPacket, match="another cluster"):
        codec("b", cluster="other").open_untrusted(packet)
    with pytest.raises(ForeignPacket, match="another cluster secret"):
        codec("b", secret=b"another secret of 32 bytes......").open_untrusted(packet)


@pytest.mark.parametrize("position", [20, 25, -1, -17, -30])
def test_any_altered_byte_fails_authentication(position: int) -> None:
    packet = bytearray(codec("a").seal(Data(1, 0, 1, b"payload"), now=NOW))
    packet[position] ^= 1
    with pytest.raises(ForgedPacket):
        codec("b").open_untrusted(bytes(packet))


def test_our_own_packets_are_recognized_by_their_clear_header() -> None:
    ours = codec("a")
    assert ours.is_own_untrusted(ours.seal(Leave(0), now=NOW))
    assert ours.is_own_untrusted(ours.seal(Data(1, 0, 1, b"payload"), now=NOW))
    # another node, another incarnation of us, another cluster: opened as usual
    assert not ours.is_own_untrusted(codec("b").seal(Leave(0), now=NOW))
    earlier = PacketCodec(secret=SECRET, cluster_id="test", node_id="a", incarnation=999)
    assert not ours.is_own_untrusted(earlier.seal(Leave(0), now=NOW))
    assert not ours.is_own_untrusted(codec("a", cluster="other").seal(Leave(0), now=NOW))
    assert not ours.is_own_untrusted(b"")


def test_same_secret_other_incarnation_key_does_not_open() -> None:
    # Keys are per incarnation: a header rewritten to another incarnation cannot open.
    packet = codec("a").seal(Leave(0), now=NOW)
    header, end = parse_header_untrusted(packet)
    moved = (
        header.__class__(header.key_id, header.cluster_tag, "a", 1_001, header.counter).encode()
        + packet[end:]
    )
    with pytest.raises(ForgedPacket):
        codec("b").open_untrusted(moved)


@pytest.mark.parametrize(
    "data",
    [b"", b"TCL", b"XYZ" + bytes(60), b"TCL\x02" + bytes(60), b"TCL\x01" + bytes(13) + b"\x00"],
)
def test_malformed_headers(data: bytes) -> None:
    with pytest.raises(BadPacket):
        parse_header_untrusted(data)


def test_oversized_datagram_is_refused() -> None:
    with pytest.raises(BadPacket, match="larger"):
        codec("b").open_untrusted(b"TCL" + bytes(MAX_PACKET_SIZE))


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        codec(secret=b"short")
    with pytest.raises(ConfigError, match="node id"):
        codec("n" * 65)


def test_replay_window() -> None:
    window = ReplayWindow(size=64)
    assert [window.accept(c) for c in (1, 3, 2, 3, 1, 0)] == [True, True, True, False, False, False]
    assert window.accept(100)
    assert not window.accept(36)  # Too old to tell: refused.
    assert window.accept(37)
    assert not window.accept(37)


def test_freshness() -> None:
    assert is_fresh(int(NOW * 1000) + 29_000, NOW, 30.0)
    assert not is_fresh(int(NOW * 1000) - 31_000, NOW, 30.0)


@given(st.binary(max_size=MAX_PACKET_SIZE + 10))
def test_random_bytes_raise_only_bad_packet(data: bytes) -> None:
    with pytest.raises(BadPacket):
        codec("b").open_untrusted(data)


@given(
    st.sampled_from(MESSAGES),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 1300),
)
def test_mutated_packets_raise_only_bad_packet(
    message: Message, edits: list[tuple[int, int]], cut: int
) -> None:
    packet = bytearray(codec("a").seal(message, now=NOW))
    for position, value in edits:
        packet[position % len(packet)] = value
    mutated = bytes(packet[:cut])
    try:
        opened = codec("b").open_untrusted(mutated)
    except BadPacket:
        return
    assert opened.message == message  # Only an unchanged packet may open.
