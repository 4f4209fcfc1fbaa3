"""The hub's fan-out, with recording subscribers: who gets which frame, in what order."""

from __future__ import annotations

import trio
import trio.testing

from trio_chat.node._presence import COUNT_INTERVAL
from trio_chat.node._presence import Presence as PresenceState
from trio_chat.protocol._wire import (
    Ack,
    Members,
    MessageEvent,
    Presence,
    TypingEvent,
    decode_events,
)
from trio_chat.server._hub import Hub, Item, Outgoing


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.owner = b""  # no client secret: its name is nobody else's to take over
        self.frames: list[Outgoing] = []

    def deliver_nowait(self, out: Outgoing) -> None:
        self.frames.append(out)

    def events(self) -> list[object]:
        return [e for out in self.frames for e in decode_events(out.payload)]


def message(n: int) -> MessageEvent:
    return MessageEvent(room="r", id=f"{n:016x}-n", sender="x", text=f"m{n}", ts=0.0)


async def test_one_shared_frame_and_personal_frames_only_for_the_excluded(
    nursery: trio.Nursery,
) -> None:
    hub = Hub()
    a, b, c, d = (Recorder(n) for n in "abcd")
    for sub in (a, b, c, d):
        hub.subscribe("r", sub)
    hub.subscribe("other", d)
    joined, typing = Presence(room="r", joined="a"), TypingEvent(room="r", sender="b")
    # queued before the fan-out task runs, so they form one batch
    await hub.publish("r", message(1))
    hub.publish_nowait("r", joined, exclude=a)
    hub.publish_nowait("r", typing, exclude=b)
    await hub.publish_to(a, "r", Ack(id=message(1).id, cid="c"))
    await nursery.start(hub.run)
    await trio.testing.wait_all_tasks_blocked()
    assert a.events() == [message(1), typing, Ack(id=message(1).id, cid="c")]
    assert b.events() == [message(1), joined]
    assert c.events() == [message(1), joined, typing]
    # c and d share one encoded frame; nothing went to the room d did not hear from
    assert c.frames == d.frames
    assert c.frames[0] is d.frames[0]
    stats = hub.statistics()
    assert stats.frames == 1
    assert stats.batches == 1


async def test_unsubscribed_and_empty_rooms_get_nothing(nursery: trio.Nursery) -> None:
    hub = Hub()
    a = Recorder("a")
    hub.subscribe("r", a)
    assert hub.unsubscribe("r", a)
    assert not hub.unsubscribe("r", a)
    await nursery.start(hub.run)
    await hub.publish("r", message(1))
    await trio.testing.wait_all_tasks_blocked()
    assert a.frames == []
    assert hub.statistics().subscriptions == 0
    assert hub.room_names() == []


async def test_a_big_room_gets_head_counts_once_per_interval_and_its_list_back_when_small(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub = Hub()
    presence = PresenceState(hub, None, names_max=2)
    await nursery.start(hub.run)
    nursery.start_soon(presence.run_counts)
    a, b, c, d, e = (Recorder(n) for n in "abcde")

    def arrive(sub: Recorder) -> None:
        presence.subscribe("r", sub)  # type: ignore[arg-type]
        presence.announce("r", sub)  # type: ignore[arg-type]

    for sub in (a, b):
        arrive(sub)
    await trio.testing.wait_all_tasks_blocked()
    assert presence.snapshot("r") == (["a", "b"], 2)
    assert a.events() == [Presence(room="r", joined="b")]
    # Over the limit: no presence event, one count within an interval.
    for sub in (c, d, e):
        arrive(sub)
    assert presence.snapshot("r") == ([], 5)
    await trio.sleep(COUNT_INTERVAL)
    await trio.testing.wait_all_tasks_blocked()
    assert a.events() == [Presence(room="r", joined="b"), Members(room="r", count=5)]
    assert e.events() == [Members(room="r", count=5)]
    # A count that did not move is not sent again; one that moved is, once.
    await trio.sleep(3 * COUNT_INTERVAL)
    assert len(a.frames) == 2
    for sub in (e, d):
        presence.leave("r", sub)  # type: ignore[arg-type]
    await trio.sleep(3 * COUNT_INTERVAL)
    assert a.events()[2:] == [Members(room="r", count=3)]
    # Down to half the limit: the list comes at once, then presence resumes.
    presence.leave("r", c)  # type: ignore[arg-type]
    presence.leave("r", b)  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()
    assert a.events()[3:] == [
        Members(room="r", count=1, names=["a"]),
        Presence(room="r", left="b"),
    ]
    assert presence.snapshot("r") == (["a"], 1)
    presence.leave("r", a)  # type: ignore[arg-type]
    assert presence.snapshot("r") == ([], 0)


async def test_a_commit_is_one_item_and_a_sender_gets_its_messages_and_acks_in_one_frame(
    nursery: trio.Nursery,
) -> None:
    hub = Hub()
    sender, other, gone = Recorder("sender"), Recorder("other"), Recorder("gone")
    hub.subscribe("r", sender)
    hub.subscribe("r", other)
    await nursery.start(hub.run)
    acks = [Ack(id=message(n).id, cid=f"c{n}") for n in (1, 2)]
    # gone left the room before its message was committed: it still gets its ack
    await hub.publish_many(
        [
            Item("r", message(1)),
            Item("r", acks[0], only=sender),
            Item("r", message(2)),
            Item("r", acks[1], only=sender),
            Item("r", message(3)),
            Item("r", Ack(id=message(3).id), only=gone),
        ]
    )
    await trio.testing.wait_all_tasks_blocked()
    assert len(sender.frames) == 1
    assert sender.events() == [message(1), acks[0], message(2), acks[1], message(3)]
    assert len(other.frames) == 1
    assert other.events() == [message(1), message(2), message(3)]
    assert gone.events() == [Ack(id=message(3).id)]
    assert hub.statistics().batches == 1


async def test_a_big_commit_reaches_everyone_in_frames_of_a_bounded_size(
    nursery: trio.Nursery,
) -> None:
    hub = Hub()
    sender, other = Recorder("sender"), Recorder("other")
    hub.subscribe("r", sender)
    hub.subscribe("r", other)
    await nursery.start(hub.run)
    items = []
    for n in range(1200):
        items += [Item("r", message(n)), Item("r", Ack(id=message(n).id), only=sender)]
    await hub.publish_many(items)
    await trio.testing.wait_all_tasks_blocked()
    # a frame carries at most 512 events: the acks count too
    assert [len(out.events) for out in other.frames] == [256] * 4 + [176]
    assert other.events() == [message(n) for n in range(1200)]
    assert [len(out.events) for out in sender.frames] == [512] * 4 + [352]
    assert sender.events() == [item.event for item in items]


async def test_events_only_for_others_send_nobody_an_empty_frame(nursery: trio.Nursery) -> None:
    hub = Hub()
    a, b = Recorder("a"), Recorder("b")
    hub.subscribe("r", a)
    hub.subscribe("r", b)
    await nursery.start(hub.run)
    await hub.publish_many([Item("r", Ack(id=message(1).id, duplicate=True), only=a)])
    await trio.testing.wait_all_tasks_blocked()
    assert a.events() == [Ack(id=message(1).id, duplicate=True)]
    assert b.frames == []
    assert hub.statistics().frames == 0
