"""Hypothesis strategies for socket-level fuzzing: raw handshakes and raw frame sequences.

Everything here produces bytes exactly as an attacker would put them on the wire; nothing
goes through a WebSocket library, so broken framing stays broken. `Frame` keeps the
fields readable, so a falsifying example prints as the frames that caused it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Final

from hypothesis import strategies as st

#: Rooms the fuzz clients use; the canary's room is not among them.
ROOMS = ("general", "fuzz", "r-1")
#: A message id the rooms do not have (for ``since`` and ``before``).
UNKNOWN_ID = "00000000000000ff-x"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
RESERVED_OPCODES = (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)

# --- handshakes ------------------------------------------------------------------------


def valid_handshake(path: bytes = b"/ws?name=fuzz", host: bytes = b"127.0.0.1") -> bytes:
    """A correct WebSocket upgrade request (RFC 6455 §4.1)."""
    return _render(b"GET", path, b"HTTP/1.1", _valid_headers(host), b"\r\n")


def _valid_headers(
    host: bytes, key: bytes = b"dGhlIHNhbXBsZSBub25jZQ=="
) -> list[tuple[bytes, bytes]]:
    return [
        (b"Host", host),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key),
        (b"Sec-WebSocket-Version", b"13"),
    ]


def _render(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]], eol: bytes
) -> bytes:
    lines = [b" ".join(p for p in (method, target, version) if p)]
    lines += [name + b": " + value for name, value in headers]
    return eol.join(lines) + eol + eol


_tokens = st.binary(min_size=0, max_size=12)
_odd_values = {
    b"Host": [b"", b"evil.example", b"[::1", b"127.0.0.1:99999", b"a b", b"\xff\xfe"],
    b"Upgrade": [b"", b"WebSocket", b"websocket2", b"h2c", b"websocket, h2c"],
    b"Connection": [b"", b"keep-alive", b"close", b"upgrade, keep-alive", b"Upgrade\x00"],
    b"Sec-WebSocket-Key": [b"", b"short", b"!!!!!!!!!!!!!!!!!!!!!!==", b"a" * 200],
    b"Sec-WebSocket-Version": [b"", b"8", b"12", b"14", b"13, 8", b"abc", b"-1", b"9" * 30],
}
_extra_headers = st.one_of(
    st.tuples(
        st.just(b"Origin"),
        st.sampled_from([b"http://127.0.0.1:8000", b"null", b"http://evil.example", b"\xff"]),
    ),
    st.tuples(
        st.just(b"Sec-WebSocket-Extensions"),
        st.sampled_from([b"permessage-deflate", b'x; y="', b""]),
    ),
    st.tuples(st.just(b"Sec-WebSocket-Protocol"), st.sampled_from([b"chat", b"", b",,,"])),
    st.tuples(
        st.just(b"Content-Length"), st.sampled_from([b"5", b"-1", b"99999999999999999999", b"x"])
    ),
    st.tuples(st.just(b"Transfer-Encoding"), st.sampled_from([b"chunked", b"gzip, chunked", b"x"])),
    st.tuples(st.sampled_from([b"X Bad", b"", b":", b"X-\x00", b"\xff\xfe", b" Host"]), _tokens),
    st.tuples(st.just(b"X-Pad"), st.sampled_from([1_000, 17_000, 70_000]).map(lambda n: b"p" * n)),
    # The fuzz server trusts 127.0.0.1 as a proxy: these reach protocol/_proxies.py.
    st.tuples(
        st.sampled_from([b"X-Forwarded-For", b"X-Forwarded-Proto", b"Forwarded"]),
        st.one_of(
            st.sampled_from(
                [
                    b"203.0.113.7",
                    b"unknown, _hidden",
                    b"[::1]:80",
                    b'for="[::1',
                    b"for=203.0.113.7;proto=https",
                    b"https",
                    b"1.1.1.1," * 500,
                ]
            ),
            _tokens,
        ),
    ),
)
_targets = st.one_of(
    st.sampled_from(
        [
            b"/ws",
            b"/",
            b"/ws/",
            b"*",
            b"/ws?name=%ff%fe",
            b"/ws?name=" + b"n" * 40,
            b"/ws?name=a&name=b",
            b"/ws?name=\xc3\x28",
            b"http://127.0.0.1/ws",
            b"/../ws",
            b"/" + b"a" * 20_000,
        ]
    ),
    st.binary(max_size=20),
)


@st.composite
def near_valid_handshakes(draw: st.DrawFn, path: bytes = b"/ws?name=fuzz") -> bytes:
    """A valid upgrade request with a few things wrong: the parts RFC 6455 checks."""
    method = draw(
        st.sampled_from([b"GET", b"GET", b"POST", b"get", b"HEAD", b"CONNECT", b"G\x00T", b""])
    )
    target = draw(st.just(path) | _targets)
    version = draw(
        st.sampled_from(
            [
                b"HTTP/1.1",
                b"HTTP/1.1",
                b"HTTP/1.0",
                b"HTTP/2",
                b"http/1.1",
                b"HTTP/9.9",
                b"HTTP/1.1 x",
                b"",
            ]
        )
    )
    headers = _valid_headers(b"127.0.0.1")
    dropped = draw(st.sets(st.integers(0, len(headers) - 1), max_size=2))
    changed = draw(
        st.dictionaries(st.integers(0, len(headers) - 1), st.integers(0, 20), max_size=2)
    )
    new_headers: list[tuple[bytes, bytes]] = []
    for i, (name, value) in enumerate(headers):
        if i in dropped:
            continue
        if i in changed:
            odd = _odd_values[name]
            value = odd[changed[i] % len(odd)]
        new_headers.append((name, value))
    for i in draw(st.lists(st.integers(0, len(headers) - 1), max_size=2)):
        new_headers.append(headers[i])  # a duplicate
    new_headers += draw(st.lists(_extra_headers, max_size=2))
    order = draw(st.permutations(range(len(new_headers))))
    new_headers = [new_headers[i] for i in order]
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    request = _render(method, target, version, new_headers, eol)
    if draw(st.booleans()):
        request = request[: draw(st.integers(0, len(request)))]
    return request + draw(st.binary(max_size=16))


@st.composite
def tls_client_hellos(draw: st.DrawFn) -> bytes:
    """Bytes shaped like a TLS ClientHello record, as sent to a plain-text port by mistake."""
    suites = draw(st.lists(st.binary(min_size=2, max_size=2), min_size=1, max_size=8))
    sni = draw(st.sampled_from([b"127.0.0.1", b"localhost", b"x" * 300]))
    ext = struct.pack("!HHHBH", 0, len(sni) + 5, len(sni) + 3, 0, len(sni)) + sni
    body = (
        b"\x03\x03"
        + draw(st.binary(min_size=32, max_size=32))
        + b"\x00"
        + struct.pack("!H", 2 * len(suites))
        + b"".join(suites)
        + b"\x01\x00"
        + struct.pack("!H", len(ext))
        + ext
    )
    hello = b"\x01" + struct.pack("!I", len(body))[1:] + body
    version = draw(st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00"]))
    return b"\x16" + version + struct.pack("!H", len(hello)) + hello


def handshakes(path: bytes = b"/ws?name=fuzz") -> st.SearchStrategy[bytes]:
    """What a client might send first: valid, near-valid, another protocol, or garbage."""
    return st.one_of(
        st.just(valid_handshake(path)),
        near_valid_handshakes(path),
        tls_client_hellos(),
        st.sampled_from(
            [
                b"",
                b"\r\n\r\n",
                b"GET /\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                b"SSH-2.0-OpenSSH_9.6\r\n",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                b"\x00" * 64,
            ]
        ),
        st.binary(max_size=256),
    )


def _handshake_without(header: bytes) -> bytes:
    headers = [(n, v) for n, v in _valid_headers(b"127.0.0.1") if n != header]
    return _render(b"GET", b"/ws", b"HTTP/1.1", headers, b"\r\n")


#: The handshakes issue 9 found stopping the server; every run tries them first.
ISSUE_HANDSHAKES: Final = [
    b"HELLO\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    _handshake_without(b"Sec-WebSocket-Key"),
    _handshake_without(b"Host"),
    valid_handshake().replace(b"Version: 13", b"Version: 8"),
    bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00",
]

#: Found by ``make fuzz``: bytes that arrive with the upgrade request, before the 101.
#: Hypercorn 0.18 answered them with a 400 that its h11 state refused; the
#: LocalProtocolError escaped the connection and stopped hypercorn's whole server (fixed in
#: trio_chat/_hypercorn.py: the bytes wait for the 101).
FOUND_HANDSHAKES: Final = [valid_handshake() + b"x"]


# --- frames ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
    """One WebSocket frame as sent by a client, any field possibly wrong.

    ``length_form`` is how the payload length is written: ``minimal`` (RFC 6455's only
    legal form), ``16`` or ``64`` (legal value in a longer field than needed), or
    ``64-msb`` (the most significant bit set, which RFC 6455 forbids).
    ``length_delta`` is added to the written length: the frame claims more (or fewer)
    bytes than it has.
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    mask: bytes = b"\x37\xfa\x21\x3d"
    length_form: str = "minimal"
    length_delta: int = 0

    def encode(self) -> bytes:
        n = max(0, len(self.payload) + self.length_delta)
        head = bytes([(0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode])
        mask_bit = 0x80 if self.masked else 0
        form = self.length_form
        if form == "minimal":
            form = "7" if n < 126 else "16" if n < 65536 else "64"
        if form == "16" and n < 65536:
            length = bytes([mask_bit | 126]) + struct.pack("!H", n)
        elif form == "64-msb":
            length = bytes([mask_bit | 127]) + struct.pack("!Q", n | 1 << 63)
        elif form in ("16", "64"):
            length = bytes([mask_bit | 127]) + struct.pack("!Q", n)
        else:
            length = bytes([mask_bit | n])
        if not self.masked:
            return head + length + self.payload
        body = bytes(b ^ self.mask[i % 4] for i, b in enumerate(self.payload))
        return head + length + self.mask + body


@dataclasses.dataclass(frozen=True)
class Junk:
    """Bytes that are not a frame at all, between frames."""

    data: bytes

    def encode(self) -> bytes:
        return self.data


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_rooms = st.sampled_from(ROOMS)
_texts = st.one_of(st.text(max_size=30), st.sampled_from([" ", "x" * 5000, "\u202e", "\x00"]))
_ids = st.sampled_from([UNKNOWN_ID, "nope", "", "0" * 16 + "-" + "n" * 41])
_cids = st.one_of(st.none(), st.text(min_size=0, max_size=70))

#: Commands of the protocol, well-formed or with wrong values in their fields.
protocol_commands = st.one_of(
    st.builds(
        lambda r, s: {"type": "join", "room": r} | ({"since": s} if s else {}),
        _rooms,
        st.none() | _ids,
    ),
    st.builds(
        lambda r, t, c: {"type": "send", "room": r, "text": t, "cid": c}, _rooms, _texts, _cids
    ),
    st.builds(lambda r: {"type": "typing", "room": r}, _rooms),
    st.builds(lambda r: {"type": "leave", "room": r}, _rooms),
    st.builds(
        lambda r, b, n: {"type": "history", "room": r, "before": b, "limit": n},
        _rooms,
        st.none() | _ids,
        st.integers(-5, 300),
    ),
    st.just({"type": "ping"}),
    st.builds(lambda n: {"type": "hello", "name": n}, st.text(max_size=40)),
).map(_json)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """``{"type":"ping","x":[[[…]]]}``: nesting deep enough to exhaust a recursive parser."""
    depth = draw(st.sampled_from([64, 500, 1000, 1500]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    balanced = draw(st.booleans())
    tail = closer * depth if balanced else b""
    return b'{"type":"ping","x":' + opener * depth + b"1" + tail + b"}"


#: Text-frame payloads: protocol commands, JSON that is not a command, not JSON at all,
#: deep nesting, and bytes that are not UTF-8.
text_payloads = st.one_of(
    protocol_commands,
    protocol_commands,
    _json_values.map(_json),
    st.builds(lambda t, v: _json({"type": t, "room": v}), st.text(max_size=8), _json_values),
    st.text(max_size=40).map(str.encode),
    deeply_nested(),
    st.sampled_from(
        [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b'{"type":"ping"}\xf0\x9f', b"\xf8\x88\x80\x80\x80"]
    ),
    st.binary(max_size=40),
)

_close_codes = st.sampled_from(
    [
        1000,
        1001,
        1002,
        1003,
        1004,
        1005,
        1006,
        1007,
        1008,
        1009,
        1010,
        1011,
        1012,
        1015,
        1016,
        0,
        999,
        2999,
        3000,
        4999,
        5000,
        65535,
    ]
)


@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "code", "code+reason", "one-byte", "bad-utf8", "long"]))
    if kind == "empty":
        return b""
    if kind == "one-byte":
        return b"\x03"
    code = struct.pack("!H", draw(_close_codes))
    if kind == "code":
        return code
    if kind == "bad-utf8":
        return code + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"ok\xed\xa0\x80"]))
    if kind == "long":
        return code + b"r" * 200
    return code + draw(st.text(max_size=20)).encode()


