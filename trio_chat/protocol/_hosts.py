"""The Host check: the names this server answers to, against DNS rebinding.

A page at ``evil.example`` whose name its owner re-points at 127.0.0.1 is, for the
browser, its own origin: its requests carry ``Origin`` and ``Host`` both
``evil.example``, so comparing the two (`origin_allowed`) lets it in. The browser cannot
be made to send another site's name as ``Host``, so checking ``Host`` against the names
the server is meant to be reached by closes that hole. The names are
``TRIO_CHAT_ALLOWED_HOSTS`` (like Django's ``ALLOWED_HOSTS``): ``chat.example.com``,
``.example.com`` (that domain and its subdomains), an address, or ``*`` (any).

Unset, the default follows where the server listens. Bound to loopback, only loopback
names are answered (``localhost``, ``127.x.x.x``, ``::1``): that is where a rebinding
page attacks, the server of a developer's laptop. Bound elsewhere, any name is answered
(the app cannot know the names a proxy or DNS gives it), and the start log says to set
the variable. The app knows the chat socket's bind (``TRIO_CHAT_WS_BIND``) and the HTTP
side's as ``TRIO_CHAT_HTTP_URL`` gives it (``trio-chat serve`` sets it from ``--bind``);
under plain hypercorn without ``TRIO_CHAT_HTTP_URL`` the HTTP bind is unknown, and the
chat socket's decides (off counts as loopback: the safe side).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Final, Protocol


class HostSettings(Protocol):
    """What the Host rules read of `trio_chat.Settings` (this layer sits below it)."""

    @property
    def allowed_hosts(self) -> frozenset[str] | None: ...
    @property
    def ws_bind(self) -> tuple[str, int] | None: ...
    @property
    def http_url(self) -> str | None: ...


# A Host header: a name or an IPv4 address, or an IPv6 address in brackets; a port.
_HOST_HEADER: Final = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::\d*)?")
# An entry of TRIO_CHAT_ALLOWED_HOSTS: *, or a name or IPv4 address (.name: and its
# subdomains); IPv6 addresses are checked apart.
_ENTRY: Final = re.compile(r"\*|\.?[a-z0-9_-][a-z0-9_.-]*")


def parse_allowed_hosts(raw: str) -> frozenset[str]:
    """The entries of ``TRIO_CHAT_ALLOWED_HOSTS``, lowercased, brackets and final dots off.

    Raises:
      ValueError: an entry is not a host name, a ``.domain``, an address or ``*``.
    """
    entries = set()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        entry = item.lower().removeprefix("[").removesuffix("]").rstrip(".")
        if not (_ENTRY.fullmatch(entry) or _is_ipv6(entry)):
            raise ValueError(
                f"{item!r} is not a host name like chat.example.com (no scheme, no"
                " port), .example.com for a domain and its subdomains, or *"
            )
        entries.add(entry)
    if not entries:
        raise ValueError("must name at least one host, or *")
    return frozenset(entries)


def host_allowed(host: str, settings: HostSettings) -> bool:
    """Whether a request with this ``Host`` header (host[:port]) may be answered."""
    allowed = settings.allowed_hosts
    if allowed is None and not bound_to_loopback(settings):
        return True
    if allowed is not None and "*" in allowed:
        return True
    match = _HOST_HEADER.fullmatch(host.lower())
    if match is None:
        return False
    name = (match["v6"] or match["name"]).rstrip(".")
    if allowed is None:
        return _is_loopback(name)
    return name in allowed or any(
        entry.startswith(".") and (name.endswith(entry) or name == entry[1:]) for entry in allowed
    )


def bound_to_loopback(settings: HostSettings) -> bool:
    """Whether every address the server is known to listen on is a loopback one."""
    if settings.ws_bind is not None and not _is_loopback(settings.ws_bind[0]):
        return False
    if settings.http_url is None:
        return True
    return _is_loopback(urllib.parse.urlsplit(settings.http_url).hostname or "")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, host: str, allowed: frozenset[str], *, secure: bool) -> bool:
    """Whether a WebSocket from a page at ``origin`` may connect to ``host``.

    Clients that are not browsers send no Origin and are allowed. A page's own origin is
    allowed: its host must equal the requested host, ports aside, because the chat
    socket listens on another port than the page; and a plain ``http://`` page may not
    open a socket the client reached over TLS (``secure``: ours, or a trusted proxy's
    ``X-Forwarded-Proto``), since on that name it is another, weaker origin that a
    network attacker can write. Others must be listed.
    """
    if origin is None or origin.rstrip("/") in allowed:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
        request_host = urllib.parse.urlsplit("//" + host).hostname
    except ValueError:  # an unclosed IPv6 bracket, say
        return False
    if secure and parts.scheme != "https":
        return False
    return parts.hostname is not None and parts.hostname == request_host
