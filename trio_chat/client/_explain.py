"""Why a connection ended or failed, in one plain sentence, and whether for good.

The server's HTTP refusals of a handshake and the auth close codes are for good: trying
again would be refused the same way. Everything else is transient and retried.
"""

from __future__ import annotations

import math
from typing import Final
from urllib.parse import urlsplit

from trio_websocket import (
    CloseReason,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
)

from ..protocol._codes import CLOSE_SLOW

CONNECT_TIMEOUT: Final = 10.0
#: Close codes after which connecting again is refused the same way (auth, once it lands).
PERMANENT_CLOSE_CODES: Final = frozenset({4001, 4002, 4003})


def explain_close(closed: CloseReason | None) -> tuple[str, bool]:
    """Say in one sentence why the server closed the connection, and whether for good."""
    if closed is None:
        return "the connection ended", False
    code, reason = closed.code, printable(closed.reason or "")
    permanent = code in PERMANENT_CLOSE_CODES
    sentence = {
        1000: "the server closed the connection",
        1001: "the server is shutting down (1001)",
        1006: "the connection was lost (1006)",
        1008: "the server closed the connection after too many refused frames in a row (1008)",
        1011: "the server hit an internal error serving this client (1011)",
        CLOSE_SLOW: "too slow to keep up (4008)",
    }.get(code)
    if sentence is None and permanent:
        sentence = f"the server refused to let this client in ({code} {reason})".replace(" )", ")")
    elif sentence is None:
        sentence = f"the server closed the connection ({code} {reason})".replace(" )", ")")
    return sentence, permanent


def explain_failure(exc: Exception, url: str) -> tuple[str, bool]:
    """Say in one sentence why connecting failed, and whether it would fail again for good.

    The server's HTTP refusals of a handshake (docs/protocol.md) are for good, except 503
    (over the connection cap, which passes) and other 5xx answers.
    """
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'wss' else 80)}"
    if type(exc) is HandshakeError and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # trio-websocket wraps the socket's error
    if isinstance(exc, ConnectionRejected):
        status = exc.status_code
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        if status == 400 and "host" in body.lower():
            return (
                f"the server does not answer to the host name {parts.hostname!r} (HTTP 400 bad "
                "host): connect with 127.0.0.1 or localhost, or add the name to the server's "
                "TRIO_CHAT_ALLOWED_HOSTS",
                True,
            )
        known = {
            400: "the server refused the handshake as malformed (HTTP 400)",
            403: "the server refused this connection's origin (HTTP 403): it is not in the "
            "server's TRIO_CHAT_ALLOWED_ORIGINS",
            404: f"there is no chat socket at {parts.path} on {where} (HTTP 404): the path is /ws",
            426: "the server speaks another WebSocket version (HTTP 426)",
            503: "the server is full: too many connections (HTTP 503)",
        }
        sentence = known.get(status, f"the server refused the connection (HTTP {status})")
        return sentence, status < 500
    if _connection_refused(exc):
        return f"nothing listens at {where} (connection refused; is the server running?)", False
    if isinstance(exc, ConnectionTimeout):
        return f"no answer from {where} within {CONNECT_TIMEOUT:.0f}s", False
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}", False
    return f"the connection failed ({type(exc).__name__})", False


def _connection_refused(exc: Exception) -> bool:
    """Whether every address tried refused the connection (trio tries each address, then
    raises an OSError caused by a group of each one's error)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(isinstance(e, ConnectionRefusedError) for e in cause.exceptions)
    return isinstance(exc, ConnectionRefusedError)


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def printable(value: object) -> str:
    """Text from the network as one printable line: control characters (escape
    sequences that could drive the terminal, newlines) are shown as escapes, not obeyed."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
