"""The multicast link as a `Bus`: the one module of the node that imports ``link``.

`MulticastBus` adapts `link.ClusterLink` (UDP multicast, NAK repair, heartbeats) to the
node's `Bus`: it translates the link's events into the bus's, and fetches missed messages
from peers' HTTP API (``/api/cluster/messages``, signed with the cluster secret).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import TYPE_CHECKING, Final, NoReturn

import httpx
import msgspec
import trio

from .._errors import ConfigError
from ..link._events import Delivered, PeerStatus
from ..link._events import Gap as LinkGap
from ..link._events import PeerDown as LinkPeerDown
from ..link._events import PeerUp as LinkPeerUp
from ..link._socket import ClusterLink, LinkConfig
from ._bus import BusEvent, Gap, Payload, PeerDown, PeerUp
from ._cluster import HEAL_HEADER, sign_heal_request
from ._identity import create_once
from ._store import Message

if TYPE_CHECKING:
    from ..settings._settings import Settings
    from ._identity import NodeIdentity

log = logging.getLogger("trio_chat.cluster")
# One line per heal request is noise; failures are logged here.
logging.getLogger("httpx").setLevel(logging.WARNING)

_HEAL_TIMEOUT: Final = 10.0
_messages_decoder: Final = msgspec.json.Decoder(list[Message])


def cluster_secret(settings: Settings) -> bytes:
    """The cluster secret: set, read from the key file, or (host mode) made once.

    Raises:
      ConfigError: the key file cannot be read, or holds too short a secret.
    """
    if settings.cluster_secret is not None:
        return settings.cluster_secret
    path = settings.cluster_key_file
    if path is None:
        path = settings.data_dir / "cluster.key"
        # Readable by the owner only: whoever reads it can join the cluster.
        create_once(path, secrets.token_urlsafe(32), 0o600)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster key file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"the cluster key in {path} is shorter than 16 bytes")
    return secret


def link_config(settings: Settings, identity: NodeIdentity, *, http_url: str) -> LinkConfig:
    """The link's configuration for this node."""
    return LinkConfig(
        secret=cluster_secret(settings),
        cluster_id=f"trio-chat/{settings.cluster_group}:{settings.cluster_port}",
        node_id=identity.node_id,
        incarnation=identity.incarnation,
        http_url=http_url,
        port=settings.cluster_port,
        group=settings.cluster_group,
        interface=settings.cluster_interface,
        ttl=settings.cluster_ttl,
    )


class MulticastBus:
    """A `Bus` over the multicast link.

    Args:
      link: the link (not yet running: `run` runs it).
      secret: the cluster secret (the link's), which signs heal requests.
    """

    def __init__(self, link: ClusterLink, secret: bytes) -> None:
        self.link = link
        self._secret = secret

    @classmethod
    def from_config(cls, config: LinkConfig) -> MulticastBus:
        """The bus over a multicast socket.

        Raises:
          ConfigError: the secret or node id is unusable.
        """
        return cls(ClusterLink(config), config.secret)

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
        match await self.link.events.receive():
            case Delivered(origin=origin, payload=payload):
                return Payload(origin, payload)
            case LinkPeerUp(node=peer):
                return PeerUp(peer)
            case LinkPeerDown(node=peer, reason=reason):
                return PeerDown(peer, reason)
            case LinkGap(origin=origin, first_seq=first, last_seq=last):
                return Gap(origin, f"seq {first}-{last}")

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        """Ask the origin first, then the other live peers, over their HTTP API."""
        peers = [
            p
            for p in self.link.peers()
            if p.http_url and p.status in (PeerStatus.ALIVE, PeerStatus.SUSPECT)
        ]
        # The origin has everything it sent; any other peer has what it received.
        peers.sort(key=lambda p: p.node != origin)
        for peer in peers:
            url = f"{peer.http_url}/api/cluster/messages"
            limit_text = str(limit)
            signature = sign_heal_request(self._secret, origin, after, limit_text, time.time())
            params = {"origin": origin, "after": after, "limit": limit_text}
            try:
                with trio.fail_after(_HEAL_TIMEOUT):
                    async with httpx.AsyncClient() as client:
                        response = await client.get(
                            url, params=params, headers={HEAL_HEADER: signature}
                        )
                response.raise_for_status()
                return _messages_decoder.decode(response.content)
            except (httpx.HTTPError, trio.TooSlowError, msgspec.DecodeError) as exc:
                log.warning("healing from %s failed: %s", peer.node, exc)
        await trio.lowlevel.checkpoint()  # with no peer to ask, nothing else awaited
        return []

    def statistics(self) -> dict[str, int]:
        link = self.link.statistics()
        counts = dataclasses.asdict(link.link)
        counts.update(
            rcvbuf=link.rcvbuf,
            send_failures=link.send_failures,
            events_overflowed=link.events_overflowed,
        )
        return counts
