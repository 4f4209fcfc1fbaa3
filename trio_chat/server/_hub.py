"""The hub: rooms, their subscribers, and the one task that fans broadcasts out.

Publishers put events into a bounded memory channel, one item per call: one event, or a
whole commit's messages and acks (`Hub.publish_many`). The fan-out task takes everything
waiting, groups it by room, encodes each room's events once (one payload of newline-joined
JSON, framed once) and hands the same `Outgoing` to every subscriber, whose
``deliver_nowait`` is a non-blocking write. No per-recipient await: that is what keeps the
cost of a delivery near one syscall. A subscriber some of the room's events are only for
(its acks) or not for (its own presence) gets one frame of its own instead, in the same
order: a sender's messages and their acks reach it in one write.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import trio

from ..protocol._frames import encode_text_frame
from ..protocol._wire import Event, encode_events

if TYPE_CHECKING:
    from collections.abc import Iterable

# Room for a burst from every connection at once; a full channel makes publishers wait,
# which pushes back on their sockets instead of growing memory. An item is one event or
# one commit's events (at most twice the commit task's batch bound).
_QUEUE_SIZE: Final = 4096
# Events per frame (a commit's item is cut into frames of this many), and the events a
# round takes before it stops taking more items.
_MAX_BATCH: Final = 512
# Writes between checkpoints, so one huge room never stalls the rest of the process.
_WRITES_PER_CHECKPOINT: Final = 256


class Outgoing:
    """One encoded run of events for one room, shared by every recipient."""

    __slots__ = ("_frame", "_text", "events", "payload", "room")

    def __init__(self, room: str, events: list[Event]) -> None:
        self.room = room
        self.events = events
        self.payload = encode_events(events)
        self._frame: bytes | None = None
        self._text: str | None = None

    @property
    def frame(self) -> bytes:
        """The payload as one WebSocket text frame, built on first use."""
        if self._frame is None:
            self._frame = encode_text_frame(self.payload)
        return self._frame

    @property
    def text(self) -> str:
        """The payload as text, for transports that send str (the ASGI fallback)."""
        if self._text is None:
            self._text = self.payload.decode()
        return self._text


class Subscriber(Protocol):
    """A client connection as the hub sees it."""

    name: str

    def deliver_nowait(self, out: Outgoing) -> None:
        """Queue a broadcast for the client. Must not block or raise."""


@dataclasses.dataclass(frozen=True)
class HubStatistics:
    rooms: int
    subscriptions: int
    subscribers: int
    queued: int
    batches: int
    frames: int
    deliveries: int


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One event for a room's subscribers (`Hub.publish_many`)."""

    room: str
    event: Event
    #: Everyone in the room but this subscriber (typing, presence)...
    exclude: Subscriber | None = None
    #: ...or only this one (an ack, ordered after the message it acknowledges).
    only: Subscriber | None = None


