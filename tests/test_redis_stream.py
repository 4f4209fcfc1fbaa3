"""The Redis engine's entry format (`_redis_stream`): what a batch packs into, what reads back.

The engine's behaviour over a real redis-server is in test_cluster_redis.py; this checks
the bounds of one entry and every malformed shape, which a server test reaches only in
part.
"""

from __future__ import annotations

import msgspec
import pytest
from coredis.response.types import StreamEntry

from trio_chat.node._redis_stream import ENTRY_BYTES, MalformedEntry, pack, unpack


def entry(fields: dict[bytes, bytes]) -> StreamEntry:
    return StreamEntry(b"1-0", fields, None, None)  # type: ignore[arg-type]


def test_a_batch_is_one_entry_up_to_the_bound_and_keeps_its_order() -> None:
    small = [b"a" * 1000, b"b" * 2000, b"c"]
    assert [unpack(entry(fields)) for fields in pack(b"n1", small)] == [("n1", small)]
    third = ENTRY_BYTES // 3 + 1
    payloads = [bytes([i]) * third for i in range(5)]
    packed = [unpack(entry(fields))[1] for fields in pack(b"n1", payloads)]
    assert [len(batch) for batch in packed] == [2, 2, 1]
    assert [p for batch in packed for p in batch] == payloads


def test_a_payload_over_the_bound_goes_alone() -> None:
    huge = b"x" * (ENTRY_BYTES + 1)
    packed = [unpack(entry(fields))[1] for fields in pack(b"n1", [b"a", huge, b"b"])]
    assert packed == [[b"a"], [huge], [b"b"]]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"o": b"n1"},
        {b"d": msgspec.msgpack.encode([b"x"])},
        {b"o": b"n1", b"d": b"\xc1"},
        {b"o": b"n1", b"d": msgspec.msgpack.encode({"a": 1})},
        {b"o": b"n1", b"d": msgspec.msgpack.encode([1, 2])},
        {b"o": b"\xff", b"d": msgspec.msgpack.encode([b"x"])},
        {b"o": b"n1", b"d": "text"},
    ],
)
def test_what_pack_does_not_write_is_malformed(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(MalformedEntry):
        unpack(entry(fields))
