"""Who the client is behind a reverse proxy: ``X-Forwarded-For``, ``Forwarded`` and their
trust.

Theory of operation. A proxy in front of the server makes every client look like the
proxy: the TCP peer is the proxy's address, and a page served over https through a proxy
that terminates TLS arrives as plain http. The proxy says who the client was in headers,
and anyone can send the same headers, so they are believed only from a peer in
``TRIO_CHAT_TRUSTED_PROXIES`` (`TrustedProxies`), never from anyone else.

Each proxy on the way appends the address it saw to ``X-Forwarded-For`` (or adds one
``for=`` element to RFC 7239's ``Forwarded``); whatever a client wrote itself comes
first. So the list is read from the right: the right-most address that is not a trusted
proxy is the client, because the hop that wrote it is trusted and everything to its
left may be forged. If every address is a trusted proxy, the left-most is taken. The
scheme the client used is the ``proto`` of that same hop (``X-Forwarded-Proto`` one value
per hop, or a single value set by the one proxy that terminates TLS).

``X-Forwarded-For`` is read when present; ``Forwarded`` only when it is absent; an
``X-Forwarded-Proto`` alone gives the scheme, and the proxy itself stays the client. A proxy
passes on the headers it does not maintain as the client sent them, so the one it does
maintain must win: nginx and HAProxy's ``option forwardfor`` write ``X-Forwarded-For``
(a proxy that writes only ``Forwarded`` must drop a client's ``X-Forwarded-For``;
docs/security.md).

`resolve_client_untrusted` never raises: a header it cannot read (garbage, ``unknown``,
an obfuscated ``_name``, more hops than `MAX_HOPS`) leaves the TCP peer as the client,
with the reason for a DEBUG line. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Hops read from the right of a forwarding header. Real chains have one to three; past
#: this many trusted hops the header is not believed, and a header of thousands of
#: values costs no more than this.
MAX_HOPS: Final = 16
#: The headers that matter (lowercase), so that callers keep only these.
FORWARDING_HEADERS: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"})

# One forwarded-pair of RFC 7239: a token, "=", a token or a quoted-string, then the
# pair's end: ";" (next pair of the element), "," (next element) or the end of the text.
_PAIR: Final = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[!#$%&'*+.^_`|~0-9A-Za-z:\[\]-]*)\s*([;,]|$)"""
)
# A node of X-Forwarded-For or Forwarded's for=: an address, IPv6 possibly in brackets,
# possibly with a port.
_BRACKETED: Final = re.compile(r"\[([^\]]*)\](?::\d{1,5})?")
_V4_PORT: Final = re.compile(r"([0-9.]+):\d{1,5}")
_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


