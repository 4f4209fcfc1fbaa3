"""The pure rule of protocol/_proxies.py: which forwarding headers are believed, and how
they are read. Synchronous and clock-free; hypothesis for "no input makes it raise"."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import ConfigError, Settings
from trio_chat.protocol._proxies import (
    MAX_HOPS,
    Client,
    TrustedProxies,
    parse_networks,
    resolve_client_untrusted,
)

PROXIES = TrustedProxies(["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"])
PROXY = "10.0.0.5"


def resolve(*headers: tuple[str, str], peer: str = PROXY) -> Client:
    return resolve_client_untrusted(
        peer, [(name.encode(), value.encode("latin-1")) for name, value in headers], PROXIES
    )


@pytest.mark.parametrize(
    ("headers", "address", "scheme"),
    [
        # One proxy in front.
        ([("X-Forwarded-For", "203.0.113.7")], "203.0.113.7", None),
        (
            [("x-forwarded-for", "203.0.113.7"), ("X-Forwarded-Proto", "https")],
            "203.0.113.7",
            "https",
        ),
        # A client's own X-Forwarded-For, appended to by the proxy: the forgery is left.
        ([("X-Forwarded-For", "198.51.100.66, 203.0.113.7")], "203.0.113.7", None),
        # Two proxies: the right-most untrusted address is the client.
        ([("X-Forwarded-For", "198.51.100.66, 203.0.113.7, 10.1.2.3")], "203.0.113.7", None),
        # Several header lines are one list, in order.
        (
            [("X-Forwarded-For", "198.51.100.66"), ("X-Forwarded-For", "203.0.113.7, 10.1.2.3")],
            "203.0.113.7",
            None,
        ),
        # Every hop trusted: the first is the client.
        ([("X-Forwarded-For", "10.0.0.1, 10.0.0.2")], "10.0.0.1", None),
        # Ports and brackets, IPv4-mapped IPv6.
        ([("X-Forwarded-For", "203.0.113.7:51000")], "203.0.113.7", None),
        ([("X-Forwarded-For", "[2001:db8::1]:443")], "2001:db8::1", None),
        ([("X-Forwarded-For", "2001:DB8::1")], "2001:db8::1", None),
        ([("X-Forwarded-For", "::ffff:203.0.113.7")], "203.0.113.7", None),
        # One proto per hop: the chosen hop's; a single one: the TLS-terminating proxy's.
        (
            [("X-Forwarded-For", "203.0.113.7, 10.1.2.3"), ("X-Forwarded-Proto", "https, http")],
            "203.0.113.7",
            "https",
        ),
        (
            [("X-Forwarded-For", "203.0.113.7, 10.1.2.3"), ("X-Forwarded-Proto", "HTTPS")],
            "203.0.113.7",
            "https",
        ),
        ([("X-Forwarded-Proto", "https")], PROXY, "https"),
        ([("X-Forwarded-Proto", "wss")], PROXY, "https"),
        # RFC 7239.
        ([("Forwarded", "for=203.0.113.7")], "203.0.113.7", None),
        (
            [("Forwarded", 'For="[2001:db8:cafe::17]:4711";Proto=https')],
            "2001:db8:cafe::17",
            "https",
        ),
        (
            [
                (
                    "Forwarded",
                    "for=198.51.100.66, for=203.0.113.7;proto=https;by=10.0.0.5, for=10.1.2.3;proto=http",
                )
            ],
            "203.0.113.7",
            "https",
        ),
        (
            [("Forwarded", 'for="203.0.113.7:80";host="chat.example";proto=http')],
            "203.0.113.7",
            "http",
        ),
        # X-Forwarded-For wins: the proxy that writes it passes a client's Forwarded on.
        (
            [("Forwarded", "for=198.51.100.66"), ("X-Forwarded-For", "203.0.113.7")],
            "203.0.113.7",
            None,
        ),
        # No forwarding header: the proxy itself.
        ([("Origin", "http://x")], PROXY, None),
    ],
)
def test_trusted_proxy_headers_name_the_client(
    headers: list[tuple[str, str]], address: str, scheme: str | None
) -> None:
    assert resolve(*headers) == Client(address, scheme)


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ([("X-Forwarded-For", "unknown")], "'unknown' is not an address"),
        ([("X-Forwarded-For", "_hidden")], "'_hidden' is not an address"),
        ([("X-Forwarded-For", "")], "'' is not an address"),
        ([("X-Forwarded-For", "203.0.113.7, garbage")], "'garbage' is not an address"),
        ([("X-Forwarded-For", "[2001:db8::1")], "is not an address"),
        ([("X-Forwarded-For", "1.2.3.4.5")], "is not an address"),
        ([("X-Forwarded-For", "x" * 100_000)], "..."),
        (
            [("X-Forwarded-For", ",".join(["10.0.0.1"] * 100))],
            f"no client among the last {MAX_HOPS}",
        ),
        ([("Forwarded", "for=unknown")], "'unknown' is not an address"),
        ([("Forwarded", "for=_gazonk")], "'_gazonk' is not an address"),
        ([("Forwarded", "proto=https")], "'' is not an address"),
        ([("Forwarded", "for")], "not RFC 7239 syntax"),
        ([("Forwarded", 'for="unterminated')], "not RFC 7239 syntax"),
        ([("Forwarded", "for=1.2.3.4;FOR=5.6.7.8")], "not RFC 7239 syntax"),
        ([("Forwarded", "for=1.2.3.4 for=5.6.7.8")], "not RFC 7239 syntax"),
        (
            [("Forwarded", ", ".join(["for=10.0.0.1"] * 100))],
            f"no client among the last {MAX_HOPS}",
        ),
    ],
)
def test_unreadable_headers_leave_the_peer(headers: list[tuple[str, str]], problem: str) -> None:
    client = resolve(*headers)
    assert (client.address, client.scheme) == (PROXY, None)
    assert client.problem is not None
    assert problem in client.problem
    assert len(client.problem) < 200  # fit for a log line, whatever the header's size


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "gopher")],
        [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https, http, https")],
        [("Forwarded", "for=203.0.113.7;proto=ftp")],
    ],
)
def test_an_unreadable_scheme_keeps_the_address(headers: list[tuple[str, str]]) -> None:
    client = resolve(*headers)
    assert (client.address, client.scheme) == ("203.0.113.7", None)
    assert client.problem is not None


@pytest.mark.parametrize("peer", ["203.0.113.1", "::1", "?", "not an address", "10.0.0.5x"])
def test_headers_from_anyone_else_are_ignored(peer: str) -> None:
    client = resolve(
        ("X-Forwarded-For", "198.51.100.66"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=198.51.100.66;proto=https"),
        peer=peer,
    )
    assert client == Client(peer)


def test_nobody_is_trusted_by_default() -> None:
    headers = [(b"X-Forwarded-For", b"198.51.100.66")]
    assert resolve_client_untrusted("127.0.0.1", headers, TrustedProxies()) == Client("127.0.0.1")
    assert Settings().trusted_proxies == frozenset()


def test_an_ipv4_mapped_peer_is_trusted_as_ipv4() -> None:
    headers = [(b"X-Forwarded-For", b"203.0.113.7")]
    assert resolve_client_untrusted("::ffff:10.0.0.5", headers, PROXIES).address == "203.0.113.7"
    assert resolve_client_untrusted("fd00::1", headers, PROXIES).address == "203.0.113.7"


_node = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.sampled_from(["unknown", "_hidden", "", " ", '"', "[", "]:", "::ffff:10.0.0.1", "10.0.0.1"]),
    st.text(st.characters(max_codepoint=255), max_size=20),
)
_header_name = st.sampled_from(["X-Forwarded-For", "X-Forwarded-Proto", "Forwarded", "forwarded"])
_header_value = st.one_of(
    st.lists(_node, max_size=30).map(", ".join),
    st.lists(
        st.tuples(st.sampled_from(["for", "proto", "by", "host", "FOR"]), _node),
        max_size=20,
    ).map(lambda pairs: ";".join(f"{k}={v}" for k, v in pairs)),
    st.text(st.characters(max_codepoint=255), max_size=200),
)


@given(st.lists(st.tuples(_header_name, _header_value), max_size=6))
def test_no_header_makes_it_raise_or_invent_an_address(headers: list[tuple[str, str]]) -> None:
    raw = [(n.encode(), v.encode("latin-1")) for n, v in headers]
    client = resolve_client_untrusted(PROXY, raw, PROXIES)
    assert client.scheme in (None, "http", "https")
    if client.address != PROXY:
        # An address the headers named, written the way ipaddress writes it.
        assert str(ipaddress.ip_address(client.address)) == client.address
        assert client.problem is None or "Proto" in client.problem or "proto" in client.problem


@given(
    forged=st.lists(_node, max_size=10),
    client=st.ip_addresses(v=4).filter(lambda a: not PROXIES.trusts(str(a))),
    hops=st.lists(st.ip_addresses(network="10.0.0.0/8"), max_size=MAX_HOPS - 1),
)
def test_what_a_client_forges_never_wins(
    forged: list[str], client: ipaddress.IPv4Address, hops: list[ipaddress.IPv4Address]
) -> None:
    """Whatever a client writes to the left, the trusted chain's client is found."""
    chain = [*forged, str(client), *map(str, hops)]
    assert resolve(("X-Forwarded-For", ", ".join(chain))).address == str(client)
    elements = ", ".join(f'for="{node}"' for node in chain if '"' not in node and "\\" not in node)
    assert resolve(("Forwarded", elements)).address == str(client)


@pytest.mark.parametrize(
    ("raw", "networks"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        (" 127.0.0.1 , fd00::/8,10.0.0.0/8,,", ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]),
        ("::1", ["::1/128"]),
    ],
)
def test_trusted_proxies_setting(raw: str, networks: list[str]) -> None:
    assert parse_networks(raw) == networks
    settings = Settings.from_env({"TRIO_CHAT_TRUSTED_PROXIES": raw})
    assert settings.trusted_proxies == frozenset(networks)


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ("10.0.0.0/33", "is not an IPv4 or IPv6 network"),
        ("10.0.0.1/8", "has host bits set"),
        ("proxy.example", "is not an IPv4 or IPv6 network"),
        ("0.0.0.0/0", "trusts every address"),
        ("10.0.0.0/8, ::/0", "trusts every address"),
    ],
)
def test_a_bad_trusted_proxies_setting_is_refused(raw: str, said: str) -> None:
    with pytest.raises(ConfigError, match="TRIO_CHAT_TRUSTED_PROXIES") as info:
        Settings.from_env({"TRIO_CHAT_TRUSTED_PROXIES": raw})
    assert said in str(info.value)
