"""The hub: rooms, their subscribers, and the one task that fans broadcasts out.

Publishers put events into a bounded memory channel. The fan-out task takes everything
waiting, groups it by room, encodes each room's run of events once (one payload of
newline-joined JSON, framed once) and hands the same `Outgoing` to every subscriber, whose
``deliver_nowait`` is a non-blocking write. No per-recipient await: that is what keeps the
cost of a delivery near one syscall.
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
# which pushes back on their sockets instead of growing memory.
_QUEUE_SIZE: Final = 4096
# Events taken per round: bounds a frame's size and the time between checkpoints.
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
class _Item:
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
        self._send, self._receive = trio.open_memory_channel[_Item](_QUEUE_SIZE)
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
        await self._send.send(_Item(room, event, exclude))

    async def publish_to(self, sub: Subscriber, room: str, event: Event) -> None:
        """Queue ``event`` for ``sub`` alone, in order with the room's broadcasts.

        Cancellation: as `publish`.
        """
        await self._send.send(_Item(room, event, only=sub))

    def publish_nowait(self, room: str, event: Event, *, exclude: Subscriber | None = None) -> bool:
        """Queue an ephemeral event (typing); False, and dropped, if the queue is full."""
        try:
            self._send.send_nowait(_Item(room, event, exclude))
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
            batch = [await self._receive.receive()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._batches += 1
            writes = 0
            for room, only, items in _runs(batch):
                if only is not None:
                    only.deliver_nowait(Outgoing(room, [item.event for item in items]))
                    continue
                subs = self._rooms.get(room)
                if not subs:
                    continue
                shared = Outgoing(room, [item.event for item in items])
                # Events meant for all but one (typing, presence) share the frame; only
                # the subscribers they exclude get a frame of their own without them.
                excluded = {item.exclude for item in items if item.exclude is not None}
                self._frames += 1
                for sub in list(subs):
                    if sub not in excluded:
                        sub.deliver_nowait(shared)
                    else:
                        own = _without(room, items, sub)
                        if own.events:
                            sub.deliver_nowait(own)
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


_Run = tuple[str, "Subscriber | None", list[_Item]]


def _runs(batch: Iterable[_Item]) -> list[_Run]:
    """Group a batch per room, in order, into runs for the room or for one subscriber."""
    per_room: dict[str, list[_Run]] = {}
    for item in batch:
        runs = per_room.setdefault(item.room, [])
        if runs and runs[-1][1] is item.only:
            runs[-1][2].append(item)
        else:
            runs.append((item.room, item.only, [item]))
    return [run for runs in per_room.values() for run in runs]


def _without(room: str, items: list[_Item], sub: Subscriber) -> Outgoing:
    """The run's events but those that exclude ``sub``."""
    return Outgoing(room, [item.event for item in items if item.exclude is not sub])
