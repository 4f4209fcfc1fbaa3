"""The Redis engine over ``rediss://`` with a real TLS ``redis-server``.

redis-server listens with TLS on one free port (its plain port answers the fixture's
readiness check only), with a certificate for chat.test and 127.0.0.1 that a CA of the
test signed (tests/test_tls.py's `make_cert`). Nodes point at the CA with the URL's
``ssl_ca_certs``; a wrong CA, or a name the certificate does not cover, is refused with a
log line naming TRIO_CHAT_REDIS_URL while local chat goes on.
"""

from __future__ import annotations

import io
import subprocess
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from test_cluster_redis import (
    SECRET,
    ChatNode,
    RedisServer,
    acked,
    all_up,
    join,
    redis_metric,
    refused,
    say,
    start_chat_node,
    texts,
)
from test_session import open_session
from test_tls import make_cert

from trio_chat._errors import ConfigError
from trio_chat.node._redis import RedisBus
from trio_chat.node._redis_diag import run_redis_check
from trio_chat.node._redis_tls import tls_context
from trio_chat.node._store import MemoryStore

from _server_process import free_port
from conftest import eventually

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from test_tls import Cert


def _tls_capable() -> bool:
    shown = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return "v=" in shown and int(shown.split("v=")[1].split(".")[0]) >= 6


pytestmark = pytest.mark.skipif(
    not _tls_capable(), reason="needs Debian's redis-server 6 or later (TLS)"
)


class TlsRedis(RedisServer):
    """A redis-server that speaks TLS on `tls_port`, with ``cert`` (a CA's own)."""

    def __init__(self, folder: Path, cert: Cert) -> None:
        super().__init__(folder, aof=False)
        self.tls_port = free_port()
        self.options = [
            "--tls-port",
            str(self.tls_port),
            "--tls-cert-file",
            str(cert.certfile),
            "--tls-key-file",
            str(cert.keyfile),
            "--tls-ca-cert-file",
            str(cert.certfile),
            # Clients prove nothing: the password (none here) is Redis's client check.
            "--tls-auth-clients",
            "no",
        ]

    def tls_url(self, ca: Path, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.tls_port}/0?ssl_ca_certs={ca}"


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Cert, Cert]:
    """Redis's certificate (self-signed: its own CA), and an unrelated CA's."""
    return make_cert(tmp_path / "redis-ca")[0], make_cert(tmp_path / "other-ca")[0]


@pytest.fixture
def tls_redis(tmp_path: Path, certs: tuple[Cert, Cert]) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path, certs[0])
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_two_nodes_chat_through_rediss(
    tls_redis: TlsRedis, certs: tuple[Cert, Cert], tmp_path: Path
) -> None:
    url = tls_redis.tls_url(certs[0].certfile)
    cluster: dict[str, ChatNode] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = [await start_chat_node(nursery, url, cluster, tmp_path, n) for n in "ab"]
            await all_up([a, b])
            _, alice_rec, alice = await a.client("alice")
            _, bob_rec, bob = await b.client("bob")
            await join(alice, alice_rec)
            await join(bob, bob_rec)
            await say(alice, "over tls")
            await eventually(lambda: texts(bob_rec) == ["over tls"])
            await say(bob, "and back")
            await eventually(lambda: texts(alice_rec) == ["over tls", "and back"])
            assert a.bus.statistics()["redis_connected"] == 1
            nursery.cancel_scope.cancel()
    out = io.StringIO()
    assert await run_redis_check(url, out) == 1
    assert "connected; stream" in out.getvalue()


async def test_a_wrong_ca_is_a_clear_error_and_local_chat_goes_on(
    nursery: trio.Nursery,
    tls_redis: TlsRedis,
    certs: tuple[Cert, Cert],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = tls_redis.tls_url(certs[1].certfile)
    server, line = await refused(nursery, tmp_path, url, caplog, "failed the check")
    assert "ssl_ca_certs=FILE" in line
    # Retried every 10 s, not in a loop, and the server chats on.
    assert not [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert await redis_metric(server, "connected") == 0
    async with httpx.AsyncClient() as client:
        assert (await client.get(server.http_url + "/healthz")).status_code == 200
    node = server.node
    assert node is not None
    _, rec, send = await open_session(nursery, node, "alice")
    await join(send, rec)
    await say(send, "local only")
    await eventually(lambda: "local only" in acked(rec))
    out = io.StringIO()
    assert await run_redis_check(url, out) == 2
    assert "TLS certificate failed the check" in out.getvalue()
    assert "ssl_ca_certs" in out.getvalue()


async def test_a_certificate_for_another_name_is_refused(
    tls_redis: TlsRedis, certs: tuple[Cert, Cert]
) -> None:
    # The right CA, but the certificate names chat.test and 127.0.0.1, not localhost:
    # coredis alone would let this through.
    out = io.StringIO()
    assert await run_redis_check(tls_redis.tls_url(certs[0].certfile, "localhost"), out) == 2
    assert "localhost" in out.getvalue()
    assert "failed the check" in out.getvalue()
    out = io.StringIO()
    assert await run_redis_check(tls_redis.tls_url(certs[0].certfile, "127.0.0.1"), out) == 1


def test_a_missing_ca_file_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    url = f"rediss://:pw@127.0.0.1:6380/0?ssl_ca_certs={tmp_path / 'none.pem'}"
    with pytest.raises(ConfigError, match=r"^TRIO_CHAT_REDIS_URL: cannot load the TLS files"):
        tls_context(url)
    with pytest.raises(ConfigError, match=r"^TRIO_CHAT_REDIS_URL"):
        RedisBus(
            url,
            node_id="n",
            incarnation=1,
            http_url="",
            secret=SECRET,
            store=MemoryStore(),
            state_dir=tmp_path,
            stream_max=10,
        )
    assert tls_context("redis://127.0.0.1:6379/0") is None
