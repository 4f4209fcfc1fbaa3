"""``trio-chat cluster`` in Redis mode: the connection, the stream and the live nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import coredis
import coredis.exceptions
import msgspec
import trio

from .._errors import ConfigError
from ..settings._kinds import redact_url
from ._redis import PREFIX, key_value
from ._redis_tls import certificate_failure, leaf_error, redis_client, tls_context

if TYPE_CHECKING:
    import ssl
    from typing import TextIO


async def run_redis_check(url: str, out: TextIO) -> int:
    """Connect to the cluster's Redis and report what is there.

    Returns:
        0 if some node is live, 1 if Redis answers but no node is, 2 if Redis cannot be
        reached, refuses the credentials of TRIO_CHAT_REDIS_URL, or fails its TLS check.
    """
    shown = redact_url(url)
    out.write(f"Redis at {shown} (TRIO_CHAT_REDIS_URL)\n")
    try:
        with trio.fail_after(10):
            return await _report(url, tls_context(url), out)
    except* ConfigError as group:
        out.write(f"  {group.exceptions[0]}\n")
    except* coredis.exceptions.AuthenticationError as group:
        out.write(f"  refused the credentials in TRIO_CHAT_REDIS_URL: {group.exceptions[0]}\n")
    except* (coredis.exceptions.RedisError, OSError, trio.TooSlowError) as group:
        error = leaf_error(group)
        untrusted = certificate_failure(error)
        if untrusted is not None:
            out.write(
                f"  its TLS certificate failed the check ({untrusted.verify_message}): name the"
                " CA that signed it in TRIO_CHAT_REDIS_URL, ?ssl_ca_certs=FILE\n"
            )
        else:
            out.write(f"  unreachable: {error or type(error).__name__}\n")
    await trio.lowlevel.checkpoint()
    return 2


async def _report(url: str, tls: ssl.SSLContext | None, out: TextIO) -> int:
    client = redis_client(url, tls)
    async with client:
        await client.ping()
        stream = f"{PREFIX}:messages"
        length = await client.xlen(stream)
        newest = await client.xrevrange(stream, "+", "-", count=1)
        oldest = await client.xrange(stream, "-", "+", count=1)
        out.write(f"  connected; stream {stream}: {length} entries")
        if newest and oldest:
            out.write(f", {_text(oldest[0].identifier)} to {_text(newest[0].identifier)}")
        out.write("\n")
        prefix = f"{PREFIX}:node:"
        keys = sorted([k async for k in client.scan_iter(match=prefix + "*", count=1000)])
        live = 0
        for key in keys:
            raw = await client.get(key)
            ttl = await client.pttl(key)
            if raw is None:
                continue
            try:
                incarnation, http_url = key_value.decode(raw)
            except msgspec.DecodeError:
                out.write(f"  {_text(key)}: malformed\n")
                continue
            live += 1
            node = _text(key)[len(prefix) :]
            out.write(
                f"  node {node}: incarnation {incarnation}, HTTP {http_url or '(none)'},"
                f" key expires in {ttl / 1000:.1f} s\n"
            )
    if not live:
        out.write("  no live node: none is running with TRIO_CHAT_CLUSTER=redis on this Redis\n")
    return 0 if live else 1


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()
