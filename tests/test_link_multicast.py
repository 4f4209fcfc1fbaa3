"""ClusterLinks over real multicast on the loopback interface.

Network rules: datagrams never leave this host. Every link here uses interface 127.0.0.1
(``IP_MULTICAST_IF``) and TTL 0, a port of its own and a secret of its own.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace

import pytest
import trio

from trio_chat._errors import ConfigError
from trio_chat.link._diag import run_cluster_check
from trio_chat.link._events import Delivered, PeerDown, PeerUp
from trio_chat.link._socket import ClusterLink, LinkConfig, MulticastTransport, new_incarnation

from _server_process import free_udp_port


@pytest.fixture
def config() -> LinkConfig:
    return LinkConfig(
        secret=os.urandom(32),
        cluster_id="loopback-test",
        node_id="template",
        incarnation=new_incarnation(),
        http_url="",
        port=free_udp_port(),
        interface="127.0.0.1",
        ttl=0,
    )


def node(config: LinkConfig, name: str) -> ClusterLink:
    return ClusterLink(
        LinkConfig(
            secret=config.secret,
            cluster_id=config.cluster_id,
            node_id=name,
            incarnation=new_incarnation(),
            http_url=f"http://127.0.0.1:8000/{name}",
            port=config.port,
            interface=config.interface,
            ttl=config.ttl,
        )
    )


async def test_three_links_exchange_messages_over_loopback_multicast(config: LinkConfig) -> None:
    links = {name: node(config, name) for name in ("w0", "w1", "w2")}
    received: dict[str, list[tuple[str, bytes]]] = {name: [] for name in links}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for link in links.values():
                await nursery.start(link.run)
            for name, link in links.items():
                ups = [await link.events.receive() for _ in range(2)]
                assert {up.node for up in ups if isinstance(up, PeerUp)} == set(links) - {name}
            for name, link in links.items():
                link.broadcast(f"hello from {name}".encode())
            links["w0"].broadcast(os.urandom(40_000))  # Fragmented.
            for name, link in links.items():
                want = 3 if name != "w0" else 2
                while len(received[name]) < want:
                    event = await link.events.receive()
                    assert isinstance(event, Delivered), event
                    received[name].append((event.origin, event.payload))
            nursery.cancel_scope.cancel()
    assert sorted(origin for origin, _ in received["w1"]) == ["w0", "w0", "w2"]
    assert received["w2"][0] == ("w0", b"hello from w0")
    stats = links["w1"].statistics()
    assert stats.link.packets_looped_back > 0
    assert stats.link.packets_forged == stats.link.packets_foreign == 0
    assert stats.rcvbuf > 0
    peers = links["w1"].peers()
    assert [(p.node, p.http_url) for p in peers] == [
        ("w0", "http://127.0.0.1:8000/w0"),
        ("w2", "http://127.0.0.1:8000/w2"),
    ]


async def test_leave_on_cancellation_reaches_the_others(config: LinkConfig) -> None:
    a, b = node(config, "a"), node(config, "b")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            async with trio.open_nursery() as inner:
                await inner.start(a.run)
                up = await b.events.receive()
                assert isinstance(up, PeerUp)
                assert (up.node, up.http_url) == ("a", "http://127.0.0.1:8000/a")
                inner.cancel_scope.cancel()
            assert await b.events.receive() == PeerDown("a", "left")
            nursery.cancel_scope.cancel()
    with pytest.raises(trio.ClosedResourceError):
        a.broadcast(b"too late")


async def test_a_clamped_receive_buffer_is_reported(
    config: LinkConfig, caplog: pytest.LogCaptureFixture
) -> None:
    huge = replace(config, rcvbuf=1 << 30)
    with caplog.at_level(logging.WARNING, logger="trio_chat.link"):
        transport = MulticastTransport(huge)
    transport.close()
    assert transport.rcvbuf < 1 << 30
    assert "kernel granted" in caplog.text


async def test_cluster_check_sees_a_peer_and_its_own_loopback(config: LinkConfig) -> None:
    out = io.StringIO()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node(config, "server").run)
            code = await run_cluster_check(config, 1.5, out)
            nursery.cancel_scope.cancel()
    assert code == 0, out.getvalue()
    assert "server" in out.getvalue()
    assert "loops back" in out.getvalue()


async def test_cluster_check_alone_explains_what_to_check(config: LinkConfig) -> None:
    out = io.StringIO()
    with trio.fail_after(10):
        code = await run_cluster_check(config, 1.5, out)
    assert code == 1
    assert "No other node answered" in out.getvalue()


async def test_cluster_check_reports_an_interface_it_cannot_join(config: LinkConfig) -> None:
    # A documentation address (TEST-NET-2), not this host's: joining fails before any
    # datagram is sent.
    out = io.StringIO()
    with trio.fail_after(10):
        code = await run_cluster_check(replace(config, interface="198.51.100.123"), 1.0, out)
    assert code == 2
    assert "FAILED: cannot join cluster group" in out.getvalue()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group": "10.0.0.1"}, "not a multicast address"),
        ({"interface": "eth0"}, "IPv4 addresses"),
        ({"ttl": 256}, "TTL 0-255"),
        ({"suspect_after": 10.0}, "dead_after"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    config: LinkConfig, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterLink(replace(config, **change))  # type: ignore[arg-type]
