"""Failure boundaries: where an exception from serving one client stops.

A client is never a node task (DESIGN.md §4). Everything that serves one client (a
chat-socket connection, a ``/ws`` session, an HTTP request, a history read) runs behind
one ``except Exception`` that closes that client only and hands the exception to
`FailureBoundary.record`: it is counted (``/metrics``) and logged with its traceback, at
most once a minute per place and type, so a client that can trigger a bug over and over
cannot fill the disk through our log or slow the node down with formatting.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("trio_chat.boundary")

#: Seconds between two logged tracebacks of the same kind of failure.
LOG_INTERVAL: Final = 60.0


@dataclasses.dataclass(frozen=True)
class FailureStatistics:
    #: Exceptions contained, by (where, exception type name).
    contained: dict[tuple[str, str], int]


class FailureBoundary:
    """Counts and logs (rate-limited) the exceptions that stopped at a client's boundary.

    Args:
      clock: seconds, monotonic; injectable for tests.
      log_interval: seconds between two tracebacks of the same ``(where, type)``.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, log_interval: float = LOG_INTERVAL
    ) -> None:
        self._clock = clock
        self._log_interval = log_interval
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._last_logged: dict[tuple[str, str], float] = {}
        self._unlogged: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, where: str, exc: BaseException, remote: str = "?") -> None:
        """Count ``exc`` (which closed one client at ``where``) and maybe log it.

        Never raises and never blocks: it runs in ``except`` blocks of client tasks.
        """
        key = (where, type(exc).__name__)
        self._counts[key] += 1
        now = self._clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < self._log_interval:
            self._unlogged[key] += 1
            return
        self._last_logged[key] = now
        skipped = self._unlogged.pop(key, 0)
        log.error(
            "%s: closed client %s after an unexpected %s%s",
            where,
            remote,
            key[1],
            f" ({skipped} more like it not logged)" if skipped else "",
            exc_info=exc,
        )

    def statistics(self) -> FailureStatistics:
        return FailureStatistics(contained=dict(self._counts))
