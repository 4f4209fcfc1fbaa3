"""Who is in which room, here and on peers: the one path of presence to the hub and the cluster.

Local changes (a session joins or leaves a room, types) and remote ones (a peer's join or
leave, its periodic snapshot, its death) all go through `Presence`: it keeps the hub's
subscriptions, each peer's members per room, and tells local clients (through the hub) and
peers (through `PresenceOut`) what changed.

Presence is state, not history: an event that does not fit in the hub's queue is dropped,
and the members list of the next ``joined`` is still right.

A room lists names, and one name can be held by several sessions: a user's tabs (jwt
mode), or one client that moved to another node while its old session there is still
counted (open mode, `Names.claim`). So ``left`` is told only when no session holds the
name in the room any more, here or on a peer; a ``joined`` may repeat a listed name.

Each peer also says who owns its members' names (`Member.owner`, a digest of the
client's secret), so that `Names` can give a moving client its own name back.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Protocol

from ..protocol._names import name_keys
from ..protocol._wire import Presence as PresenceEvent
from ..protocol._wire import TypingEvent

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..server._hub import Hub
    from ..server._ports import Member


class PresenceOut(Protocol):
    """Where local presence goes to peers (`_cluster.Broadcaster`)."""

    def send_presence(self, room: str, name: str, *, joined: bool, owner: bytes) -> None: ...

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
        #: The owner of each name of each peer, where it said (open mode): peer -> name -> owner.
        self._owners: dict[str, dict[str, bytes]] = {}
        #: Local members of each room by name: room -> name -> sessions (see `_gone`).
        self._here: dict[str, collections.Counter[str]] = {}
        #: The owners of the local members' names that have one: name -> owner.
        self._local_owners: dict[str, bytes] = {}
        #: `remote_holders`; None when remote presence changed since.
        self._holders: dict[str, frozenset[bytes]] | None = None

    # -- local --------------------------------------------------------------------------

    def subscribe(self, room: str, member: Member) -> None:
        """Start ``member``'s broadcasts of ``room``; nobody is told yet (`announce`)."""
        self._hub.subscribe(room, member)

    def unsubscribe_quietly(self, room: str, member: Member) -> None:
        """Undo a `subscribe` that was never announced."""
        self._hub.unsubscribe(room, member)

    def announce(self, room: str, member: Member) -> None:
        """Tell ``room``, here and on peers, that ``member`` arrived."""
        self._here.setdefault(room, collections.Counter())[member.name] += 1
        if member.owner:
            self._local_owners[member.name] = member.owner
        self._hub.publish_nowait(room, PresenceEvent(room=room, joined=member.name), exclude=member)
        if self._peers is not None:
            self._peers.send_presence(room, member.name, joined=True, owner=member.owner)

    def leave(self, room: str, member: Member) -> None:
        """Unsubscribe ``member`` from ``room``; if it was in, tell the room everywhere."""
        if self._hub.unsubscribe(room, member):
            here = self._here.get(room, collections.Counter())
            here[member.name] -= 1
            if here[member.name] <= 0:
                del here[member.name]
            if not here:
                self._here.pop(room, None)
            if not self._hub.rooms_of(member):
                self._local_owners.pop(member.name, None)
            if self._gone(room, [member.name]):
                self._hub.publish_nowait(
                    room, PresenceEvent(room=room, left=member.name), exclude=member
                )
            if self._peers is not None:
                self._peers.send_presence(room, member.name, joined=False, owner=b"")

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

    def local_owners(self) -> dict[str, bytes]:
        """The owners of this node's members' names, where known: what peers get with
        `local_rooms`."""
        return dict(self._local_owners)

    def _gone(self, room: str, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that no session holds in ``room`` any more, here or on a peer."""
        here = self._here.get(room, ())
        return [
            name
            for name in names
            if name not in here
            and not any(name in rooms.get(room, ()) for rooms in self._remote.values())
        ]

    # -- remote -------------------------------------------------------------------------

    def remote_names(self) -> set[str]:
        """Every name in a room on a peer (peers announce no one else)."""
        return {
            name for rooms in self._remote.values() for names in rooms.values() for name in names
        }

    def remote_holders(self) -> dict[str, frozenset[bytes]]:
        """For each confusable skeleton of a name in a room on a peer, the owners of the
        names that hold it (``b""`` for a name whose peer gave no owner), kept until
        remote presence changes.

        A join storm claims many names while remote presence stands still: each claim
        is then a few dict lookups, not a pass over every remote name.
        """
        if self._holders is None:
            holders: dict[str, set[bytes]] = {}
            for peer, rooms in self._remote.items():
                owners = self._owners.get(peer, {})
                for name in {name for names in rooms.values() for name in names}:
                    for key in name_keys(name):
                        holders.setdefault(key, set()).add(owners.get(name, b""))
            self._holders = {key: frozenset(owners) for key, owners in holders.items()}
        return self._holders

    def remote_change(
        self, peer: str, room: str, name: str, *, joined: bool, owner: bytes = b""
    ) -> None:
        """A peer's session (of ``owner``, if it said) joined or left ``room``; a name
        with several sessions there arrives with the first and leaves with the last."""
        self._holders = None
        rooms = self._remote.setdefault(peer, {})
        names = rooms.setdefault(room, collections.Counter())
        if joined:
            if owner:
                self._owners.setdefault(peer, {})[name] = owner
            names[name] += 1
            if names[name] == 1:
                self._hub.publish_nowait(room, PresenceEvent(room=room, joined=name))
        elif names[name] > 0:
            names[name] -= 1
            if names[name] == 0:
                del names[name]
                if not any(name in others for others in rooms.values()):
                    self._owners.get(peer, {}).pop(name, None)
                if self._gone(room, [name]):
                    self._hub.publish_nowait(room, PresenceEvent(room=room, left=name))

    def remote_snapshot(
        self, peer: str, rooms: dict[str, list[str]], owners: dict[str, bytes] | None = None
    ) -> None:
        """A peer's whole presence (and its names' ``owners``, if it said): tell each room
        the difference from what we had."""
        old = self._remote.get(peer, {})
        new = {room: collections.Counter(names) for room, names in rooms.items()}
        self._remote[peer] = new
        present = {name for names in rooms.values() for name in names}
        self._owners[peer] = {n: o for n, o in (owners or {}).items() if o and n in present}
        self._holders = None
        for room in old.keys() | new.keys():
            before, after = set(old.get(room, ())), set(new.get(room, ()))
            for name in after - before:
                self._hub.publish_nowait(room, PresenceEvent(room=room, joined=name))
            for name in self._gone(room, before - after):
                self._hub.publish_nowait(room, PresenceEvent(room=room, left=name))

    def peer_down(self, peer: str) -> None:
        """A peer is gone: its members leave their rooms (their names stay listed where
        another session holds them)."""
        self.remote_snapshot(peer, {})
        del self._remote[peer], self._owners[peer]

    def remote_typing(self, room: str, name: str) -> None:
        self._hub.publish_nowait(room, TypingEvent(room=room, sender=name))
