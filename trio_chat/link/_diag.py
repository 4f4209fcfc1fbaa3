"""``trio-chat cluster``: join the group for a while and say what works and what does not.

Users' networks often block multicast; this check tells them which part fails: nothing
comes back at all (the interface or the host), our own datagrams come back but nobody
answers (TTL, firewall, switches, settings), or peers answer under another secret. For
the last, the check reads the clear header of every datagram (`_Tap`): a sender with
another secret whose node id is not of this data directory's host id is another
deployment on the same group and port, not a node of ours with a wrong secret.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import trio

from .._errors import BadPacket, ConfigError
from ._packet import cluster_tag, key_fingerprint, parse_header_untrusted
from ._socket import ClusterLink, LinkConfig, MulticastTransport, new_incarnation

if TYPE_CHECKING:
    from typing import TextIO

#: Exit codes of the check.
OK, NO_PEERS, NO_MULTICAST = 0, 1, 2
#: Senders with another secret named in the report; the rest are only counted.
_NAMED: Final = 8


class _Tap:
    """The multicast socket, noting who seals datagrams with another secret.

    The node ids come from clear, unauthenticated headers: they are only shown (quoted,
    at most `_NAMED`), never trusted.
    """

    def __init__(self, transport: MulticastTransport, config: LinkConfig) -> None:
        self._transport = transport
        self._tag = cluster_tag(config.cluster_id)
        self._key_id = key_fingerprint(config.secret)
        #: Senders with our cluster id and another secret: node id -> datagrams.
        self.other_secret: dict[str, int] = {}
        self.other_secret_packets = 0

    def send_nowait(self, data: bytes) -> bool:
        return self._transport.send_nowait(data)

    async def receive(self) -> bytes:
        data = await self._transport.receive()
        try:
            header, _ = parse_header_untrusted(data)
        except BadPacket:
            return data  # the link counts it
        if header.cluster_tag == self._tag and header.key_id != self._key_id:
            self.other_secret_packets += 1
            if header.node_id in self.other_secret or len(self.other_secret) < _NAMED:
                self.other_secret[header.node_id] = self.other_secret.get(header.node_id, 0) + 1
        return data


async def run_cluster_check(
    config: LinkConfig, seconds: float, out: TextIO, host_id: str | None = None
) -> int:
    """Join the cluster as a short-lived observer and report what it sees.

    The observer has its own node id and no HTTP address, so servers never mistake it for
    one of theirs and never heal from it.

    Args:
        config: the settings the servers use (group, port, interface, TTL, secret).
        seconds: how long to listen; two heartbeat intervals are enough.
        out: where the report goes.
        host_id: host mode: the host id of the servers' data directory (their node ids
          are ``<host id>-<slot>``), which tells this deployment's nodes from another's.

    Returns:
        0 if at least one peer answered, 1 if multicast loops back on this host but no peer
        answered, 2 if not even our own datagrams came back (or the group cannot be joined).
    """
    await trio.lowlevel.checkpoint()  # a group that cannot be joined fails before any
    name = f"check-{socket.gethostname()}-{os.getpid()}".encode()[:64].decode(errors="ignore")
    observer = replace(config, node_id=name, incarnation=new_incarnation(), http_url="")
    out.write(
        f"Joining {config.group}:{config.port} on interface {config.interface} "
        f"(TTL {config.ttl}, loop {'on' if config.loop else 'off'}) for {seconds:g} s "
        f"as {name}.\n"
    )
    try:
        transport = MulticastTransport(config)
    except ConfigError as exc:
        out.write(f"FAILED: {exc}\n{_NO_JOIN}")
        return NO_MULTICAST
    tap = _Tap(transport, config)
    link = ClusterLink(observer, transport=tap)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            nursery.start_soon(_drain, link)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
    finally:
        transport.close()
    return _report(config, link, tap, transport.rcvbuf, host_id, out)


async def _drain(link: ClusterLink) -> None:
    async for _ in link.events:
        pass


def _report(
    config: LinkConfig,
    link: ClusterLink,
    tap: _Tap,
    rcvbuf: int,
    host_id: str | None,
    out: TextIO,
) -> int:
    stats = link.statistics()
    peers = link.peers()
    if rcvbuf < config.rcvbuf:
        out.write(
            f"WARNING: receive buffer {rcvbuf} bytes, {config.rcvbuf} requested: raise "
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
    _report_other_secrets(config, tap, host_id, out)
    foreign = stats.link.packets_foreign - tap.other_secret_packets
    if foreign or stats.link.packets_forged:
        out.write(
            f"{foreign} packets of another cluster id or protocol version and "
            f"{stats.link.packets_forged} that failed authentication were dropped: every "
            "node must use the same group, port and version of trio-chat.\n"
        )
    if peers:
        out.write(f"OK: {len(peers)} peer(s) seen.\n")
        return OK
    if config.loop and not looped:
        out.write(_NO_LOOPBACK.format(config=config))
        return NO_MULTICAST
    out.write(_NO_PEERS.format(config=config))
    return NO_PEERS


def _report_other_secrets(config: LinkConfig, tap: _Tap, host_id: str | None, out: TextIO) -> None:
    """Say who multicasts on this group and port with another secret, and what it means."""
    if not tap.other_secret_packets:
        return
    ours = sorted(n for n in tap.other_secret if host_id and n.startswith(f"{host_id}-"))
    others = sorted(n for n in tap.other_secret if n not in ours)
    unnamed = "" if len(tap.other_secret) < _NAMED else " (and maybe more)"
    out.write(
        f"{tap.other_secret_packets} packets sealed with another secret were dropped, from "
        f"{', '.join(map(repr, ours + others))}{unnamed}.\n"
    )
    if ours:
        out.write(
            f"MISMATCH: {', '.join(map(repr, ours))} share this data directory's host id"
            f" ({host_id}) but not its key: every worker must run with the same"
            " TRIO_CHAT_CLUSTER_SECRET or TRIO_CHAT_CLUSTER_KEY_FILE (or neither).\n"
        )
    if others and host_id is not None:
        out.write(
            f"ANOTHER DEPLOYMENT: {', '.join(map(repr, others))} belong to another data"
            f" directory, with its own key, on the same group and port ({config.group}:"
            f"{config.port}). Unset TRIO_CHAT_CLUSTER_PORT in both (each key then has a"
            " port of its own) or give each its own port.\n"
        )
    elif others:
        out.write(
            f"If {', '.join(map(repr, others))} are nodes of this cluster, give every node"
            " the same TRIO_CHAT_CLUSTER_SECRET (or key file); if they are another"
            f" deployment on {config.group}:{config.port}, give one of the two its own"
            " TRIO_CHAT_CLUSTER_PORT (or leave it unset in both).\n"
        )


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
    and secret (unless TRIO_CHAT_CLUSTER_PORT is set, the port comes from the key: run
    this check with the servers' TRIO_CHAT_DATA_DIR, secret or key file);
  - TTL {config.ttl}: 0 keeps datagrams on this host; across a LAN use
    TRIO_CHAT_CLUSTER=lan (TTL 1) on every host, with TRIO_CHAT_CLUSTER_INTERFACE set to
    the address on the shared network;
  - host firewalls let UDP port {config.port} in;
  - switches: IGMP snooping without a querier, or Wi-Fi client isolation, drop multicast;
  - cloud networks rarely carry multicast at all: see docs/cluster.md.
"""
