"""Nicknames: one per session, unique by confusable skeleton, here and on peers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol._names import name_keys, prototypes

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..server._ports import Member
    from ._presence import Presence


class Names:
    """Claims, renames and frees names.

    Args:
      presence: who is in a room on a peer (their names are taken too).
    """

    def __init__(self, presence: Presence) -> None:
        self._presence = presence
        #: The `name_keys` of the names of this node's sessions.
        self._local: set[str] = set()
        # Unicode's confusables take ~75 ms to load: now, not in the first client's turn.
        prototypes()

    def claim(self, wanted: str, owner: bytes = b"") -> str:
        """Reserve ``wanted``, or ``wanted-2``, ``wanted-3``… if it is taken.

        Taken: a name in use has the same confusable skeleton, case aside (``alice`` spelt with a
        Cyrillic ``a``, U+0430, is ``alice``), on this node or in a room on a peer
        (`Presence.remote_holders`). Two nodes granting one name at the same instant both
        keep it (docs/protocol.md).

        Not taken from the client itself: a name held only on peers, and there only by
        sessions of ``owner``, is granted. A client whose host died comes back through
        another host before the dead one is declared dead (seconds later), and its old
        session must not push its name to ``alice-2``. Only that client can match: the
        owner is a digest of its secret (`Session.owner`).

        Args:
          wanted: a valid, normalized name (`normalize_name_untrusted`).
          owner: the claimant's `Member.owner`; ``b""`` matches no one.
        """
        remote = self._presence.remote_holders()
        name, n = wanted, 1
        while self._taken(name_keys(name), owner, remote):
            n += 1
            name = f"{wanted[:28]}-{n}"
        self._local.update(name_keys(name))
        return name

    def _taken(
        self, keys: frozenset[str], owner: bytes, remote: Mapping[str, frozenset[bytes]]
    ) -> bool:
        if not keys.isdisjoint(self._local):
            return True
        return any(key in remote and not (owner and remote[key] == {owner}) for key in keys)

    def rename(self, member: Member, wanted: str) -> None:
        self.release(member)
        member.name = self.claim(wanted, member.owner)

    def release(self, member: Member) -> None:
        self._local.difference_update(name_keys(member.name))