class TrustedProxies:
    """The networks whose forwarding headers are believed (``TRIO_CHAT_TRUSTED_PROXIES``).

    Args:
      networks: CIDRs as `parse_networks` returns them; empty: trust nobody.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        """Whether the peer at ``address`` (an IP address as text) is a trusted proxy."""
        if not self.networks:
            return False
        parsed = _address(address)
        return parsed is not None and self._trusts(parsed)

    def _trusts(self, address: _Address) -> bool:
        return any(address in network for network in self.networks)


@dataclasses.dataclass(frozen=True, slots=True)
class Client:
    """Who a connection is from, as far as the server believes."""

    #: The client's address: from a trusted proxy's header, else the TCP peer's.
    address: str
    #: ``http`` or ``https`` as a trusted proxy says the client connected; None: not
    #: said (the connection's own scheme stands).
    scheme: str | None = None
    #: Why a trusted proxy's headers were not (all) used, for a DEBUG line; None: fine.
    problem: str | None = None


def parse_networks(raw: str) -> list[str]:
    """The CIDRs of ``TRIO_CHAT_TRUSTED_PROXIES``, normalized and sorted.

    A bare address is one host (``/32`` or ``/128``).

    Raises:
      ValueError: an entry is not a network, has host bits set, or is ``/0`` (every
        address: anyone could then claim to be any client).
    """
    networks: set[_Network] = set()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            network = ipaddress.ip_network(item)
        except ValueError as exc:
            raise ValueError(
                f"{item!r} is not an IPv4 or IPv6 network like 10.0.0.0/8 or fd00::/8 ({exc})"
            ) from None
        if network.prefixlen == 0:
            raise ValueError(
                f"{item!r} trusts every address: anyone could claim any client address."
                " List your proxies' addresses"
            )
        networks.add(network)
    return [str(n) for n in sorted(networks, key=lambda n: (n.version, n))]


def resolve_client_untrusted(
    peer: str, headers: Iterable[tuple[bytes, bytes]], proxies: TrustedProxies
) -> Client:
    """The client of a request that came from ``peer`` with these headers.

    Args:
      peer: the TCP peer's address (no port).
      headers: the request's headers (name, value); only `FORWARDING_HEADERS` are read,
        and only when ``peer`` is in ``proxies``.
      proxies: the trusted networks.

    Returns:
      The client: the peer itself unless a trusted peer's headers name another.
    """
    if not proxies:
        return Client(peer)
    peer_address = _address(peer)
    if peer_address is None or not proxies._trusts(peer_address):
        return Client(peer)
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in FORWARDING_HEADERS:
            found.setdefault(lowered, []).append(value)
    if b"forwarded" in found and b"x-forwarded-for" not in found:
        return _from_forwarded(peer, b",".join(found[b"forwarded"]), proxies)
    return _from_x_forwarded(peer, found, proxies)


def _from_x_forwarded(
    peer: str, found: dict[bytes, list[bytes]], proxies: TrustedProxies
) -> Client:
    if b"x-forwarded-for" in found:
        hops, whole = _tail(b",".join(found[b"x-forwarded-for"]))
        chosen = _choose(hops, whole, proxies)
        if isinstance(chosen, str):
            return Client(peer, problem=f"X-Forwarded-For: {chosen}")
        index, address = chosen
    else:
        # The proxy is the client (it says nothing else), but may say how it was reached.
        hops, whole, index, address = [peer], True, 0, peer
    if b"x-forwarded-proto" not in found:
        return Client(address)
    protos, protos_whole = _tail(b",".join(found[b"x-forwarded-proto"]))
    # One value per hop, or one value: that of the proxy that terminated TLS.
    if len(protos) == 1 and protos_whole:
        proto = protos[0]
    elif whole and protos_whole and len(protos) == len(hops):
        proto = protos[index]
    else:
        return Client(address, problem="X-Forwarded-Proto: not one value per hop")
    scheme = _SCHEMES.get(proto.lower())
    if scheme is None:
        return Client(address, problem=f"X-Forwarded-Proto: {_shown(proto)} is not a scheme")
    return Client(address, scheme)


def _from_forwarded(peer: str, value: bytes, proxies: TrustedProxies) -> Client:
    elements = _forwarded_elements(value)
    if elements is None:
        return Client(peer, problem="Forwarded: not RFC 7239 syntax")
    whole = len(elements) <= MAX_HOPS
    elements = elements[-MAX_HOPS:]
    chosen = _choose([element.get("for", "") for element in elements], whole, proxies)
    if isinstance(chosen, str):
        return Client(peer, problem=f"Forwarded: {chosen}")
    index, address = chosen
    proto = elements[index].get("proto")
    if proto is None:
        return Client(address)
    scheme = _SCHEMES.get(proto.lower())
    if scheme is None:
        return Client(address, problem=f"Forwarded: proto={_shown(proto)} is not a scheme")
    return Client(address, scheme)


def _choose(hops: list[str], whole: bool, proxies: TrustedProxies) -> tuple[int, str] | str:
    """The right-most hop that is not a trusted proxy (index, address), or why none is.

    ``whole``: ``hops`` is the whole list, not only its right-most `MAX_HOPS` values; if
    every hop is trusted, the left-most is the client only then.
    """
    first: str | None = None
    for index in range(len(hops) - 1, -1, -1):
        address = _address(_node(hops[index]))
        if address is None:
            return f"{_shown(hops[index])} is not an address"
        if not proxies._trusts(address):
            return index, str(address)
        first = str(address)
    if first is None or not whole:
        return f"no client among the last {MAX_HOPS} hops"
    # Every hop is a trusted proxy: the first one is the client.
    return 0, first


def _tail(value: bytes) -> tuple[list[str], bool]:
    """The comma-separated values of a header, at most `MAX_HOPS` from the right, and
    whether they are all of them."""
    parts = value.decode("latin-1").rsplit(",", MAX_HOPS)
    whole = len(parts) <= MAX_HOPS
    return [part.strip() for part in parts[-MAX_HOPS:]], whole


def _forwarded_elements(value: bytes) -> list[dict[str, str]] | None:
    """The elements of a ``Forwarded`` header, each its pairs (names lowercased, values
    unquoted), or None if it is not RFC 7239 syntax (a name twice in one element included).
    """
    text = value.decode("latin-1")
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None:
            return None
        name, raw, separator = match[1].lower(), match[2], match[3]
        if name in current:
            return None
        current[name] = _unquote(raw) if raw.startswith('"') else raw
        position = match.end()
        if separator != ";":
            elements.append(current)
            current = {}
    if current or not elements:
        return None
    return elements


def _unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def _node(text: str) -> str:
    """The address in a node (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]``, ``[::1]:80``, ``::1``)."""
    text = text.strip().strip('"')
    bracketed = _BRACKETED.fullmatch(text)
    if bracketed is not None:
        return bracketed[1]
    with_port = _V4_PORT.fullmatch(text)
    if with_port is not None:
        return with_port[1]
    return text


def _address(text: str) -> _Address | None:
    """``text`` as an address (an IPv4-mapped IPv6 address as IPv4), or None."""
    if not text or len(text) > 45 + 16:  # the longest IPv6 text, with a scope id
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _shown(text: str) -> str:
    """A header value for a log line: quoted, and cut (it may be kilobytes of garbage)."""
    return repr(text if len(text) <= 64 else text[:64] + "...")
