"""``trio-chat cluster``: join the group for a while and say what works and what does not.

Users' networks often block multicast; this check tells them which part fails: nothing
comes back at all (the interface or the host), our own datagrams come back but nobody
answers (TTL, firewall, switches, settings), or peers answer under another secret.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from .._errors import ConfigError
from ._socket import ClusterLink, LinkConfig, new_incarnation

if TYPE_CHECKING:
    from typing import TextIO

#: Exit codes of the check.
OK, NO_PEERS, NO_MULTICAST = 0, 1, 2


async def run_cluster_check(config: LinkConfig, seconds: float, out: TextIO) -> int:
    """Join the cluster as a short-lived observer and report what it sees.

    The observer has its own node id and no HTTP address, so servers never mistake it for
    one of theirs and never heal from it.

    Args:
        config: the settings the servers use (group, port, interface, TTL, secret).
        seconds: how long to listen; two heartbeat intervals are enough.
        out: where the report goes.

    Returns:
        0 if at least one peer answered, 1 if multicast loops back on this host but no peer
        answered, 2 if not even our own datagrams came back (or the group cannot be joined).
    """
    await trio.lowlevel.checkpoint()  # a group that cannot be joined fails before any
    name = f"check-{socket.gethostname()}-{os.getpid()}".encode()[:64].decode(errors="ignore")
    observer = replace(config, node_id=name, incarnation=new_incarnation(), http_url="")
    link = ClusterLink(observer)
    out.write(
        f"Joining {config.group}:{config.port} on interface {config.interface} "
        f"(TTL {config.ttl}, loop {'on' if config.loop else 'off'}) for {seconds:g} s "
        f"as {name}.\n"
    )
    failure = ""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            nursery.start_soon(_drain, link)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
    except* ConfigError as group:
        failure = str(group.exceptions[0])
    if failure:
        out.write(f"FAILED: {failure}\n{_NO_JOIN}")
        return NO_MULTICAST
    return _report(config, link, out)


async def _drain(link: ClusterLink) -> None:
    async for _ in link.events:
        pass


def _report(config: LinkConfig, link: ClusterLink, out: TextIO) -> int:
    stats = link.statistics()
    peers = link.peers()
    if stats.rcvbuf < config.rcvbuf:
        out.write(
            f"WARNING: receive buffer {stats.rcvbuf} bytes, {config.rcvbuf} requested: raise "
            "net.core.rmem_max (sysctl) or bursts will need repairs.\n"
        )
    if peers:
        out.write(f"{'node':<24} {'incarnation':>14} {'state':<8} http_url\n")
        for peer in peers:
            out.write(
                f"{peer.node:<24} {peer.incarnation:>14} {peer.status.value:<8} "
                f"{peer.http_url or '-'}\n"
            )
    looped = stats.link.packets_looped_back > 0
    if config.loop:
        verdict = "loops back" if looped else "does NOT loop back"
        out.write(f"Our own multicast {verdict} on {config.interface}.\n")
    if stats.link.packets_foreign or stats.link.packets_forged:
        out.write(
            f"{stats.link.packets_foreign} packets of another cluster id or secret and "
            f"{stats.link.packets_forged} that failed authentication were dropped: every "
            "node must use the same TRIO_CHAT_CLUSTER_SECRET (or key file) and cluster id.\n"
        )
    if peers:
        out.write(f"OK: {len(peers)} peer(s) seen.\n")
        return OK
    if config.loop and not looped:
        out.write(_NO_LOOPBACK.format(config=config))
        return NO_MULTICAST
    out.write(_NO_PEERS.format(config=config))
    return NO_PEERS


_NO_JOIN = """\
Check that TRIO_CHAT_CLUSTER_INTERFACE is an IPv4 address of this host (`ip -4 addr`) and
TRIO_CHAT_CLUSTER_GROUP a multicast address (224.0.0.0/4; 239.0.0.0/8 is for local use).
"""

_NO_LOOPBACK = """\
Multicast does not work on this host's interface {config.interface}: not even our own
datagrams came back. Check:
  - the interface is up and is this host's (`ip -4 addr`, `ip link show`);
  - a local firewall does not drop UDP to {config.group}:{config.port} (`nft list ruleset`);
  - the interface allows multicast (`ip link set DEV multicast on`).
"""

_NO_PEERS = """\
No other node answered. Multicast works on this host, so check:
  - the servers run with the same group ({config.group}), port ({config.port}), cluster id
    and secret;
  - TTL {config.ttl}: 0 keeps datagrams on this host; across a LAN use
    TRIO_CHAT_CLUSTER=lan (TTL 1) on every host, with TRIO_CHAT_CLUSTER_INTERFACE set to
    the address on the shared network;
  - host firewalls let UDP port {config.port} in;
  - switches: IGMP snooping without a querier, or Wi-Fi client isolation, drop multicast;
  - cloud networks rarely carry multicast at all: see docs/cluster.md.
"""
