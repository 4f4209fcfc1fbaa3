"""The multicast link as a `Bus`: the one module of the node that imports ``link``.

`MulticastBus` adapts `link.ClusterLink` (UDP multicast, NAK repair, heartbeats) to the
node's `Bus`: it translates the link's events into the bus's, and fetches missed messages
from peers' HTTP API (``/api/cluster/messages``, signed with the cluster secret).
"""

from __future__ import annotations

import dataclasses
import re
import ssl
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from .._errors import ConfigError
from ..link._events import Delivered, LinkEvent, PeerStatus
from ..link._events import Gap as LinkGap
from ..link._events import PeerDown as LinkPeerDown
from ..link._events import PeerUp as LinkPeerUp
from ..link._packet import derived_port
from ..link._socket import ClusterLink, LinkConfig
from ._bus import BusEvent, Gap, Payload, PeerDown, PeerUp
from ._peer_http import fetch_from_peers

if TYPE_CHECKING:
    from ..settings._settings import Settings
    from ._store import Message


def link_config(
    settings: Settings, node_id: str, incarnation: int, *, secret: bytes, http_url: str
) -> LinkConfig:
    """The link's configuration for the node ``node_id``, with the cluster ``secret``.

    Unless ``TRIO_CHAT_CLUSTER_PORT`` is set, the port is the secret's own (`derived_port`).
    """
    port = settings.cluster_port or derived_port(secret)
    return LinkConfig(
        secret=secret,
        cluster_id=f"trio-chat/{settings.cluster_group}:{port}",
        node_id=node_id,
        incarnation=incarnation,
        http_url=http_url,
        port=port,
        group=settings.cluster_group,
        interface=settings.cluster_interface,
        ttl=settings.cluster_ttl,
    )


_PEM_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def peer_tls(settings: Settings) -> ssl.SSLContext | bool:
    """How heal requests check a peer's https certificate (httpx's ``verify``).

    Host mode with a certificate: the peers are this host's workers, serving this node's
    own certificate at a loopback address it does not name, so exactly that certificate
    (its first, the leaf) is trusted, whoever issued it. Otherwise the usual CA and name
    checks: in LAN mode each peer's ``TRIO_CHAT_HTTP_URL`` must use a name its
    certificate covers.

    Raises:
      ConfigError: the certificate file holds no PEM certificate.
    """
    if settings.cluster != "host" or settings.ws_certfile is None:
        return True
    found = _PEM_CERTIFICATE.search(settings.ws_certfile.read_bytes())
    if found is None:
        raise ConfigError(f"TRIO_CHAT_WS_CERTFILE={str(settings.ws_certfile)!r}: no certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # The leaf alone is the trust anchor: not its issuer, which signs others' too.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=found.group().decode("ascii"))
    return context


class MulticastBus:
    """A `Bus` over the multicast link.

    Args:
      link: the link (not yet running: `run` runs it).
      secret: the cluster secret (the link's), which signs heal requests.
      verify: how heal requests check a peer's https certificate (`peer_tls`).
    """

    def __init__(
        self, link: ClusterLink, secret: bytes, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.link = link
        self._secret = secret
        self._verify = verify

    @classmethod
    def from_config(cls, config: LinkConfig, verify: ssl.SSLContext | bool = True) -> MulticastBus:
        """The bus over a multicast socket.

        Raises:
          ConfigError: the secret or node id is unusable.
        """
        return cls(ClusterLink(config), config.secret, verify)

    @property
    def heal_secret(self) -> bytes:
        return self._secret

    # Cluster.run `start`s it: `ClusterLink.run` calls `task_status.started()` for it.
    async def run(  # noqa: ASYNC128
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        await self.link.run(task_status=task_status)

    def send(self, payload: bytes) -> None:
        self.link.broadcast(payload)

    async def receive(self) -> BusEvent:
        return _event(await self.link.events.receive())

    def receive_nowait(self) -> BusEvent:
        return _event(self.link.events.receive_nowait())

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        """Ask the origin first, then the other live peers, over their HTTP API."""
        peers = [
            (p.node, p.http_url)
            for p in self.link.peers()
            if p.status in (PeerStatus.ALIVE, PeerStatus.SUSPECT)
        ]
        return await fetch_from_peers(
            self._secret, peers, origin, after, limit, verify=self._verify
        )

    def statistics(self) -> dict[str, int]:
        link = self.link.statistics()
        counts = dataclasses.asdict(link.link)
        counts.update(
            rcvbuf=link.rcvbuf,
            send_failures=link.send_failures,
            events_overflowed=link.events_overflowed,
        )
        return counts


def _event(event: LinkEvent) -> BusEvent:
    """A link event as the bus's."""
    match event:
        case Delivered(origin=origin, payload=payload):
            return Payload(origin, payload)
        case LinkPeerUp(node=peer):
            return PeerUp(peer)
        case LinkPeerDown(node=peer, reason=reason):
            return PeerDown(peer, reason)
        case LinkGap(origin=origin, first_seq=first, last_seq=last):
            return Gap(origin, f"seq {first}-{last}")
