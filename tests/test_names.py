"""Nicknames without sockets: normalization, invisible characters, confusable skeletons."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import ProtocolError
from trio_chat.protocol._names import (
    NAME_PATTERN,
    is_invisible,
    name_keys,
    normalize_name_untrusted,
    prototypes,
    skeleton,
)
from trio_chat.protocol._wire import Hello, decode_command_untrusted

CYRILLIC_A = "\u0430"
CYRILLIC_IE = "\u0435"


@pytest.mark.parametrize(
    "raw",
    [
        "alice\n",  # a trailing newline passed the old ``$``
        "al\nice",
        "alice\r",
        "\u3164",  # HANGUL FILLER: a letter (Lo) that shows as nothing
        "alice\u3164",
        "\u115f",  # HANGUL CHOSEONG FILLER
        "\uffa0bob",  # HALFWIDTH HANGUL FILLER (NFKC makes it U+1160, also ignorable)
        "a\u200db",  # ZERO WIDTH JOINER (Cf)
        "\u202ealice",  # RIGHT-TO-LEFT OVERRIDE
        "alice\u00ad",  # SOFT HYPHEN
        "bob\ufe0f",  # VARIATION SELECTOR-16
        "x\U000e0041",  # TAG LATIN CAPITAL LETTER A
        "\ue000",  # private use
        "with space",
        "<b>",
        "",
        "-dash-first",
        "x" * 33,
        "x" * 200,
    ],
)
def test_names_that_are_refused(raw: str) -> None:
    assert normalize_name_untrusted(raw) is None
    frame = '{"type":"hello","name":' + _json_string(raw) + "}"
    with pytest.raises(ProtocolError) as info:
        decode_command_untrusted(frame)
    assert info.value.code == "bad_name"


def _json_string(text: str) -> str:
    return json.dumps(text)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("alice", "alice"),
        ("\uff41\uff4c\uff49\uff43\uff45", "alice"),  # fullwidth
        ("\U0001d41a\U0001d425ice", "alice"),  # mathematical bold a, l
        ("e\u0301lodie", "\u00e9lodie"),  # composed
        ("\u2167", "VIII"),  # ROMAN NUMERAL EIGHT
        ("\u0417\u043e\u044f", "\u0417\u043e\u044f"),  # Cyrillic is fine on its own
        ("\ud55c\uae00", "\ud55c\uae00"),  # Hangul syllables are fine
        ("e\u0301" * 20, "\u00e9" * 20),  # 40 code points, 20 once composed
    ],
)
def test_names_are_nfkc_normalized(raw: str, name: str) -> None:
    assert normalize_name_untrusted(raw) == name
    assert decode_command_untrusted('{"type":"hello","name":' + _json_string(raw) + "}") == Hello(
        name=name
    )


@given(st.text(max_size=40))
def test_a_normalized_name_is_stable_visible_and_follows_the_pattern(raw: str) -> None:
    name = normalize_name_untrusted(raw)
    if name is None:
        return
    assert re.fullmatch(NAME_PATTERN, name)
    assert not any(is_invisible(c) for c in name)
    assert normalize_name_untrusted(name) == name


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("alice", CYRILLIC_A + "lice"),
        ("alice", "alic" + CYRILLIC_IE),
        ("paypal", "\u0440\u0430ypal"),
        ("bob", "b\u03bfb"),  # Greek omicron
        ("lion", "Iion"),  # capital I is l
        ("l0l", "lOl"),
        ("ma", "rna"),  # m is r + n
    ],
)
def test_names_that_look_alike_have_one_skeleton(one: str, other: str) -> None:
    assert one != other
    assert skeleton(one) == skeleton(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [("alice", "Alice"), ("alice", "ALICE"), ("alice", "\u0410lice"), ("lion", "Iion")],
)
def test_names_that_differ_only_in_case_are_taken_too(one: str, other: str) -> None:
    assert not name_keys(one).isdisjoint(name_keys(other))


@pytest.mark.parametrize(("one", "other"), [("alice", "bob"), ("alice", "alice2"), ("al", "a1i")])
def test_different_names_have_different_skeletons(one: str, other: str) -> None:
    assert skeleton(one) != skeleton(other)
    assert name_keys(one).isdisjoint(name_keys(other))


def test_the_confusables_table_maps_sources_to_prototypes() -> None:
    table = prototypes()
    # Unicode's confusables.txt has about 6,300 mappings
    assert len(table) > 6000
    assert table[CYRILLIC_A] == "a"
    assert table["m"] == "rn"
    assert table["0"] == "O"
    # a prototype is never a source: the map is applied once
    assert not set(table.values()) & set(table)
