"""Every WebSocket close code and connection-refusal code the server uses, in one place.

Close codes are RFC 6455 §7.4 (1000-1011) and our own (4000-4999, see docs/protocol.md).
1005/1006 are never sent: they are what a side reports when no close frame came.
Refusal codes name the cap that refused a client; they are the ``code`` counted in
``trio_chat_errors_total`` and chosen the 503's text.
"""

from __future__ import annotations

from typing import Final

CLOSE_NORMAL: Final = 1000
#: The server is shutting down (SIGTERM, the supervisor stopping a worker).
CLOSE_GOING_AWAY: Final = 1001
#: A binary frame: the protocol is JSON text.
CLOSE_UNSUPPORTED: Final = 1003
#: No close frame came: the connection was lost (reported, never sent).
CLOSE_ABNORMAL: Final = 1006
#: The client broke a rule after warnings (e.g. kept flooding past its rate limit).
CLOSE_POLICY: Final = 1008
#: A message over the size limit.
CLOSE_TOO_BIG: Final = 1009
#: A bug on our side closed this client (its failure boundary caught it).
CLOSE_INTERNAL_ERROR: Final = 1011
#: jwt mode: no token, a bad one, no hello in time, or a refresh for another user.
CLOSE_UNAUTHORIZED: Final = 4001
#: jwt mode: the token expired without a refresh; reconnect with a new one.
CLOSE_TOKEN_EXPIRED: Final = 4002
#: The client could not keep up with its rooms; it resumes from history on reconnect.
CLOSE_SLOW: Final = 4008
#: The app's backend disconnected this user (``POST /api/users/<user>/disconnect``).
CLOSE_DISCONNECTED: Final = 4003

#: Refusals (HTTP 503 before the handshake, or on /ws): which connection cap was hit.
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
TOO_MANY_FROM_ADDRESS: Final = "too_many_from_address"
