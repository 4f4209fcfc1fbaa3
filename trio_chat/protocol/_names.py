"""Nicknames: what a name may be, when two names are one, and whose a name is.

Theory of operation: this module is pure (no trio, no clock, no sockets). A name from a
client goes through `normalize_name_untrusted`: NFKC, then the nickname pattern, then a
refusal of anything invisible (control, format, private-use, unassigned and
default-ignorable characters: U+3164 HANGUL FILLER is a letter that shows as nothing).
Two names are one when their confusable skeletons are equal (Unicode Technical Standard
#39, section 4: NFD, map every character to its prototype in Unicode's
``confusables.txt``, NFD again), so ``alice`` spelt with a Cyrillic ``a`` (U+0430) is ``alice``.

The confusables data is the copy the ``confusable-homoglyphs`` package ships. That
package turns each line ``source ; prototype`` into an entry in both directions (and wraps
right-to-left characters in direction marks for display); `prototypes` recovers the
direction: a source has exactly one entry, and was written before a prototype that is new
on the source's line, while a prototype has several entries, or was written after its one
source.

A name's owner (open mode) is `owner_digest` of the secret its client sent
(``?client_id=``): nodes tell each other owners, never secrets.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import re
import unicodedata
from typing import Final

#: Nicknames, after NFKC: a Unicode letter, digit or ``_``, then up to 31 of those or
#: ``.`` / ``-``.
NAME_PATTERN: Final = r"\w[\w.-]{0,31}"
#: The longest name taken as input: NFKC may compose (``a`` + U+0301 is ``á``), so the
#: pattern's bound is checked after it.
MAX_NAME_INPUT: Final = 128

_NAME_RE: Final = re.compile(NAME_PATTERN)
# The BLAKE2b personalization of `owner_digest`: its digests never equal a retry key's.
_OWNER_PERSON: Final = b"trio-chat owner"
# Control, format, line and paragraph separators, private use, surrogates, unassigned.
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
# Default_Ignorable_Code_Point (Unicode 15, DerivedCoreProperties.txt): characters shown
# as nothing. Some are letters (Lo) or marks (Mn), which the categories above miss.
_DEFAULT_IGNORABLE: Final = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# Left-to-right and right-to-left marks the package adds around right-to-left glyphs.
_DIRECTION_MARKS: Final = str.maketrans("", "", "\u200e\u200f")


def is_invisible(char: str) -> bool:
    """Whether ``char`` (one code point) shows as nothing or controls the text around it."""
    if unicodedata.category(char) in _INVISIBLE_CATEGORIES:
        return True
    point = ord(char)
    return any(first <= point <= last for first, last in _DEFAULT_IGNORABLE)


def normalize_name_untrusted(raw: str) -> str | None:
    """The name a client asked for, normalized; None if it breaks the rules.

    Args:
      raw: the name exactly as received (``?name=`` or ``hello``).

    Returns:
      Its NFKC form when that matches `NAME_PATTERN` and holds no invisible character,
      else None.
    """
    if len(raw) > MAX_NAME_INPUT:
        return None
    name = unicodedata.normalize("NFKC", raw)
    if _NAME_RE.fullmatch(name) is None or any(is_invisible(c) for c in name):
        return None
    return name


@functools.cache
def prototypes() -> dict[str, str]:
    """Unicode's confusables: each source character's prototype (see the module doc)."""
    data = importlib.resources.files("confusable_homoglyphs").joinpath("confusables.json")
    raw: dict[str, list[dict[str, str]]] = json.loads(data.read_text(encoding="utf-8"))
    order = {key: i for i, key in enumerate(raw)}
    table: dict[str, str] = {}
    for key, entries in raw.items():
        source = key.translate(_DIRECTION_MARKS)
        if len(source) != 1 or len(entries) != 1:
            continue
        target = entries[0]["c"]
        prototype = target.translate(_DIRECTION_MARKS)
        if order[target] > order[key] or len(raw[target]) > 1 or len(prototype) > 1:
            table[source] = prototype
    return table


@functools.lru_cache(maxsize=65536)
def skeleton(name: str) -> str:
    """The confusable skeleton of ``name`` (UTS #39): equal skeletons look alike."""
    table = prototypes()
    mapped = "".join(table.get(c, c) for c in unicodedata.normalize("NFD", name))
    return unicodedata.normalize("NFD", mapped)


def name_keys(name: str) -> frozenset[str]:
    """What a name in use holds: another name sharing any of these is taken.

    Its UTS #39 skeleton, and the skeleton of its case fold: skeletons keep case, but
    ``Alice`` beside ``alice`` is the same impersonation as ``alice`` with a Cyrillic ``a``. Folding before
    the skeleton alone would lose pairs the skeleton matches only in their own case
    (``Iion`` and ``lion``), so a name holds both.
    """
    return frozenset((skeleton(name), skeleton(name.casefold())))


def owner_digest(client_id: str) -> bytes:
    """The owner of the names of the client with secret ``client_id``, as peers learn it.

    The digest cannot be turned back into the secret, and a client presents a secret,
    never a digest: knowing an owner gains nothing.
    """
    return hashlib.blake2b(client_id.encode(), digest_size=16, person=_OWNER_PERSON).digest()
