"""Connection caps: how many clients the node serves at once, overall and per address.

One `ConnectionLimits` per node counts the clients of both transports (the chat socket
and ``/ws``): a client holds a slot from the moment it is accepted until its socket is
closed. Past either cap a new client is refused at once with HTTP 503, before any work
is done for it, so existing clients keep chatting and the HTTP side keeps its
descriptors.

The address is the client's: the TCP peer's, or behind a proxy in
``TRIO_CHAT_TRUSTED_PROXIES`` the one its headers name (protocol/_proxies.py). A chat
socket connection from a trusted proxy names its client only in its handshake, so it is
admitted without an address (the global cap only) and `assign`-ed one once the handshake
is read: a reconnect storm through one proxy is not refused as if it were one client.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import resource
import time
from typing import TYPE_CHECKING, Final

from ..protocol._codes import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("trio_chat.limits")

#: Descriptors kept back from the global cap for everything that is not a client: the
#: store (two SQLite connections, each with its WAL and shared-memory files), the
#: cluster link's sockets, the listeners, trio's epoll and wakeup pipe, logs, and
#: hypercorn's page, API and ``/healthz`` requests (whose connections are not capped).
RESERVED_FDS: Final = 256
#: Of what is left, this fraction is kept for the HTTP side as well: hypercorn's
#: connections are not capped, and the page and ``/healthz`` must answer at the cap.
HTTP_SHARE: Final = 0.1
#: When RLIMIT_NOFILE is unlimited (Linux never allows it, but other systems may).
_UNLIMITED_NOFILE: Final = 1 << 20
#: Seconds between two log lines about refused clients.
LOG_INTERVAL: Final = 60.0

#: Why a client was refused: the code counted in ``/metrics`` (``errors_total``).
#: Seconds a refused client is told to wait (``Retry-After``).
RETRY_AFTER: Final = 5


def raise_nofile_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return the result.

    A client costs a descriptor, and the soft limit (often 1024) is only a default: the
    hard limit is what the operator allowed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            # An unlimited hard limit can be above what the kernel allows (nr_open).
            log.info("cannot raise the descriptor limit from %d: %s", soft, exc)
        else:
            soft = hard
    return soft


def default_max_connections(nofile: int | None = None) -> int:
    """The global cap when ``TRIO_CHAT_MAX_CONNECTIONS`` is not set.

    ``(nofile - RESERVED_FDS) * (1 - HTTP_SHARE)``, at least 1, where ``nofile`` is the
    soft ``RLIMIT_NOFILE`` (by default this process's).
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        nofile = _UNLIMITED_NOFILE
    return max(1, int((nofile - RESERVED_FDS) * (1 - HTTP_SHARE)))


@dataclasses.dataclass(frozen=True)
class LimitStatistics:
    connections: int
    addresses: int
    max_connections: int
    max_per_address: int


class ConnectionLimits:
    """Slots for clients, overall and per address, shared by both transports.

    Args:
      max_connections: clients served at once.
      max_per_address: clients served at once from one address.
      clock: seconds, monotonic; injectable for tests.
    """

    def __init__(
        self,
        max_connections: int,
        max_per_address: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._clock = clock
        self._total = 0
        # Only addresses with a client: the map is bounded by the global cap.
        self._per_address: collections.Counter[str] = collections.Counter()
        self._last_logged: float | None = None
        self._unlogged = 0

    def admit(self, address: str | None) -> str | None:
        """Take a slot for a client from ``address``.

        ``address`` None: not known yet (a trusted proxy's connection before its
        handshake); only the global cap applies until `assign`.

        Returns:
          None when admitted (call `release` when its socket is closed), or the code
          saying which cap refused it.
        """
        if self._total >= self.max_connections:
            refused = TOO_MANY_CONNECTIONS
        elif address is not None and self._per_address[address] >= self.max_per_address:
            refused = TOO_MANY_FROM_ADDRESS
        else:
            self._total += 1
            if address is not None:
                self._per_address[address] += 1
            return None
        self._log_refusal(refused, address or "?")
        return refused

    def assign(self, address: str) -> str | None:
        """Count a client admitted without an address as one from ``address``.

        Returns:
          None when counted (release it with ``address``), or `TOO_MANY_FROM_ADDRESS`:
          it still holds its global slot (release it with None).
        """
        if self._per_address[address] >= self.max_per_address:
            self._log_refusal(TOO_MANY_FROM_ADDRESS, address)
            return TOO_MANY_FROM_ADDRESS
        self._per_address[address] += 1
        return None

    def release(self, address: str | None) -> None:
        """Free the slot a client from ``address`` (None: not assigned one) held."""
        self._total -= 1
        if address is None:
            return
        self._per_address[address] -= 1
        if not self._per_address[address]:
            del self._per_address[address]

    def _log_refusal(self, code: str, address: str) -> None:
        # At the cap a client may retry thousands of times a second: one line a minute
        # tells the operator, the rest are counted in /metrics.
        now = self._clock()
        if self._last_logged is not None and now - self._last_logged < LOG_INTERVAL:
            self._unlogged += 1
            return
        log.warning(
            "refusing clients (%s, e.g. %s): %d connected, at most %d, %d per address%s",
            code,
            address,
            self._total,
            self.max_connections,
            self.max_per_address,
            f"; {self._unlogged} more refused since the last line" if self._unlogged else "",
        )
        self._last_logged = now
        self._unlogged = 0

    def statistics(self) -> LimitStatistics:
        return LimitStatistics(
            connections=self._total,
            addresses=len(self._per_address),
            max_connections=self.max_connections,
            max_per_address=self.max_per_address,
        )


def refusal_body(code: str) -> str:
    """The plain-text reason sent with a 503."""
    if code == TOO_MANY_CONNECTIONS:
        return "the server is full: try again later\n"
    return "too many connections from your address: try again later\n"


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; a rate of 0 allows everything.

    Args:
      rate: tokens added per second of ``clock``.
      burst: the most tokens held (and the count at start).
      clock: seconds, monotonic (the session passes trio's, so tests can mock it).
    """

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        if self.rate == 0:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
