"""The chat wire protocol, v1: typed commands in, encoded events out.

Theory of operation: this module is pure (no trio, no clock, no sockets). A client frame
is decoded by `decode_command_untrusted`, which returns one of the command structs or
raises `ProtocolError` with a stable code; nothing a client sends can make it raise
anything else. Server events are msgspec structs encoded by `encode_event`; the hub
joins several encoded events with ``\\n`` into one frame. The contract is documented in
docs/protocol.md: fields may be added, never renamed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Final

import msgspec

from .._errors import ProtocolError
from ._names import MAX_NAME_INPUT, normalize_name_untrusted

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Room names: a letter or digit, then up to 63 letters, digits, ``_`` or ``-``.
ROOM_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: Message ids (see _ids.py): 16 hex digits of hybrid logical time, ``-``, the node id.
ID_PATTERN: Final = r"^[0-9a-f]{16}-[A-Za-z0-9_.-]{1,40}$"
MAX_CID_LENGTH: Final = 64
#: The longest user id the server API takes (a JWT ``sub``, or the app's own id).
MAX_USER: Final = 256
#: A client's retry secret (``?client_id=``): 16-64 URL-safe base64 characters, e.g. 16
#: random bytes as base64url. Only its holder's retries dedupe against its sends.
CLIENT_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{16,64}$"
MAX_HISTORY_LIMIT: Final = 200
#: The message of the ``store_unavailable`` error (a send or a history read failed).
STORE_UNAVAILABLE: Final = (
    "the message store is unavailable: nothing was stored or read; try again later "
    "(a send with the same cid)"
)
BAD_NAME: Final = (
    "names are 1-32 letters, digits, '_', '.', '-' (after NFKC), with no invisible characters"
)

_CLIENT_ID_RE: Final = re.compile(CLIENT_ID_PATTERN)

Room = Annotated[str, msgspec.Meta(pattern=ROOM_PATTERN)]
# The nickname rules need NFKC first: `decode_command_untrusted` applies them.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_INPUT)]
MessageId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Cid = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CID_LENGTH)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY_LIMIT)]
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USER)]


# --- client to server -------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", tag_field="type", frozen=True):
    #: Open mode: the nickname wanted. Ignored in jwt mode (names come from tokens).
    name: Name | None = None
    #: jwt mode: the client's token (docs/auth.md).
    token: str | None = None


class Refresh(msgspec.Struct, tag="refresh", tag_field="type", frozen=True):
    """jwt mode: a later token of the same user, before the current one expires."""

    token: str


class Join(msgspec.Struct, tag="join", tag_field="type", frozen=True):
    room: Room
    since: MessageId | None = None


class Leave(msgspec.Struct, tag="leave", tag_field="type", frozen=True):
    room: Room


class Send(msgspec.Struct, tag="send", tag_field="type", frozen=True):
    room: Room
    text: str
    cid: Cid | None = None


class Typing(msgspec.Struct, tag="typing", tag_field="type", frozen=True):
    room: Room


class HistoryRequest(msgspec.Struct, tag="history", tag_field="type", frozen=True):
    room: Room
    before: MessageId | None = None
    limit: Limit = 50


class Ping(msgspec.Struct, tag="ping", tag_field="type", frozen=True):
    pass


class Delete(msgspec.Struct, tag="delete", tag_field="type", frozen=True):
    """Tombstone a message (admins only)."""

    room: Room
    id: MessageId


Command = Hello | Refresh | Join | Leave | Send | Typing | HistoryRequest | Ping | Delete

_command_decoder: Final[msgspec.json.Decoder[Command]] = msgspec.json.Decoder(Command)

# Which error code a validation failure at a given field gets. Anything else is
# "bad_field": the message always names the field.
_FIELD_CODES: Final = {
    "$.type": "unknown_type",
    "$.room": "bad_room",
    "$.name": "bad_name",
    "$.since": "bad_id",
    "$.before": "bad_id",
    "$.id": "bad_id",
    "$.limit": "bad_limit",
    "$.cid": "bad_cid",
}


def decode_command_untrusted(data: bytes | str) -> Command:
    """Decode one client frame.

    Args:
      data: the frame's payload, exactly as received.

    Returns:
      The command.

    Raises:
      ProtocolError: the frame is not valid JSON, or nests deeper than msgspec
        decodes (``bad_json``), has no or an unknown ``type`` (``unknown_type``), or a
        field is missing or invalid (``bad_room``, ``bad_name``, ``bad_id``,
        ``bad_limit``, ``bad_cid``, ``bad_field``).
    """
    try:
        command = _command_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _refusal(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: msgspec gives up on a frame nested ~1000 deep (2 KB of
        # brackets). The frame is garbage like any other, not a failure of ours.
        raise ProtocolError("bad_json", "the frame is not a JSON object") from None
    if isinstance(command, Hello) and command.name is not None:
        name = normalize_name_untrusted(command.name)
        if name is None:
            raise ProtocolError("bad_name", BAD_NAME)
        return Hello(name=name, token=command.token)
    return command


def history_request_untrusted(room: str, before: str | None, limit: str) -> HistoryRequest:
    """Validate a history page asked for over HTTP, by the socket protocol's own rules.

    Raises:
      ProtocolError: ``bad_room``, ``bad_id`` or ``bad_limit``, as on the socket.
    """
    fields = {"room": room, "before": before, "limit": limit}
    try:
        return msgspec.convert(fields, HistoryRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise _refusal(exc) from None


def check_text(text: str, max_text: int) -> None:
    """Refuse a message's text as the protocol does, wherever it was sent from.

    Raises:
      ProtocolError: ``empty_text`` (blank) or ``text_too_long`` (over ``max_text``).
    """
    if not text.strip():
        raise ProtocolError("empty_text", "the message is empty")
    if len(text) > max_text:
        raise ProtocolError("text_too_long", f"messages are limited to {max_text} characters")


class _Publish(msgspec.Struct, frozen=True):
    """The body of ``POST /api/rooms/<room>/messages`` (the server API)."""

    text: str
    sender: Name | None = msgspec.field(name="from", default=None)
    cid: Cid | None = None
    uid: UserId | None = None


#: The ``from`` of a message the server API publishes without one.
API_SENDER: Final = "server"


def publish_request_untrusted(
    room: str, body: bytes, max_text: int
) -> tuple[Send, str, str | None]:
    """Validate a message published over the server API, by the socket's own rules.

    Returns:
      The message as a `Send`, its sender's name (`API_SENDER` if none was given) and
      its sender's ``uid`` (None if none was given).

    Raises:
      ProtocolError: ``bad_json``, ``bad_room``, ``bad_name``, ``bad_cid``,
        ``bad_field``, ``empty_text`` or ``text_too_long``.
    """
    try:
        fields = msgspec.json.decode(body, type=_Publish)
        send = msgspec.convert({"room": room, "text": fields.text, "cid": fields.cid}, Send)
    except msgspec.ValidationError as exc:
        raise _refusal(exc) from None
    except (msgspec.DecodeError, RecursionError):
        raise ProtocolError("bad_json", "the body is not a JSON object") from None
    check_text(send.text, max_text)
    if fields.sender is None:
        return send, API_SENDER, fields.uid
    name = normalize_name_untrusted(fields.sender)
    if name is None:
        raise ProtocolError("bad_name", BAD_NAME)
    return send, name, fields.uid


def delete_request_untrusted(room: str, message_id: str) -> Delete:
    """Validate a delete asked for over HTTP.

    Raises:
      ProtocolError: ``bad_room`` or ``bad_id``.
    """
    try:
        return msgspec.convert({"room": room, "id": message_id}, Delete)
    except msgspec.ValidationError as exc:
        raise _refusal(exc) from None


def _refusal(exc: msgspec.ValidationError) -> ProtocolError:
    detail = str(exc)
    path = detail.rpartition(" - at `")[2].rstrip("`") if " - at `" in detail else ""
    if "missing required field `type`" in detail:
        return ProtocolError("unknown_type", detail)
    return ProtocolError(_FIELD_CODES.get(path, "bad_field"), detail)


def is_valid_client_id(client_id: str) -> bool:
    """Whether ``client_id`` (from ``?client_id=``) follows `CLIENT_ID_PATTERN`."""
    return _CLIENT_ID_RE.fullmatch(client_id) is not None


# --- server to client -------------------------------------------------------------------


class Welcome(msgspec.Struct, tag="welcome", tag_field="type", frozen=True, omit_defaults=True):
    name: str
    node: str
    #: jwt mode: the token's ``sub``.
    user: str | None = None


class Refreshed(msgspec.Struct, tag="refreshed", tag_field="type", frozen=True):
    #: Unix time the new token expires.
    exp: float


class Joined(msgspec.Struct, tag="joined", tag_field="type", frozen=True):
    room: str
    #: Everyone in the room, or empty in a room too big to list (then see ``count``).
    members: list[str]
    #: Whether the room holds messages older than the oldest one the join replayed.
    more: bool
    #: How many are in the room.
    count: int


class Left(msgspec.Struct, tag="left", tag_field="type", frozen=True):
    room: str


class MessageEvent(
    msgspec.Struct, tag="message", tag_field="type", frozen=True, omit_defaults=True, kw_only=True
):
    room: str
    id: str
    sender: str = msgspec.field(name="from")
    #: Empty, and so left out, for a deleted message: a sent text is never empty.
    text: str = ""
    ts: float
    cid: str | None = None
    #: jwt mode: the sender's ``sub`` (``from`` is its display name).
    uid: str | None = None
    #: The message was deleted (a tombstone): it keeps its place, not its text.
    deleted: bool = False


class Deleted(msgspec.Struct, tag="deleted", tag_field="type", frozen=True):
    """A message of ``room`` was deleted: clients drop its text."""

    room: str
    id: str


class Ack(msgspec.Struct, tag="ack", tag_field="type", frozen=True, omit_defaults=True):
    id: str
    cid: str | None = None
    duplicate: bool = False


class Presence(msgspec.Struct, tag="presence", tag_field="type", frozen=True, omit_defaults=True):
    room: str
    joined: str | None = None
    left: str | None = None


class Members(msgspec.Struct, tag="members", tag_field="type", frozen=True, omit_defaults=True):
    """A big room's head count, in place of its ``presence`` events; with ``names`` when
    the room is small again (``presence`` events follow from then on)."""

    room: str
    count: int
    names: list[str] | None = None


class TypingEvent(msgspec.Struct, tag="typing", tag_field="type", frozen=True):
    room: str
    sender: str = msgspec.field(name="from")


class Reset(msgspec.Struct, tag="reset", tag_field="type", frozen=True):
    room: str


class History(msgspec.Struct, tag="history", tag_field="type", frozen=True):
    room: str
    messages: list[MessageEvent]
    more: bool


class Pong(msgspec.Struct, tag="pong", tag_field="type", frozen=True):
    pass


class ErrorEvent(msgspec.Struct, tag="error", tag_field="type", frozen=True, omit_defaults=True):
    code: str
    message: str
    #: The room and cid of the command refused, when it had them.
    room: str | None = None
    cid: str | None = None


def store_unavailable(room: str | None, cid: str | None) -> ErrorEvent:
    """The error for a command the store failed: nothing was stored or read; retry."""
    return ErrorEvent(code="store_unavailable", message=STORE_UNAVAILABLE, room=room, cid=cid)


Event = (
    Welcome
    | Refreshed
    | Joined
    | Left
    | MessageEvent
    | Deleted
    | Ack
    | Presence
    | Members
    | TypingEvent
    | Reset
    | History
    | Pong
    | ErrorEvent
)

_encoder: Final = msgspec.json.Encoder()
_event_decoder: Final = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """Encode one server event as JSON (UTF-8 bytes, no trailing newline)."""
    return _encoder.encode(event)


def encode_events(events: list[Event]) -> bytes:
    """Encode several events as one frame payload: JSON objects joined by ``\\n``."""
    if len(events) == 1:
        return _encoder.encode(events[0])
    return b"\n".join([_encoder.encode(event) for event in events])


def decode_events(data: bytes | str) -> list[Event]:
    """Split and decode a server frame (for our clients and tests; trusts the server)."""
    if isinstance(data, str):
        data = data.encode()
    return [_event_decoder.decode(line) for line in data.split(b"\n") if line]


def encode_in_frames(events: list[Event], size: int) -> Iterator[bytes]:
    """``events`` as frame payloads of about ``size`` bytes (whole events each)."""
    lines: list[bytes] = []
    total = 0
    for event in events:
        line = _encoder.encode(event)
        lines.append(line)
        total += len(line) + 1
        if total >= size:
            yield b"\n".join(lines)
            lines, total = [], 0
    if lines:
        yield b"\n".join(lines)
