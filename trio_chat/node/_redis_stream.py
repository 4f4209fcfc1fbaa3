"""The Redis engine's stream entries (a write batch packed into one, and read back) and
a node's position in the stream (kept in its data dir).

An entry has two fields: ``o``, the origin node, and ``d``, a msgpack list of its
payloads in order. An entry of any other shape was written by something else sharing the
key prefix: `unpack` says so with `MalformedEntry`, and the reader skips it.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from pathlib import Path

    from coredis.response.types import StreamEntry

#: Payload bytes one entry holds at most (a payload over it goes alone).
ENTRY_BYTES: Final = 512 * 1024
_encoder: Final = msgspec.msgpack.Encoder()
_payloads: Final = msgspec.msgpack.Decoder(list[bytes])


class MalformedEntry(ValueError):
    """A stream entry that no node of this version wrote."""


def pack(origin: bytes, payloads: list[bytes]) -> list[dict[bytes, bytes]]:
    """The fields of the entries that carry ``payloads``, in order: as few as hold them
    in `ENTRY_BYTES` each."""
    batches: list[list[bytes]] = [[]]
    size = 0
    for payload in payloads:
        if batches[-1] and size + len(payload) > ENTRY_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(payload)
        size += len(payload)
    return [{b"o": origin, b"d": _encoder.encode(batch)} for batch in batches]


def unpack(entry: StreamEntry) -> tuple[str, list[bytes]]:
    """An entry's origin and payloads.

    Raises:
      MalformedEntry: a field is missing or not what `pack` writes.
    """
    fields = entry.field_values
    try:
        origin = text(fields[b"o"])
        packed = fields[b"d"]
        if not isinstance(packed, bytes):
            raise TypeError(packed)
        return origin, _payloads.decode(packed)
    except (KeyError, UnicodeDecodeError, TypeError, msgspec.DecodeError) as exc:
        raise MalformedEntry(exc.__class__.__name__) from None


def text(value: str | bytes) -> str:
    """A reply's string (coredis gives bytes: the client does not decode)."""
    return value if isinstance(value, str) else value.decode()


def id_key(stream_id: str) -> tuple[int, int]:
    """A stream id (``<ms>-<seq>``) as a key that sorts as Redis does."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def load_position(path: Path) -> str:
    """The last stream id a node processed; ``$`` for a new node (only what is sent from
    now on: its history comes from catch-up)."""
    try:
        saved = path.read_text().strip()
    except FileNotFoundError:
        return "$"
    return saved or "$"


def save_position(path: Path, stream_id: str) -> None:
    """Keep ``stream_id`` in ``path``, atomically: a crash leaves the old id or the new."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".stream-id")
    with os.fdopen(fd, "w") as file:
        file.write(stream_id)
    os.replace(temporary, path)
