"""What the terminal client keeps across connections: rooms and unacked sends."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

#: Ids remembered per room for de-duplication; replays are at most a few hundred.
SEEN_IDS_PER_ROOM: Final = 5000


@dataclass
class Room:
    name: str
    last_id: str | None = None
    joined: bool = False
    #: The join was refused (``store_unavailable``): join again at the next retry.
    rejoin: bool = False
    seen: set[str] = field(default_factory=set)
    seen_order: deque[str] = field(default_factory=deque)
    #: Who is in the room (``joined``, then ``presence``), for ``/who``.
    members: set[str] = field(default_factory=set)
    #: A big room's head count (the server lists nobody there), or None: ``members`` is all.
    head_count: int | None = None
    #: Who is typing here -> when their "is typing" ends (``trio.current_time()``).
    typing: dict[str, float] = field(default_factory=dict)

    def remember(self, msg_id: str) -> bool:
        """Record ``msg_id``; return False if it was seen before."""
        if msg_id in self.seen:
            return False
        self.seen.add(msg_id)
        self.seen_order.append(msg_id)
        if len(self.seen_order) > SEEN_IDS_PER_ROOM:
            self.seen.discard(self.seen_order.popleft())
        if self.last_id is None or msg_id > self.last_id:
            self.last_id = msg_id
        return True


@dataclass
class Pending:
    cid: str
    room: str
    text: str
    sent_at: float = -math.inf
