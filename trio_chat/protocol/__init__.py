"""The chat's pure rules: wire codec, ids, names, hosts, frames and codes (no I/O, no clock)."""

from __future__ import annotations

from ._codes import CLOSE_ABNORMAL as CLOSE_ABNORMAL
from ._codes import CLOSE_GOING_AWAY as CLOSE_GOING_AWAY
from ._codes import CLOSE_INTERNAL_ERROR as CLOSE_INTERNAL_ERROR
from ._codes import CLOSE_NORMAL as CLOSE_NORMAL
from ._codes import CLOSE_POLICY as CLOSE_POLICY
from ._codes import CLOSE_SLOW as CLOSE_SLOW
from ._codes import CLOSE_TOO_BIG as CLOSE_TOO_BIG
from ._codes import CLOSE_UNSUPPORTED as CLOSE_UNSUPPORTED
from ._codes import TOO_MANY_CONNECTIONS as TOO_MANY_CONNECTIONS
from ._codes import TOO_MANY_FROM_ADDRESS as TOO_MANY_FROM_ADDRESS
from ._frames import encode_text_frame as encode_text_frame
from ._frames import http_response as http_response
from ._hosts import bound_to_loopback as bound_to_loopback
from ._hosts import host_allowed as host_allowed
from ._hosts import parse_allowed_hosts as parse_allowed_hosts
from ._ids import IdClock as IdClock
from ._ids import id_millis as id_millis
from ._names import name_keys as name_keys
from ._names import normalize_name_untrusted as normalize_name_untrusted
from ._wire import Command as Command
from ._wire import Event as Event
from ._wire import decode_command_untrusted as decode_command_untrusted
from ._wire import decode_events as decode_events
from ._wire import encode_event as encode_event
from ._wire import encode_events as encode_events

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_SLOW",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_ADDRESS",
    "Command",
    "Event",
    "IdClock",
    "bound_to_loopback",
    "decode_command_untrusted",
    "decode_events",
    "encode_event",
    "encode_events",
    "encode_text_frame",
    "host_allowed",
    "http_response",
    "id_millis",
    "name_keys",
    "normalize_name_untrusted",
    "parse_allowed_hosts",
]
