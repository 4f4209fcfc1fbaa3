"""What a session needs from the node, as narrow Protocols.

The server layer sits below the node (docs/architecture.md): a `Session` and the chat
socket's handler talk to a `ChatService`, which the node implements, and never see the
node's parts (hub, store, cluster). The node sees a session as a `Member`. A session
reaches its client through a `Transport` (the chat socket's or the ``/ws`` fallback's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractAsyncContextManager

    from ..protocol._wire import MessageEvent, Send, TypingEvent
    from ..settings._settings import Settings
    from ._auth import Tokens
    from ._hub import Outgoing


class Member(Protocol):
    """A session as the node sees it: a hub subscriber with a name and a retry secret."""

    name: str
    #: jwt mode: the user's ``sub`` (None in open mode).
    uid: str | None

    @property
    def user(self) -> str:
        """Who the client is, for ``POST /api/users/<user>/disconnect``: its token's
        ``sub`` in jwt mode, its name in open mode."""

    def deliver_nowait(self, out: Outgoing) -> None:
        """Queue a broadcast for the client. Must not block or raise."""

    @property
    def owner(self) -> bytes:
        """Open mode: a digest of the client's secret (``?client_id=``) that tells its
        sessions from anyone else's, on every node; ``b""`` without one (and in jwt mode,
        where names come from tokens)."""

    def retry_key(self, cid: str) -> str:
        """The store's dedupe key for this client's ``cid``."""

    def close(self, code: int, reason: str) -> None:
        """Close the client with ``code``. Never blocks."""


class StoredMessage(Protocol):
    """A message from history."""

    @property
    def id(self) -> str: ...

    def event(self) -> MessageEvent:
        """The message as the clients see it."""


class Replay(Protocol):
    """What a client joining a room gets first."""

    #: Oldest first.
    @property
    def messages(self) -> Sequence[StoredMessage]: ...

    #: The client's ``since`` is unknown or too old: it must clear the room first.
    @property
    def reset(self) -> bool: ...

    #: The room holds messages older than the oldest of ``messages``.
    @property
    def more(self) -> bool: ...


class ChatService(Protocol):
    """The node, as its sessions see it. Every method but the async ones is non-blocking."""

    @property
    def node_id(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    #: jwt mode: the token checker; None in open mode.
    @property
    def tokens(self) -> Tokens | None: ...

    # -- names --------------------------------------------------------------------------

    def claim_name(self, wanted: str, owner: bytes) -> str:
        """Reserve ``wanted`` or, if it is taken, a numbered variant; return it.

        A name held only by sessions of ``owner`` on peers is not taken (`Member.owner`).
        """

    def rename(self, member: Member, wanted: str) -> None:
        """Free ``member``'s name and claim ``wanted`` (sets ``member.name``)."""

    # -- the session's life -------------------------------------------------------------

    def register(self, member: Member) -> None:
        """A session started (it is closed at shutdown)."""

    def release(self, member: Member) -> None:
        """A session ended: leave its rooms, free its name."""

    # -- rooms --------------------------------------------------------------------------

    async def join(self, room: str, member: Member, since: str | None) -> Replay:
        """Subscribe ``member`` to ``room``, read its replay, then announce it.

        Raises:
          StoreError: the replay could not be read; ``member`` is not in the room.
        """

    def leave(self, room: str, member: Member) -> None:
        """Unsubscribe ``member`` from ``room`` and announce it, if it was in."""

    def rooms_of(self, member: Member) -> frozenset[str]:
        """The rooms ``member`` is in."""

    def snapshot(self, room: str) -> tuple[list[str], int]:
        """Who is in ``room``, cluster-wide, for its ``joined``: the names (none in a room
        too big to list) and how many."""

    def typing(self, room: str, event: TypingEvent, member: Member) -> None:
        """Tell the room (cluster-wide) that ``member`` is typing."""

    # -- messages -----------------------------------------------------------------------

    async def submit(self, member: Member, commands: list[Send]) -> None:
        """Accept messages for commit, in order; each one's ack follows its commit.

        Raises:
          StoreError: the store is down.
        """

    def submit_would_wait(self) -> bool:
        """Whether `submit` would wait now (the store is behind)."""

    async def page(
        self, room: str, before: str | None, limit: int
    ) -> tuple[Sequence[StoredMessage], bool]:
        """A page of history older than ``before``, and whether more exist.

        Raises:
          ProtocolError: ``before`` is not a message of ``room``.
          StoreError: the store failed.
        """

    async def delete(self, room: str, message_id: str) -> bool:
        """Tombstone a message, cluster-wide; False if it already was.

        Raises:
          ProtocolError: ``room`` has no message ``message_id`` (``unknown_id``).
          StoreError: the store failed.
        """

    # -- accounting ---------------------------------------------------------------------

    def count_error(self, code: str) -> None:
        """Count a refusal or error by its code (``/metrics``)."""

    def count_slow(self) -> None:
        """Count a client closed as slow outside the chat socket's write path."""


class Transport(Protocol):
    """How a session reaches its client. Every method but `send_reply` is non-blocking."""

    remote: str

    def send_payload_nowait(self, payload: bytes) -> None:
        """Queue one encoded frame payload for this client only."""

    async def send_reply(self, payload: bytes) -> None:
        """Queue a payload the client asked for once its backlog has drained enough.

        A reply never counts as lag (it never closes the client as slow). Dropped if
        the connection's output has ended.
        """

    def cancel_on_close(self) -> AbstractAsyncContextManager[None]:
        """Around a command that may wait: the client's close is answered at once and
        cancels it (raising the transport's connection-closed error)."""

    def deliver_nowait(self, out: Outgoing) -> None:
        """Queue a broadcast (the transport picks its pre-built frame or text)."""

    def close_nowait(self, code: int, reason: str) -> None:
        """Queue a close frame; nothing is sent after it."""
