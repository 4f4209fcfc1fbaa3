"""Message ids: unique across processes and hosts, and sortable in time order.

An id is ``<16 hex digits>-<node id>``. The hex digits are a hybrid logical clock: the
top 48 bits are Unix milliseconds, the low 16 a counter. The clock never goes backwards
(a wall clock that steps back keeps the last time and bumps the counter), and it moves
past every remote id it witnesses, so an id assigned after seeing a message sorts after
it. Fixed width makes string order equal time order; the node id breaks ties.
"""

from __future__ import annotations

from typing import Final

_COUNTER_BITS: Final = 16
_COUNTER_MASK: Final = (1 << _COUNTER_BITS) - 1


class IdClock:
    """A hybrid logical clock that hands out message ids for one node.

    Args:
      node_id: this node's id, the suffix of every id it makes.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._last = 0

    def next_id(self, now_ms: int) -> str:
        """Return a fresh id, later than every id made or witnessed so far."""
        candidate = now_ms << _COUNTER_BITS
        self._last = candidate if candidate > self._last else self._last + 1
        return f"{self._last:016x}-{self.node_id}"

    def witness(self, message_id: str) -> None:
        """Move the clock past a remote id so later local ids sort after it."""
        try:
            stamp = int(message_id[:16], 16)
        except ValueError:
            return
        self._last = max(self._last, stamp)


def id_millis(message_id: str) -> int:
    """The Unix milliseconds an id was made at (assumes a well-formed id)."""
    return int(message_id[:16], 16) >> _COUNTER_BITS


def id_floor(millis: int) -> str:
    """The smallest id string at ``millis``: every id made at or after it sorts above."""
    return f"{max(millis, 0) << _COUNTER_BITS:016x}-"
