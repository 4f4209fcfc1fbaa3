"""The wire protocol, with no sockets: decoding is total, encoding round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import ProtocolError
from trio_chat.protocol._ids import IdClock, id_millis
from trio_chat.protocol._wire import (
    Join,
    MessageEvent,
    Presence,
    Send,
    decode_command_untrusted,
    decode_events,
    encode_events,
)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_field"),
        ("{}", "unknown_type"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "join"}', "bad_field"),
        ('{"type": "join", "room": 5}', "bad_room"),
        ('{"type": "join", "room": "has space"}', "bad_room"),
        ('{"type": "join", "room": "' + "r" * 65 + '"}', "bad_room"),
        ('{"type": "join", "room": "ok", "since": "nope"}', "bad_id"),
        ('{"type": "history", "room": "ok", "limit": 100000}', "bad_limit"),
        ('{"type": "history", "room": "ok", "limit": 0}', "bad_limit"),
        ('{"type": "hello", "name": "<script>"}', "bad_name"),
        ('{"type": "hello", "name": ""}', "bad_name"),
        ('{"type": "send", "room": "ok", "text": 3}', "bad_field"),
        ('{"type": "send", "room": "ok", "text": "x", "cid": ""}', "bad_cid"),
    ],
)
def test_bad_frames_get_stable_codes(frame: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_command_untrusted(frame)
    assert info.value.code == code


def test_valid_commands_decode() -> None:
    assert decode_command_untrusted('{"type":"join","room":"general"}') == Join(room="general")
    assert decode_command_untrusted(
        '{"type":"send","room":"general","text":"hi","cid":"c-1","extra":true}'
    ) == Send(room="general", text="hi", cid="c-1")


CODES = {
    "bad_json",
    "bad_field",
    "unknown_type",
    "bad_room",
    "bad_name",
    "bad_id",
    "bad_limit",
    "bad_cid",
}


def check_only_protocol_errors(data: bytes | str) -> None:
    try:
        decode_command_untrusted(data)
    except ProtocolError as exc:
        error = exc
    else:
        return
    assert error.code in CODES


@given(st.binary(max_size=300))
def test_random_bytes_only_ever_give_protocol_errors(data: bytes) -> None:
    check_only_protocol_errors(data)


def deeply_nested(depth: int, brackets: str, closed: bool) -> str:
    opener, closer = ('{"a":', "}") if brackets == "{" else ("[", "]")
    inner = opener * depth + "1" + (closer * depth if closed else "")
    return '{"type":"ping","x":' + inner + "}"


@pytest.mark.parametrize("brackets", ["[", "{"])
def test_a_frame_nested_past_the_decoders_limit_is_bad_json(brackets: str) -> None:
    # 2 KB of brackets: msgspec raises RecursionError, which must not escape.
    frame = deeply_nested(1000, brackets, closed=True)
    assert len(frame) < 7000
    with pytest.raises(ProtocolError) as info:
        decode_command_untrusted(frame)
    assert info.value.code == "bad_json"


@given(
    st.integers(min_value=1, max_value=5000),
    st.sampled_from(["[", "{"]),
    st.booleans(),
    st.sampled_from(["", "ping", "join", "send"]),
)
def test_any_nesting_only_ever_gives_protocol_errors(
    depth: int, brackets: str, closed: bool, kind: str
) -> None:
    frame = deeply_nested(depth, brackets, closed)
    check_only_protocol_errors(frame.replace("ping", kind) if kind else frame[1:])


@given(
    st.dictionaries(
        st.sampled_from(["type", "room", "text", "cid", "name", "since", "before", "limit", "x"]),
        st.one_of(
            st.sampled_from(["join", "send", "leave", "typing", "history", "ping", "hello"]),
            st.text(max_size=20),
            st.integers(),
            st.none(),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
def test_random_json_objects_only_ever_give_protocol_errors(obj: dict[str, object]) -> None:
    check_only_protocol_errors(json.dumps(obj))


@given(st.text(), st.text(min_size=1), st.floats(allow_nan=False, allow_infinity=False))
def test_events_round_trip_through_a_batched_frame(text: str, sender: str, ts: float) -> None:
    events = [
        MessageEvent(room="r", id="0000000000000000-n", sender=sender, text=text, ts=ts),
        Presence(room="r", joined=sender),
    ]
    payload = encode_events(events)
    assert payload.count(b"\n") == 1  # JSON escapes newlines inside strings
    assert decode_events(payload) == events


def test_ids_sort_in_time_order_and_never_repeat() -> None:
    clock = IdClock("n1")
    ids = [clock.next_id(1000), clock.next_id(1000), clock.next_id(999), clock.next_id(1001)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert id_millis(ids[-1]) == 1001
    other = IdClock("n2")
    other.witness(ids[-1])
    assert other.next_id(5) > ids[-1]


def test_pure_modules_import_no_trio() -> None:
    code = (
        "import sys, trio_chat.protocol, trio_chat.settings, trio_chat.link._packet, "
        "trio_chat.link._events, trio_chat.link._peer, trio_chat.link._state; "
        "print('trio' in sys.modules)"
    )
    # trio_chat/__init__ imports the app (and trio), link/__init__ its socket shell: stand
    # in for both packages so that only the pure modules themselves are loaded.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys, types\n"
            "for name in ('trio_chat', 'trio_chat.link'):\n"
            "    pkg = types.ModuleType(name)\n"
            "    pkg.__path__ = [os.path.join(os.getcwd(), *name.split('.'))]\n"
            "    sys.modules[name] = pkg\n" + code,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
