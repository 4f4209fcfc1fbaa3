"""Who is in which room, here and on peers: the one path of presence to the hub and the cluster.

Local changes (a session joins or leaves a room, types) and remote ones (a peer's join or
leave, its periodic snapshot, its death) all go through `Presence`: it keeps the hub's
subscriptions, each peer's members per room, and tells local clients (through the hub) and
peers (through `PresenceOut`) what changed.

Presence is state, not history: an event that does not fit in the hub's queue is dropped,
and the members list of the next ``joined`` is still right.

Big rooms. Telling every member of every arrival makes N joins cost O(N^2) frames and
bytes, and a join storm (a restart, then every client back into one big room) spends
seconds on it. So a room of more than ``names_max`` members (cluster-wide, by name) stops
its ``presence`` events: its members get a ``members`` frame with the head count instead,
at most once per `COUNT_INTERVAL` while the count moves (`run_counts`), and ``joined``
lists nobody there. When it shrinks to half of ``names_max`` it gets the whole list once
more, in a ``members`` frame with ``names``, and its ``presence`` events resume; the gap
between the two thresholds keeps a room at the edge from sending its list on every join
and leave. A count is kept per room and name, so none of this walks a room's members.

A room lists names, and one name can be held by several sessions: a user's tabs (jwt
mode), or one client that moved to another node while its old session there is still
counted (open mode, `Names.claim`). So ``left`` is told only when no session holds the
name in the room any more, here or on a peer; a ``joined`` may repeat a listed name.

Each peer also says who owns its members' names (`Member.owner`, a digest of the
client's secret), so that `Names` can give a moving client its own name back.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import trio

from ..protocol._names import name_keys
from ..protocol._wire import Members, TypingEvent
from ..protocol._wire import Presence as PresenceEvent

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..protocol._wire import Event
    from ..server._hub import Hub
    from ..server._ports import Member


#: Seconds between two head counts of one big room: one frame per member per interval,
#: however many join meanwhile.
COUNT_INTERVAL: Final = 1.0


class PresenceOut(Protocol):
    """Where local presence goes to peers (`_cluster.Broadcaster`)."""

    def send_presence(self, room: str, name: str, *, joined: bool, owner: bytes) -> None: ...

    def send_typing(self, room: str, name: str) -> None: ...


class Presence:
    """Rooms' members, local and remote.

    Args:
      hub: the local subscriptions and fan-out.
      peers: where local changes go, or None without a cluster.
      names_max: the most members a room lists by name; bigger rooms get head counts.
    """

    def __init__(self, hub: Hub, peers: PresenceOut | None, names_max: int) -> None:
        self._hub = hub
        self._peers = peers
        self._names_max = names_max
        #: Each room's members by name, here and on peers: name -> local connections
        #: plus peers that have it there.
        self._names: dict[str, collections.Counter[str]] = {}
        #: Rooms over ``names_max``: head counts instead of presence events.
        self._big: set[str] = set()
        #: Big rooms whose count changed since their last ``members`` frame.
        self._count_due: set[str] = set()
        #: Members of each room on each peer: peer -> room -> name -> connections.
        self._remote: dict[str, dict[str, collections.Counter[str]]] = {}
        #: The owner of each name of each peer, where it said (open mode): peer -> name -> owner.
        self._owners: dict[str, dict[str, bytes]] = {}
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
        self._arrived(room, member.name)
        if member.owner:
            self._local_owners[member.name] = member.owner
        self._tell(room, PresenceEvent(room=room, joined=member.name), member)
        if self._peers is not None:
            self._peers.send_presence(room, member.name, joined=True, owner=member.owner)

    def leave(self, room: str, member: Member) -> None:
        """Unsubscribe ``member`` from ``room``; if it was in, tell the room everywhere."""
        if self._hub.unsubscribe(room, member):
            self._departed(room, member.name)
            if not self._hub.rooms_of(member):
                self._local_owners.pop(member.name, None)
            if self._gone(room, [member.name]):
                self._tell(room, PresenceEvent(room=room, left=member.name), member)
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

    def snapshot(self, room: str) -> tuple[list[str], int]:
        """What a ``joined`` says: everyone in ``room`` (none in a big room), and how many."""
        if room in self._big:
            return [], len(self._names.get(room, ()))
        names = self.members(room)
        return names, len(names)

    def local_rooms(self) -> dict[str, list[str]]:
        """This node's members of each room: the snapshot peers get."""
        return {room: self._hub.members(room) for room in self._hub.room_names()}

    def local_owners(self) -> dict[str, bytes]:
        """The owners of this node's members' names, where known: what peers get with
        `local_rooms`."""
        return dict(self._local_owners)

    def _gone(self, room: str, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that no session holds in ``room`` any more, here or on a peer."""
        held = self._names.get(room, ())
        return [name for name in names if name not in held]

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
                self._arrived(room, name)
                self._tell(room, PresenceEvent(room=room, joined=name))
        elif names[name] > 0:
            names[name] -= 1
            if names[name] == 0:
                del names[name]
                if not any(name in others for others in rooms.values()):
                    self._owners.get(peer, {}).pop(name, None)
                self._departed(room, name)
                if self._gone(room, [name]):
                    self._tell(room, PresenceEvent(room=room, left=name))

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
                self._arrived(room, name)
                self._tell(room, PresenceEvent(room=room, joined=name))
            for name in before - after:
                self._departed(room, name)
            for name in self._gone(room, before - after):
                self._tell(room, PresenceEvent(room=room, left=name))

    def peer_down(self, peer: str) -> None:
        """A peer is gone: its members leave their rooms (their names stay listed where
        another session holds them)."""
        self.remote_snapshot(peer, {})
        del self._remote[peer], self._owners[peer]

    def remote_typing(self, room: str, name: str) -> None:
        self._hub.publish_nowait(room, TypingEvent(room=room, sender=name))

    # -- big rooms ----------------------------------------------------------------------

    async def run_counts(self) -> NoReturn:
        """Send each big room whose count moved its head count, every `COUNT_INTERVAL`."""
        while True:
            await trio.sleep(COUNT_INTERVAL)
            for room in list(self._count_due):
                if room not in self._big or self._hub.publish_nowait(
                    room, Members(room=room, count=len(self._names.get(room, ())))
                ):
                    self._count_due.discard(room)

    def _arrived(self, room: str, name: str) -> None:
        names = self._names.setdefault(room, collections.Counter())
        names[name] += 1
        if room not in self._big and len(names) > self._names_max:
            # Members who had the list learn that it is no longer kept.
            self._big.add(room)
            self._count_due.add(room)

    def _departed(self, room: str, name: str) -> None:
        names = self._names.get(room)
        if names is None or names[name] <= 0:
            return
        names[name] -= 1
        if names[name] == 0:
            del names[name]
        if not names:
            del self._names[room]
            self._big.discard(room)
            self._count_due.discard(room)
        elif room in self._big and len(names) <= self._names_max // 2:
            listed = Members(room=room, count=len(names), names=self.members(room))
            # Dropped (the hub's queue is full): the room stays big and tries again later.
            if self._hub.publish_nowait(room, listed):
                self._big.discard(room)
                self._count_due.discard(room)

    def _tell(self, room: str, event: Event, member: Member | None = None) -> None:
        """Publish a presence event to ``room`` (but ``member``), or in a big room count it."""
        if room in self._big:
            self._count_due.add(room)
        else:
            self._hub.publish_nowait(room, event, exclude=member)
