"""The server's log: one handler, the node id on every line, text or JSON.

Theory of operation. `configure_logging` gives the root logger one handler on stderr
with `_Formatter` and `_NodeFilter`; every line, ours and hypercorn's, goes through them.
``trio-chat serve`` calls it before it starts the workers, the app's lifespan under plain
``hypercorn trio_chat:app`` (where nothing else configures logging).

Hypercorn gives its ``hypercorn.error`` logger a handler of its own on stderr, in its own
format, and leaves it propagating to the root: with ours there, each of its lines was
printed twice. It does so when it first needs a logger (``hypercorn.logging
._create_logger``), after our set-up under plain hypercorn, so `install` wraps that
function: each logger it makes is `adopted`, its handlers (still where hypercorn's flags
send them) formatted and filtered as ours, and it stops propagating. Each line is then
printed once, in our format, with the node id.

The node id is known only once the node claims its identity (`set_node`); before that a
worker's lines say ``-``, and the supervisor's ``supervisor``. One process serves one
node, so the label is the process's.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Final

import hypercorn.logging

from .._errors import ConfigError
from ..settings._settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..settings._settings import LogFormat, LogLevel

_TEXT: Final = "%(asctime)s %(levelname)s [%(node)s] %(name)s: %(message)s"
#: What every LogRecord has; anything else on a record came from ``extra=`` and goes
#: into the JSON object as a field of its own.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "node",
}
#: Hypercorn's loggers: adopted when hypercorn makes them, leveled with ours.
_HYPERCORN: Final = ("hypercorn.error", "hypercorn.access")


class _NodeFilter(logging.Filter):
    """Stamps each record with the node id of this process (``%(node)s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.node = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class _Formatter(logging.Formatter):
    """Our text lines, or one JSON object a line (`configure_logging` picks)."""

    def __init__(self) -> None:
        super().__init__(_TEXT)
        self.json = False

    def format(self, record: logging.LogRecord) -> str:
        if not self.json:
            return super().format(record)
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "node": getattr(record, "node", "-"),
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # default=str: an extra field of any type is written, never lost with the line.
        return json.dumps(line, default=str, ensure_ascii=False)


_FILTER: Final = _NodeFilter()
_FORMATTER: Final = _Formatter()
_HANDLER: Final = logging.StreamHandler(sys.stderr)
_HANDLER.addFilter(_FILTER)
_HANDLER.setFormatter(_FORMATTER)


def configure_logging(level: LogLevel = "info", style: LogFormat = "text") -> None:
    """Send every log line of this process to stderr, at ``level`` and up, as ``style``.

    Replaces whatever handlers the root logger had (``logging.basicConfig``'s).
    """
    number = logging.getLevelNamesMapping()[level.upper()]
    _FORMATTER.json = style == "json"
    root = logging.getLogger()
    root.handlers = [_HANDLER]
    root.setLevel(number)
    for name in _HYPERCORN:
        logger = logging.getLogger(name)
        if logger.handlers:
            adopt(logger)  # made before `install`
        logger.setLevel(number)


def configure_from(settings: Settings | None) -> None:
    """`configure_logging` with the log settings of ``settings``, else of the environment.

    Without ``settings`` only ``TRIO_CHAT_LOG_*`` are read: a bad value of another setting
    must not keep the line about it from being logged. A bad log setting gives the
    defaults here, and reading all the settings then stops the node with a line saying so.
    """
    if settings is None:
        names = ("TRIO_CHAT_LOG_LEVEL", "TRIO_CHAT_LOG_FORMAT")
        try:
            settings = Settings.from_env({name: os.environ.get(name, "") for name in names})
        except ConfigError:
            settings = Settings()
    configure_logging(settings.log_level, settings.log_format)


def set_node(label: str) -> None:
    """Put ``label`` (the node id, or ``supervisor``) on this process's lines from now on."""
    _FILTER.node = label


def adopt(logger: logging.Logger) -> None:
    """Give a logger hypercorn made our format and node id, and print its lines once."""
    for handler in logger.handlers:
        handler.setFormatter(_FORMATTER)
        handler.addFilter(_FILTER)
    logger.propagate = False
    if _HANDLER in logging.getLogger().handlers:
        logger.setLevel(logging.getLogger().level)


def install() -> None:
    """Have every logger hypercorn makes from now on `adopt`-ed (see the module docstring).

    Raises:
      ImportError: hypercorn no longer makes its loggers in ``_create_logger``.
    """
    original: Callable[..., logging.Logger | None] | None = getattr(
        hypercorn.logging, "_create_logger", None
    )
    if original is None:
        raise ImportError(
            "hypercorn.logging._create_logger is gone: trio_chat/app/_logs.py needs review"
        )

    def create_logger(name: str, target: Any, *args: Any, **kwargs: Any) -> logging.Logger | None:
        logger = original(name, target, *args, **kwargs)
        # A logger handed to hypercorn (``Config.errorlog``) is the caller's, left as is.
        if logger is not None and not isinstance(target, logging.Logger):
            adopt(logger)
        return logger

    hypercorn.logging._create_logger = create_logger