def _frames(opcode: int, payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[Frame]:
    return st.builds(
        Frame,
        opcode=st.just(opcode),
        payload=payload,
        fin=st.booleans() | st.just(True),
        rsv=st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
        masked=st.booleans() | st.just(True) | st.just(True),
        mask=st.binary(min_size=4, max_size=4),
        length_form=st.sampled_from(["minimal", "minimal", "minimal", "16", "64", "64-msb"]),
        length_delta=st.sampled_from([0, 0, 0, 0, 0, -1, 1, 100, 70_000]),
    )


def _clean(opcode: int, payload: bytes, fin: bool = True) -> Frame:
    return Frame(opcode=opcode, payload=payload, fin=fin)


@st.composite
def fragmented_messages(draw: st.DrawFn) -> list[Frame]:
    """A text or binary message in fragments, with control frames between them."""
    payload = draw(text_payloads)
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=1, max_size=4)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    first = draw(st.sampled_from([OP_TEXT, OP_TEXT, OP_BINARY, OP_CONTINUATION]))
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(_clean(first if i == 0 else OP_CONTINUATION, piece, fin=i == len(pieces) - 1))
        if i < len(pieces) - 1 and draw(st.booleans()):
            frames.append(draw(control_frames))
    if draw(st.booleans()):
        frames = frames[:-1]  # the final fragment never comes
    return frames


