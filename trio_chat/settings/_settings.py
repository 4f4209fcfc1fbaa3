"""Settings: read once at start from ``TRIO_CHAT_*`` environment variables, validated.

Every bad value raises `ConfigError` naming the variable, the value and the rule, so the
server refuses to start with a clear line rather than misbehaving later.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from .._errors import ConfigError
from ..protocol._hosts import parse_allowed_hosts

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SECONDS: Final = 1.0
KIB: Final = 1024
MIB: Final = 1024 * KIB

ClusterMode = Literal["off", "host", "lan"]
StoreKind = Literal["sqlite", "memory"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything an operator can set. Defaults are what ``make run`` uses."""

    #: Where the SQLite history, the node identity and the host cluster key live.
    data_dir: Path = Path("data")
    #: ``sqlite`` (durable, the default) or ``memory`` (lost on exit; for benchmarks).
    store: StoreKind = "sqlite"
    #: Per-connection token bucket: messages per second (0 turns limiting off) and burst.
    rate_limit: float = 10.0
    rate_burst: int = 20
    #: Rate-limited frames a connection may send before it is closed with 1008.
    rate_strikes: int = 20
    max_text: int = 4000
    #: Largest incoming WebSocket message; more closes with 1009.
    max_frame: int = 16 * KIB
    max_rooms: int = 50
    history_on_join: int = 50
    #: Most messages a ``join`` with ``since`` replays; beyond it the client gets ``reset``.
    resume_max: int = 1000
    #: The chat socket's address, or None when it is turned off (``off``).
    ws_bind: tuple[str, int] | None = ("127.0.0.1", 8001)
    #: The chat socket URL the page is told to use; derived from ws_bind when unset.
    ws_public_url: str | None = None
    #: Clients served at once over both WebSockets; past it new ones get HTTP 503.
    #: None: derived from RLIMIT_NOFILE (`trio_chat._limits.default_max_connections`).
    max_connections: int | None = None
    #: Clients served at once from one (peer) address; past it new ones get HTTP 503.
    max_connections_per_ip: int = 256
    #: Bytes of unsent frames a client may hold before it is closed with 4008 "slow".
    backlog: int = 1 * MIB
    allowed_origins: frozenset[str] = frozenset()
    #: Host names the server answers to (DNS-rebinding defence; ``*``: any). None: loopback
    #: names only when bound to loopback, else any (`trio_chat._hosts`).
    allowed_hosts: frozenset[str] | None = None
    #: Every interval each client is pinged; one that sent nothing since the last is cut.
    keepalive_interval: float = 20 * SECONDS
    #: How long connections get to close on shutdown before they are cut.
    shutdown_grace: float = 3 * SECONDS
    cluster: ClusterMode = "host"
    cluster_group: str = "239.255.77.77"
    cluster_port: int = 47477
    cluster_interface: str = "127.0.0.1"
    cluster_ttl: int = 0
    cluster_secret: bytes | None = None
    cluster_key_file: Path | None = None
    #: This node's HTTP API as peers should reach it (for healing gaps from history).
    http_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``TRIO_CHAT_*`` variables.

        Raises:
          ConfigError: a value is malformed or out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            var = "TRIO_CHAT_" + field.name.upper()
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            parse = _PARSERS[field.name]
            try:
                values[field.name] = parse(raw.strip())
            except ValueError as exc:
                reason = str(exc)
                if reason.startswith(("could not convert", "invalid literal")):
                    reason = "must be a number"
                raise ConfigError(f"{var}={raw!r}: {reason}") from None
        if values.get("cluster") == "lan":
            # LAN mode reaches the segment unless told otherwise.
            values.setdefault("cluster_ttl", 1)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """Check the rules that tie several settings together.

        Raises:
          ConfigError: a rule is broken; the message names the variables.
        """
        if self.cluster == "lan" and self.cluster_secret is None and self.cluster_key_file is None:
            raise ConfigError(
                "TRIO_CHAT_CLUSTER=lan needs TRIO_CHAT_CLUSTER_SECRET or TRIO_CHAT_CLUSTER_KEY_FILE:"
                " a LAN cluster without a key would accept anyone's packets"
            )
        if self.cluster == "lan" and self.cluster_ttl < 1:
            raise ConfigError("TRIO_CHAT_CLUSTER_TTL must be at least 1 in LAN mode")
        if self.cluster == "lan" and self.cluster_interface.startswith("127."):
            raise ConfigError(
                "TRIO_CHAT_CLUSTER=lan needs TRIO_CHAT_CLUSTER_INTERFACE: the address of"
                " this host on the LAN (multicast leaves through that interface)"
            )
        if self.rate_limit > 0 and self.rate_burst < 1:
            raise ConfigError("TRIO_CHAT_RATE_BURST must be at least 1 when rate limiting is on")

    def chat_socket_url(self, page_host: str, port: int | None) -> str | None:
        """The chat socket URL for a page served from ``page_host`` (host[:port]).

        ``port`` is the port the chat socket is bound to (None when it is off).
        """
        if self.ws_public_url is not None:
            return self.ws_public_url
        if port is None:
            return None
        host = page_host.rsplit(":", 1)[0] if not page_host.endswith("]") else page_host
        return f"ws://{host}:{port}/ws"


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a number above 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be a number, 0 or above")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number above 0")
    return value


def _size(raw: str) -> int:
    """A byte count, with an optional K/M suffix (``1M`` = 1 MiB)."""
    units = {"k": KIB, "m": MIB}
    factor = units.get(raw[-1:].lower(), 1)
    number = raw[:-1] if factor != 1 else raw
    value = int(number) * factor
    if value < 1 * KIB:
        raise ValueError("must be at least 1K")
    return value


def _bind(raw: str) -> tuple[str, int] | None:
    if raw.lower() == "off":
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT or off")
    return host.strip("[]"), _port(port)


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, 0 to 65535")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in options:
            raise ValueError("must be one of " + ", ".join(options))
        return raw.lower()

    return parse


def _ttl(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 255:
        raise ValueError("must be 0 to 255")
    return value


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not raw.startswith(tuple(s + "://" for s in schemes)):
            raise ValueError("must start with " + " or ".join(s + "://" for s in schemes))
        return raw.rstrip("/")

    return parse


def _origins(raw: str) -> frozenset[str]:
    origins = frozenset(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
    return origins


def _secret(raw: str) -> bytes:
    if len(raw) < 16:
        raise ValueError("must be at least 16 characters")
    return raw.encode()


_PARSERS: Final[dict[str, Callable[[str], object]]] = {
    "data_dir": Path,
    "store": _choice("sqlite", "memory"),
    "rate_limit": _non_negative_float,
    "rate_burst": _positive_int,
    "rate_strikes": _positive_int,
    "max_text": _positive_int,
    "max_frame": _size,
    "max_rooms": _positive_int,
    "history_on_join": lambda raw: _positive_int(raw) if raw != "0" else 0,
    "resume_max": _positive_int,
    "ws_bind": _bind,
    "ws_public_url": _url("ws", "wss"),
    "max_connections": _positive_int,
    "max_connections_per_ip": _positive_int,
    "backlog": _size,
    "allowed_origins": _origins,
    "allowed_hosts": parse_allowed_hosts,
    "keepalive_interval": _positive_float,
    "shutdown_grace": _non_negative_float,
    "cluster": _choice("off", "host", "lan"),
    "cluster_group": str,
    "cluster_port": _port,
    "cluster_interface": str,
    "cluster_ttl": _ttl,
    "cluster_secret": _secret,
    "cluster_key_file": Path,
    "http_url": _url("http", "https"),
}
