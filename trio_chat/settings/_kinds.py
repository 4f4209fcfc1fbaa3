"""How each setting is written in the environment: parsers from text, and back.

A `Kind` turns a variable's text into plain data that ``msgspec.convert`` then checks
against the setting's declared type and bounds (`trio_chat.settings._settings`), and renders a
value back so the docs can show defaults that parse to themselves. Pure: the one kind that
asks the host (`INTERFACE`) is in `trio_chat.settings._host_checks`.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..protocol._hosts import parse_allowed_hosts
from ..protocol._proxies import parse_networks

if TYPE_CHECKING:
    from collections.abc import Callable

KIB: Final = 1024
MIB: Final = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Kind:
    """How a setting is written in the environment.

    ``parse`` turns the text into plain data for ``msgspec.convert`` to check, raising
    ValueError (with a reason, or empty for "must be" + the rule); ``render`` writes a
    value back so that ``parse`` gives it again; ``what`` names the values taken (None:
    said by the type: a number, one of the choices).
    """

    parse: Callable[[str], object]
    render: Callable[[Any], str]
    what: str | None = None
    #: Never echo the value (in errors) or a default.
    secret: bool = False


def _render_plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def _parse_size(raw: str) -> int:
    factor = {"k": KIB, "m": MIB}.get(raw[-1:].lower(), 1)
    number = raw[:-1] if factor != 1 else raw
    if not number.isdigit():
        raise ValueError
    return int(number) * factor


def _render_size(value: int) -> str:
    for suffix, factor in (("M", MIB), ("K", KIB)):
        if value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)


def _parse_bind(raw: str) -> list[object] | None:
    if raw.lower() == "off":
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError
    return [host.strip("[]"), int(port)]


def _render_bind(value: tuple[str, int] | None) -> str:
    if value is None:
        return "off"
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url(*schemes: str) -> Kind:
    prefixes = tuple(scheme + "://" for scheme in schemes)

    def parse(raw: str) -> str:
        if not raw.startswith(prefixes):
            raise ValueError
        return raw.rstrip("/")

    return Kind(parse, str, "a URL starting with " + " or ".join(prefixes))


def _parse_origins(raw: str) -> list[str]:
    origins = sorted({o.strip().rstrip("/") for o in raw.split(",") if o.strip()})
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
    return origins


def _render_names(value: frozenset[str] | None) -> str:
    return "" if value is None else ",".join(sorted(value))


def _parse_group(raw: str) -> str:
    try:
        group = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ValueError from None
    if not group.is_multicast:
        raise ValueError
    return str(group)


def _parse_redis_url(raw: str) -> str:
    try:
        parts = urllib.parse.urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ValueError("must be a URL like redis://[:PASSWORD@]HOST[:PORT][/DB]") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(
            "must be a URL like redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)"
        )
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("the database (the URL's path) must be a number")
    if port == 0:
        raise ValueError("the port must be 1 to 65535")
    return raw


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what a log may show."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


PLAIN: Final = Kind(lambda raw: raw, _render_plain)
CHOICE: Final = Kind(str.lower, str)
SIZE: Final = Kind(_parse_size, _render_size, "a size in bytes (K: KiB, M: MiB)")
BIND: Final = Kind(_parse_bind, _render_bind, "HOST:PORT (a port 0 to 65535) or off")
PATH: Final = Kind(lambda raw: raw, _render_plain, "a path")
SECRET: Final = Kind(str.encode, bytes.decode, secret=True)
ORIGINS: Final = Kind(_parse_origins, _render_names, "comma-separated http(s):// origins")
HOSTS: Final = Kind(
    lambda raw: sorted(parse_allowed_hosts(raw)), _render_names, "comma-separated host names"
)
#: Secret: a Redis URL may carry a password, so an error never echoes it.
REDIS_URL: Final = Kind(_parse_redis_url, str, "a redis:// or rediss:// URL", secret=True)
NETWORKS: Final = Kind(
    parse_networks, _render_names, "comma-separated IPv4/IPv6 networks (CIDR), never `/0`"
)
GLOBS: Final = Kind(
    lambda raw: sorted({g.strip() for g in raw.split(",") if g.strip()}),
    _render_names,
    "comma-separated room globs (`*`, `?`, `[...]`)",
)
GROUP: Final = Kind(_parse_group, str, "an IPv4 multicast address (224.0.0.0-239.255.255.255)")
