"""What every cluster engine needs from its peers' HTTP side: the secret and the heal fetch.

Both engines (`_multicast.MulticastBus`, `_redis.RedisBus`) sign heal requests with the
cluster secret and fetch missed messages from peers' ``/api/cluster/messages``; this is
the one copy of both.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Final

import httpx
import msgspec
import trio

from .._errors import ConfigError
from ._cluster import HEAL_HEADER, sign_heal_request
from ._identity import create_once
from ._store import Message

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from ..settings._settings import Settings

log = logging.getLogger("trio_chat.cluster")
# One line per heal request is noise; failures are logged here.
logging.getLogger("httpx").setLevel(logging.WARNING)

_HEAL_TIMEOUT: Final = 10.0
_messages_decoder: Final = msgspec.json.Decoder(list[Message])


def cluster_secret(settings: Settings, *, create: bool = True) -> bytes:
    """The cluster secret: set, read from the key file, or (host mode) made once.

    Args:
      settings: the node's settings.
      create: make the data directory's key if there is none; False for commands that
        only read (``trio-chat cluster``), which must not leave a data directory behind.

    Raises:
      ConfigError: the key file cannot be read, or holds too short a secret.
    """
    if settings.cluster_secret is not None:
        return settings.cluster_secret
    path = settings.cluster_key_file
    if path is None:
        path = settings.data_dir / "cluster.key"
        if not create and not path.exists():
            raise ConfigError(
                f"no cluster key in {path.resolve()}: no server has run with this data"
                " directory. Run this where the servers run, or set TRIO_CHAT_DATA_DIR"
                " (or TRIO_CHAT_CLUSTER_SECRET / TRIO_CHAT_CLUSTER_KEY_FILE) as they do"
            )
        if create:
            # Readable by the owner only: whoever reads it can join the cluster.
            create_once(path, secrets.token_urlsafe(32), 0o600)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster key file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"the cluster key in {path} is shorter than 16 bytes")
    return secret


async def fetch_from_peers(
    secret: bytes,
    peers: Iterable[tuple[str, str]],
    origin: str,
    after: str,
    limit: int,
    *,
    verify: ssl.SSLContext | bool = True,
) -> list[Message]:
    """Messages ``origin`` accepted after ``after``, from the first of ``peers`` that answers.

    ``peers`` are (node id, HTTP URL); the origin is asked first (it has everything it
    sent; any other peer has what it received). An empty list when none answered.
    ``verify`` checks a peer's https certificate (httpx's ``verify``; see
    `_multicast.peer_tls`).
    """
    ordered = sorted((p for p in peers if p[1]), key=lambda p: p[0] != origin)
    for node, http_url in ordered:
        url = f"{http_url}/api/cluster/messages"
        limit_text = str(limit)
        signature = sign_heal_request(secret, origin, after, limit_text, time.time())
        params = {"origin": origin, "after": after, "limit": limit_text}
        try:
            with trio.fail_after(_HEAL_TIMEOUT):
                async with httpx.AsyncClient(verify=verify) as client:
                    response = await client.get(
                        url, params=params, headers={HEAL_HEADER: signature}
                    )
            response.raise_for_status()
            return _messages_decoder.decode(response.content)
        except (httpx.HTTPError, trio.TooSlowError, msgspec.DecodeError) as exc:
            log.warning("healing from %s failed: %s", node, exc)
    await trio.lowlevel.checkpoint()  # with no peer to ask, nothing else awaited
    return []
