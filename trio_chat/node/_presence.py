"""Who is in which room, here and on peers: the one path of presence to the hub and the cluster.

Local changes (a session joins or leaves a room, types) and remote ones (a peer's join or
leave, its periodic snapshot, its death) all go through `Presence`: it keeps the hub's
subscriptions, each peer's members per room, and tells local clients (through the hub) and
peers (through `PresenceOut`) what changed.

Presence is state, not history: an event that does not fit in the hub's queue is dropped,
and the members list of the next ``joined`` is still right.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Protocol

from ..protocol._names import name_keys
from ..protocol._wire import Presence as PresenceEvent
from ..protocol._wire import TypingEvent

if TYPE_CHECKING:
    from ..server._hub import Hub
    from ..server._ports import Member


class PresenceOut(Protocol):
    """Where local presence goes to peers (`_cluster.Broadcaster`)."""

    def send_presence(self, room: str, name: str, *, joined: bool) -> None: ...

    def send_typing(self, room: str, name: str) -> None: ...


class Presence:
    """Rooms' members, local and remote.

    Args:
      hub: the local subscriptions and fan-out.
      peers: where local changes go, or None without a cluster.
    """

    def __init__(self, hub: Hub, peers: PresenceOut | None) -> None:
        self._hub = hub
        self._peers = peers
        #: Members of each room on each peer: peer -> room -> name -> connections.
        self._remote: dict[str, dict[str, collections.Counter[str]]] = {}
        #: Skeletons of the names in ``_remote``; None when it changed since.
        self._remote_keys: frozenset[str] | None = None

    # -- local --------------------------------------------------------------------------

    def subscribe(self, room: str, member: Member) -> None:
        """Start ``member``'s broadcasts of ``room``; nobody is told yet (`announce`)."""
        self._hub.subscribe(room, member)

    def unsubscribe_quietly(self, room: str, member: Member) -> None:
        """Undo a `subscribe` that was never announced."""
        self._hub.unsubscribe(room, member)

    def announce(self, room: str, member: Member) -> None:
        """Tell ``room``, here and on peers, that ``member`` arrived."""
        self._hub.publish_nowait(room, PresenceEvent(room=room, joined=member.name), exclude=member)
        if self._peers is not None:
            self._peers.send_presence(room, member.name, joined=True)

    def leave(self, room: str, member: Member) -> None:
        """Unsubscribe ``member`` from ``room``; if it was in, tell the room everywhere."""
        if self._hub.unsubscribe(room, member):
            self._hub.publish_nowait(
                room, PresenceEvent(room=room, left=member.name), exclude=member
            )
            if self._peers is not None:
                self._peers.send_presence(room, member.name, joined=False)

    def typing(self, room: str, event: TypingEvent, member: Member) -> None:
        self._hub.publish_nowait(room, event, exclude=member)
        if self._peers is not None:
            self._peers.send_typing(room, member.name)

    def rooms_of(self, member: Member) -> frozenset[str]:
        return self._hub.rooms_of(member)

    def members(self, room: str) -> list[str]:
        """Who is in ``room``: here first, then on peers."""
        names = dict.fromkeys(self._hub.members(room))
        for rooms in self._remote.values():
            names.update(dict.fromkeys(rooms.get(room, ())))
        return list(names)

    def local_rooms(self) -> dict[str, list[str]]:
        """This node's members of each room: the snapshot peers get."""
        return {room: self._hub.members(room) for room in self._hub.room_names()}

    # -- remote -------------------------------------------------------------------------

    def remote_names(self) -> set[str]:
        """Every name in a room on a peer (peers announce no one else)."""
        return {
            name for rooms in self._remote.values() for names in rooms.values() for name in names
        }

    def remote_name_keys(self) -> frozenset[str]:
        """The confusable skeletons of every name in a room on a peer, kept until remote
        presence changes.

        A join storm claims many names while remote presence stands still: each claim
        is then a set lookup, not a pass over every remote name.
        """
        if self._remote_keys is None:
            self._remote_keys = frozenset(
                key for name in self.remote_names() for key in name_keys(name)
            )
        return self._remote_keys

    def remote_change(self, peer: str, room: str, name: str, *, joined: bool) -> None:
        """A peer's session joined or left ``room``; a name with several sessions there
        arrives with the first and leaves with the last."""
        self._remote_keys = None
        names = self._remote.setdefault(peer, {}).setdefault(room, collections.Counter())
        if joined:
            names[name] += 1
            if names[name] == 1:
                self._hub.publish_nowait(room, PresenceEvent(room=room, joined=name))
        elif names[name] > 0:
            names[name] -= 1
            if names[name] == 0:
                del names[name]
                self._hub.publish_nowait(room, PresenceEvent(room=room, left=name))

    def remote_snapshot(self, peer: str, rooms: dict[str, list[str]]) -> None:
        """A peer's whole presence: tell each room the difference from what we had."""
        old = self._remote.get(peer, {})
        new = {room: collections.Counter(names) for room, names in rooms.items()}
        for room in old.keys() | new.keys():
            before, after = set(old.get(room, ())), set(new.get(room, ()))
            for name in after - before:
                self._hub.publish_nowait(room, PresenceEvent(room=room, joined=name))
            for name in before - after:
                self._hub.publish_nowait(room, PresenceEvent(room=room, left=name))
        self._remote[peer] = new
        self._remote_keys = None

    def peer_down(self, peer: str) -> None:
        """A peer is gone: its members leave their rooms."""
        self.remote_snapshot(peer, {})
        del self._remote[peer]

    def remote_typing(self, room: str, name: str) -> None:
        self._hub.publish_nowait(room, TypingEvent(room=room, sender=name))