class Hub:
    """Rooms and their subscribers, and the fan-out task (`run`)."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[Subscriber, None]] = {}
        self._subscribed: dict[Subscriber, set[str]] = {}
        self._send, self._receive = trio.open_memory_channel[list[Item]](_QUEUE_SIZE)
        self._batches = 0
        self._frames = 0
        self._deliveries = 0

    # -- membership ---------------------------------------------------------------------

    def subscribe(self, room: str, sub: Subscriber) -> bool:
        """Add ``sub`` to ``room``; False if it was already there."""
        subs = self._rooms.setdefault(room, {})
        if sub in subs:
            return False
        subs[sub] = None
        self._subscribed.setdefault(sub, set()).add(room)
        return True

    def unsubscribe(self, room: str, sub: Subscriber) -> bool:
        """Remove ``sub`` from ``room``; False if it was not there."""
        subs = self._rooms.get(room)
        if subs is None or sub not in subs:
            return False
        del subs[sub]
        if not subs:
            del self._rooms[room]
        rooms = self._subscribed[sub]
        rooms.discard(room)
        if not rooms:
            del self._subscribed[sub]
        return True

    def rooms_of(self, sub: Subscriber) -> frozenset[str]:
        return frozenset(self._subscribed.get(sub, ()))

    def members(self, room: str) -> list[str]:
        """Names of the local subscribers of ``room``, in join order, without repeats."""
        return list(dict.fromkeys(sub.name for sub in self._rooms.get(room, ())))

    def room_names(self) -> list[str]:
        return sorted(self._rooms)

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, room: str, event: Event, *, exclude: Subscriber | None = None) -> None:
        """Queue ``event`` for every subscriber of ``room`` (but ``exclude``).

        Cancellation: a checkpoint; waits only while the hub's queue is full.
        """
        await self._send.send([Item(room, event, exclude)])

    async def publish_many(self, items: list[Item]) -> None:
        """Queue ``items`` in order, as one item of the hub's queue.

        Cancellation: as `publish`.
        """
        await self._send.send(items)

    async def publish_to(self, sub: Subscriber, room: str, event: Event) -> None:
        """Queue ``event`` for ``sub`` alone, in order with the room's broadcasts.

        Cancellation: as `publish`.
        """
        await self._send.send([Item(room, event, only=sub)])

    def publish_nowait(self, room: str, event: Event, *, exclude: Subscriber | None = None) -> bool:
        """Queue an ephemeral event (typing); False, and dropped, if the queue is full."""
        try:
            self._send.send_nowait([Item(room, event, exclude)])
        except trio.WouldBlock:
            return False
        return True

    # -- fan-out ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """The fan-out task: deliver everything published, forever."""
        task_status.started()
        while True:
            batch = list(await self._receive.receive())
            while len(batch) < _MAX_BATCH:
                try:
                    batch.extend(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._batches += 1
            writes = 0
            for room, items in _per_room(batch):
                subs = self._rooms.get(room, {})
                # Subscribers that get a frame of their own: those some events are only
                # for (acks, refusals; they may have left the room) or not for.
                own = {item.only for item in items if item.only is not None}
                own.update(item.exclude for item in items if item.exclude is not None)
                for sub in own:
                    events = _events_for(items, sub, sub in subs)
                    if events:
                        sub.deliver_nowait(Outgoing(room, events))
                    writes += 1
                    if writes % _WRITES_PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()
                others = [sub for sub in subs if sub not in own]
                shared = [i.event for i in items if i.only is None] if others else []
                if shared:
                    out = Outgoing(room, shared)
                    self._frames += 1
                    for sub in others:
                        sub.deliver_nowait(out)
                        writes += 1
                        if writes % _WRITES_PER_CHECKPOINT == 0:
                            await trio.lowlevel.checkpoint()
                self._deliveries += len(subs)
            await trio.lowlevel.checkpoint()

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            rooms=len(self._rooms),
            subscriptions=sum(len(s) for s in self._rooms.values()),
            subscribers=len(self._subscribed),
            queued=self._receive.statistics().current_buffer_used,
            batches=self._batches,
            frames=self._frames,
            deliveries=self._deliveries,
        )


def _per_room(batch: Iterable[Item]) -> list[tuple[str, list[Item]]]:
    """A batch's items per room, in order, in runs of at most `_MAX_BATCH` (one frame each)."""
    per_room: dict[str, list[Item]] = {}
    for item in batch:
        items = per_room.get(item.room)
        if items is None:
            per_room[item.room] = [item]
        else:
            items.append(item)
    return [
        (room, items[start : start + _MAX_BATCH])
        for room, items in per_room.items()
        for start in range(0, len(items), _MAX_BATCH)
    ]


def _events_for(items: list[Item], sub: Subscriber, subscribed: bool) -> list[Event]:
    """The events of a room's run that ``sub`` gets: its own, and the room's if it is in it."""
    if not subscribed:
        return [item.event for item in items if item.only is sub]
    return [
        item.event
        for item in items
        if (item.only is None or item.only is sub) and item.exclude is not sub
    ]