#: Ping, pong and close frames: legal, over 125 bytes, or fragmented (both illegal).
control_frames = st.one_of(
    st.builds(_clean, st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)),
    st.builds(_clean, st.just(OP_CLOSE), close_payloads()),
    _frames(OP_PING, st.binary(min_size=126, max_size=300)),
    _frames(OP_CLOSE, close_payloads()),
    _frames(OP_PING, st.binary(max_size=10)),
)

#: One step of a client's frame sequence (a list of frames, or junk bytes).
frame_steps = st.one_of(
    st.builds(lambda p: [_clean(OP_TEXT, p)], text_payloads),
    st.builds(lambda p: [_clean(OP_TEXT, p)], protocol_commands),
    st.builds(lambda f: [f], _frames(OP_TEXT, text_payloads)),
    st.builds(lambda f: [f], _frames(OP_BINARY, st.binary(max_size=40))),
    st.builds(lambda f: [f], control_frames),
    fragmented_messages(),
    st.builds(
        lambda o, p: [_clean(o, p)], st.sampled_from(RESERVED_OPCODES), st.binary(max_size=20)
    ),
    st.builds(lambda p: [_clean(OP_CONTINUATION, p)], text_payloads),
    st.builds(lambda f: [f], _frames(OP_CONTINUATION, st.binary(max_size=20))),
    st.builds(
        lambda p: [_clean(OP_TEXT, p)], st.sampled_from([b"x" * 5000, b'"' + b"y" * 20_000 + b'"'])
    ),
    st.builds(lambda d: [Junk(d)], st.binary(min_size=1, max_size=20)),
)

#: A client's whole frame sequence after a valid handshake.
frame_sequences = st.lists(frame_steps, min_size=1, max_size=8).map(
    lambda steps: [frame for step in steps for frame in step]
)


#: The frame sequences issue 9 found stopping the server; every run tries them first:
#: deep nesting, and a ping after our close (1003 binary, 1009 too big, 1008 rate limit).
ISSUE_FRAME_SEQUENCES: Final = [
    [Frame(OP_TEXT, b'{"type":"ping","x":' + b"[" * 1000 + b"]" * 1000 + b"}")],
    [Frame(OP_BINARY, b"bin"), Frame(OP_PING, b"late")],
    [Frame(OP_TEXT, b"x" * 5000), Frame(OP_PING, b"late")],
    [Frame(OP_TEXT, b'{"type":"ping"}')] * 12 + [Frame(OP_PING, b"late")],
]


def encode_sequence(frames: list[Frame | Junk]) -> bytes:
    return b"".join(f.encode() for f in frames)
