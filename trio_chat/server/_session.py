"""One client's chat session: the protocol's commands, whatever the transport.

The chat socket and the ``/ws`` fallback both run a `Session` over a `Transport`. The
session is the hub's subscriber for every room it joined. Joining reads history while
live broadcasts for that room are held back, then sends history, then what was held back
minus what history already had: no gap and no duplicate at the boundary.

Replies the client asked for (history pages, a join's replay) go out through the
transport's `Transport.send_reply`, as fast as the client reads them; the replay is
split into frames of about `_REPLAY_FRAME` bytes. Broadcasts held back meanwhile are
lag: past the backlog bound the client is closed as slow, as the transport would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Final

import trio

from .._errors import ProtocolError, StoreError
from ..protocol._codes import CLOSE_POLICY, CLOSE_SLOW, CLOSE_TOKEN_EXPIRED
from ..protocol._names import normalize_name_untrusted, owner_digest
from ..protocol._wire import (
    BAD_NAME,
    Delete,
    ErrorEvent,
    Event,
    Hello,
    History,
    HistoryRequest,
    Join,
    Joined,
    Leave,
    Left,
    MessageEvent,
    Ping,
    Pong,
    Refresh,
    Refreshed,
    Reset,
    Send,
    Typing,
    TypingEvent,
    Welcome,
    check_text,
    decode_command_untrusted,
    encode_event,
    encode_in_frames,
    is_valid_client_id,
    store_unavailable,
)
from ._auth import LEEWAY, Identity, room_allowed, unauthorized
from ._hub import Outgoing
from ._limits import TokenBucket

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._auth import Tokens
    from ._ports import ChatService, Transport

log = logging.getLogger("trio_chat.session")

# A join's replay goes out in frames of about this size, each encoded once the socket
# has drained: the connection holds one frame of it at a time, not the whole replay.
_REPLAY_FRAME: Final = 32 * 1024
#: Seconds between two INFO lines about one client's refused frames; the others are
#: DEBUG (and all are counted in /metrics), so a client cannot fill the disk via our log.
REFUSAL_LOG_INTERVAL: Final = 60.0
#: jwt mode: seconds a client has to present its token before it is closed with 4001.
HELLO_TIMEOUT: Final = 10.0


class Session:
    """A connected client: its name, its rooms, and the commands it sends.

    Args:
      node: the node the client is connected to, through its narrow `ChatService` port.
      transport: the client's outbound path.
      name: the nickname it asked for (``?name=``), or None for a guest name. Ignored
        in jwt mode: names come from tokens.
      client_id: the client's retry secret (``?client_id=``), or None: then its cids
        dedupe only within this connection. In jwt mode retries dedupe per user.
      token: jwt mode: the token from ``?token=``, or None: the client sends ``hello``.
    """

    def __init__(
        self,
        node: ChatService,
        transport: Transport,
        name: str | None,
        client_id: str | None = None,
        token: str | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self._tokens = node.tokens
        #: jwt mode: the verified token's claims, once the client presented it.
        self.identity: Identity | None = None
        #: jwt mode: the user's ``sub``, stored with each message it sends.
        self.uid: str | None = None
        self._url_token = token
        #: When the token expires, on trio's clock (+inf in open mode).
        self._expires_at = math.inf
        self._bad_client_id = client_id is not None and not is_valid_client_id(client_id)
        #: Open mode: whose name this is, on any node (`Member.owner`).
        self.owner = b""
        if client_id is None or self._bad_client_id:
            client_id = secrets.token_urlsafe(16)
        elif self._tokens is None:
            self.owner = owner_digest(client_id)
        #: Whose retries a cid dedupes against: the client's secret, never a name
        #: (anyone can ask for a name). Without one, this connection alone.
        self._retry_secret = client_id
        normalized = None if name is None else normalize_name_untrusted(name)
        self._bad_name = name is not None and normalized is None and self._tokens is None
        self.name = (
            node.claim_name(normalized or "guest", self.owner) if self._tokens is None else ""
        )
        self._settings = node.settings
        self._bucket = TokenBucket(
            self._settings.rate_limit, self._settings.rate_burst, trio.current_time
        )
        self._strikes = 0
        #: When a refusal of this client was last logged at INFO, and how many since.
        self._refusal_logged_at: float | None = None
        self._refusals_unlogged = 0
        #: Rooms being joined: live broadcasts wait here until history is sent.
        self._held: dict[str, list[Outgoing]] = {}
        self._held_bytes = 0
        #: Ids just replayed per room, until live traffic has passed them (see
        #: `_without_replayed`).
        self._replayed: dict[str, set[str]] = {}
        #: Frames of the read that carried the ``hello``, after it: `_serve` handles them.
        self._unread: list[str] = []
        self.closed = False

    @property
    def user(self) -> str:
        """Who the client is (server API disconnects): its token's ``sub``, or in open
        mode its name."""
        return self.name if self.uid is None else self.uid

    @property
    def is_admin(self) -> bool:
        """Whether the client may delete messages: its token's ``admin`` claim (nobody
        in open mode)."""
        return self.identity is not None and self.identity.admin

    # -- hub subscriber -----------------------------------------------------------------

    def deliver_nowait(self, out: Outgoing) -> None:
        held = self._held.get(out.room)
        if held is not None:
            held.append(out)
            self._held_bytes += len(out.payload)
            if self._held_bytes > self._settings.backlog and not self.closed:
                log.info(
                    "closing %s: held broadcasts over %d bytes during a join (slow client)",
                    self.transport.remote,
                    self._settings.backlog,
                )
                self.node.count_slow()
                self.close(CLOSE_SLOW, "slow")
            return
        if out.room in self._replayed:
            fresh = self._without_replayed(out)
            if fresh is None:
                return
            out = fresh
        self.transport.deliver_nowait(out)

    def _without_replayed(self, out: Outgoing) -> Outgoing | None:
        """``out`` minus the messages this client just got from history.

        A message committed before the join's history read can still be on its way
        through the hub after the hold ended. Messages reach the hub in commit order, so
        once a live message history did not have arrives, no replayed one can follow.
        """
        replayed = self._replayed[out.room]
        events: list[Event] = []
        for event in out.events:
            if isinstance(event, MessageEvent) and out.room in self._replayed:
                if event.id in replayed:
                    continue
                del self._replayed[out.room]
            events.append(event)
        if len(events) == len(out.events):
            return out
        return Outgoing(out.room, events) if events else None

    def retry_key(self, cid: str) -> str:
        """The store's dedupe key for this client's ``cid``.

        A digest, so the client's secret is neither stored nor sent to peers.
        """
        secret = self._retry_secret if self.uid is None else "sub:" + self.uid
        key = f"{secret}\0{cid}".encode()
        return hashlib.blake2b(key, digest_size=16).hexdigest()

    # -- sending ------------------------------------------------------------------------

    def send(self, event: Event) -> None:
        self.transport.send_payload_nowait(encode_event(event))

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close_nowait(code, reason)

    # -- the session --------------------------------------------------------------------

    async def run(self, receive: Callable[[], Awaitable[list[str]]]) -> None:
        """Greet the client and serve its commands until the connection ends.

        ``receive`` returns the next read's text messages (at least one; the chat socket
        returns every message of one socket read) and raises when the connection ends
        (that exception propagates) or a frame breaks the transport's rules
        (`ProtocolError` with a close code: answered and closed here).

        In jwt mode the client must present a token first (`_authenticate`); the
        session then ends with close 4002 when the token expires without a refresh.

        Cancellation: leaves every room in ``finally``, without awaiting.
        """
        try:
            if self._tokens is None or await self._authenticate(self._tokens, receive):
                await self._serve(receive)
            else:
                await trio.lowlevel.checkpoint()  # refused: a checkpoint on every path
        finally:
            self.node.release(self)

    async def _authenticate(
        self, tokens: Tokens, receive: Callable[[], Awaitable[list[str]]]
    ) -> bool:
        """Verify the ``?token=`` token or the first ``hello``'s. False: refused, closed."""
        await trio.lowlevel.checkpoint()  # a token from the URL awaits nothing else
        token = self._url_token
        try:
            if token is None:
                token = await self._read_hello(receive)
            if self.closed:
                return False
            if token is None:
                raise unauthorized(f"no hello with a token within {HELLO_TIMEOUT:g} s")
            identity = tokens.check_untrusted(token)
        except ProtocolError as exc:
            self._refuse(exc, None)
            return False
        self._take_identity(identity)
        self.name = identity.name
        return True

    async def _read_hello(self, receive: Callable[[], Awaitable[list[str]]]) -> str | None:
        """The first ``hello``'s token, answering only ``ping`` before it.

        None: no hello within `HELLO_TIMEOUT`, or the client was refused and closed.
        """
        with trio.move_on_after(HELLO_TIMEOUT):
            while True:
                frames = await receive()
                for i, frame in enumerate(frames):
                    command = None
                    try:
                        self._take_token()
                        command = decode_command_untrusted(frame)
                        match command:
                            case Ping():
                                self.send(Pong())
                            case Hello():
                                self._unread = frames[i + 1 :]
                                return command.token or ""
                            case _:
                                raise unauthorized("send hello with a token first")
                    except ProtocolError as exc:
                        self._refuse(exc, command)
                        if self.closed:
                            return None
        return None

    def _take_identity(self, identity: Identity) -> None:
        self.identity, self.uid = identity, identity.sub
        # The token's expiry, wall clock, on trio's clock (which tests mock).
        self._expires_at = trio.current_time() + identity.exp + LEEWAY - time.time()

    async def _serve(self, receive: Callable[[], Awaitable[list[str]]]) -> None:
        self.send(Welcome(name=self.name, node=self.node.node_id, user=self.uid))
        if self._bad_name:
            self._refuse(ProtocolError("bad_name", f"{BAD_NAME}; you are {self.name}"), None)
        if self._bad_client_id:
            reason = "client_id is 16-64 of A-Z a-z 0-9 _ -; retries dedupe per connection"
            self._refuse(ProtocolError("bad_client_id", reason), None)
        await trio.lowlevel.checkpoint()  # a session closed at once reads nothing
        while not self.closed:
            frames, self._unread = self._unread, []
            if not frames:
                try:
                    with trio.CancelScope(deadline=self._expires_at) as expiry:
                        frames = await receive()
                except ProtocolError as exc:
                    self._refuse(exc, None)
                    continue
                if expiry.cancelled_caught:
                    self._expire()
                    return
            await self._handle_frames(frames)

    async def _handle_frames(self, frames: list[str]) -> None:
        """Handle one read's frames in order; their sends reach the node as one batch."""
        sends: list[Send] = []
        for frame in frames:
            if self.closed:
                break
            command = None
            try:
                # Before decoding: a frame that fails to decode costs a token too, so
                # garbage is rate-limited (and struck out) like valid commands.
                self._take_token()
                command = decode_command_untrusted(frame)
                if isinstance(command, Send):
                    self._require_allowed(command.room)
                    self._require_joined(command.room)
                    check_text(command.text, self._settings.max_text)
                    if not self.node.submit_would_wait():
                        sends.append(command)
                        continue
                # The sends before this frame go first: answers keep the frames' order.
                await self._submit(sends)
                await self._handle(command)
            except ProtocolError as exc:
                await self._submit(sends)
                self._refuse(exc, command)
            except StoreError:  # not the client's fault; the node logged it (rate-limited)
                self.node.count_error("store_unavailable")
                room, cid = getattr(command, "room", None), getattr(command, "cid", None)
                self.send(store_unavailable(room, cid))
        await self._submit(sends)

    # Nothing to submit awaits nothing: `_serve` checkpoints for each read.
    async def _submit(self, sends: list[Send]) -> None:  # noqa: ASYNC910
        """Hand ``sends`` (emptied) to the node; if the store is down, refuse each."""
        if not sends:
            return  # noqa: ASYNC910
        batch = sends.copy()
        sends.clear()
        try:
            await self.node.submit(self, batch)
        except StoreError:
            for command in batch:
                self.node.count_error("store_unavailable")
                self.send(store_unavailable(command.room, command.cid))

    def _expire(self) -> None:
        log.debug("%s (%s): token expired", self.transport.remote, self.name)
        self.node.count_error("token_expired")
        self.send(ErrorEvent(code="token_expired", message="the token expired: reconnect"))
        self.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def _refuse(self, exc: ProtocolError, command: object) -> None:
        self.node.count_error(exc.code)
        now = trio.current_time()
        last = self._refusal_logged_at
        if last is None or now - last >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged_at = now
            unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
            log.info(
                "%s (%s): %s: %s%s",
                self.transport.remote,
                self.name,
                exc.code,
                exc.message,
                f" ({unlogged} more refused at DEBUG since the last line)" if unlogged else "",
            )
        else:
            self._refusals_unlogged += 1
            log.debug("%s (%s): %s: %s", self.transport.remote, self.name, exc.code, exc.message)
        self.send(
            ErrorEvent(
                code=exc.code,
                message=exc.message,
                room=getattr(command, "room", None),
                cid=getattr(command, "cid", None),
            )
        )
        if exc.close_code is not None:
            self.close(exc.close_code, exc.code)

    def _take_token(self) -> None:
        if not self._bucket.take():
            self._strikes += 1
            if self._strikes >= self._settings.rate_strikes:
                raise ProtocolError(
                    "rate_limited", "too many frames: closing", close_code=CLOSE_POLICY
                )
            raise ProtocolError(
                "rate_limited",
                f"at most {self._settings.rate_limit:g} frames a second; this one was dropped",
            )
        self._strikes = 0

    # Per frame: `run` checkpoints for each one it reads, most commands await nothing.
    async def _handle(self, command: object) -> None:  # noqa: ASYNC910
        match command:
            case Send():  # checked, and the store is behind: the client may close meanwhile
                async with self.transport.cancel_on_close():
                    await self.node.submit(self, [command])
            case Typing(room=room):
                self._require_allowed(room)
                self._require_joined(room)
                self.node.typing(room, TypingEvent(room=room, sender=self.name), self)
            case Join():
                await self._join(command)
            case Leave(room=room):
                self._require_joined(room)
                self.node.leave(room, self)
                self.send(Left(room=room))
            case HistoryRequest():
                await self._history(command)
            case Ping():
                self.send(Pong())
            case Delete(room=room, id=message_id):
                self._require_allowed(room)
                if not self.is_admin:
                    raise ProtocolError("forbidden", "only an admin may delete messages")
                await self.node.delete(room, message_id)
            case Refresh(token=token):
                self._refresh(token)
            case Hello() if self._tokens is not None:
                raise ProtocolError("bad_hello", "already authenticated: send refresh")
            case Hello(name=None):
                raise ProtocolError("bad_name", "hello needs a name")
            case Hello(name=str() as name):
                if self.node.rooms_of(self):
                    raise ProtocolError("hello_too_late", "say hello before joining rooms")
                self.node.rename(self, name)
                self.send(Welcome(name=self.name, node=self.node.node_id))

    def _refresh(self, token: str) -> None:
        if self._tokens is None:
            raise ProtocolError("bad_refresh", "tokens are not used on this server")
        identity = self._tokens.check_untrusted(token)
        if identity.sub != self.uid:
            raise unauthorized("the new token is for another user")
        self._take_identity(identity)
        self.send(Refreshed(exp=identity.exp))

    def _require_allowed(self, room: str) -> None:
        """The room rule (`room_allowed`) for every command that reaches a room."""
        if not room_allowed(self.identity, room, self._settings.public_room_patterns):
            raise ProtocolError("forbidden", f"you may not see {room!r}")

    def _require_joined(self, room: str) -> None:
        if room not in self.node.rooms_of(self):
            raise ProtocolError("not_joined", f"join {room!r} first")

    async def _join(self, command: Join) -> None:
        room = command.room
        self._require_allowed(room)
        rooms = self.node.rooms_of(self)
        if room in rooms:
            raise ProtocolError("already_joined", f"already in {room!r}")
        if len(rooms) >= self._settings.max_rooms:
            raise ProtocolError("too_many_rooms", f"at most {self._settings.max_rooms} rooms")
        held: list[Outgoing] = []
        self._held[room] = held
        self._held_bytes = 0
        self._replayed.pop(room, None)
        try:
            async with self.transport.cancel_on_close():
                # Cancelled, or the store failed: not joined, and nobody was told.
                replay = await self.node.join(room, self, command.since)
                if replay.reset:
                    self.send(Reset(room=room))
                # Live broadcasts stay held until the whole replay is queued.
                for payload in encode_in_frames(
                    [m.event() for m in replay.messages], _REPLAY_FRAME
                ):
                    await self.transport.send_reply(payload)
        finally:
            del self._held[room]
        if replay.messages:
            self._replayed[room] = {m.id for m in replay.messages}
        members, count = self.node.snapshot(room)
        self.send(Joined(room=room, members=members, more=replay.more, count=count))
        for out in held:
            self.deliver_nowait(out)

    async def _history(self, command: HistoryRequest) -> None:
        self._require_allowed(command.room)
        async with self.transport.cancel_on_close():
            messages, more = await self.node.page(command.room, command.before, command.limit)
            page = History(room=command.room, messages=[m.event() for m in messages], more=more)
            await self.transport.send_reply(encode_event(page))
