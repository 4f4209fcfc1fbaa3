"""TLS on the chat socket: wss:// with a certificate made here, the page over https, failures.

The certificate is self-signed, for ``chat.test`` and 127.0.0.1; clients trust it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.config import Config
from hypercorn.trio import serve
from test_backpressure import RawClient, messages
from test_socket_intake import client_hello, open_raw, read_to_eof, start_bare, upgrade
from trio_websocket import open_websocket_url
from wsproto.events import AcceptConnection, Request

from trio_chat import ChatApp, Settings
from trio_chat._errors import ConfigError
from trio_chat.node._multicast import peer_tls
from trio_chat.server._boundary import FailureBoundary
from trio_chat.server._listener import HANDSHAKE_TIMEOUT

from _server_process import free_port, wait_healthy
from conftest import Server, eventually, make_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

SERVE = [str(Path(sys.executable).parent / "trio-chat"), "serve"]


@dataclasses.dataclass(frozen=True)
class Cert:
    certfile: Path
    keyfile: Path
    #: A key that is not the certificate's.
    other_keyfile: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate only."""
        return ssl.create_default_context(cafile=str(self.certfile))


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_cert(
    directory: Path, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
) -> tuple[Cert, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for chat.test and 127.0.0.1: self-signed (a CA), or by ``issuer``.

    The certificate file holds the chain: the certificate, then its issuer's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.test")])
    now = datetime.datetime.now(datetime.UTC)
    signer_cert, signer_key = issuer if issuer is not None else (None, key)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("chat.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(signer_key, hashes.SHA256())
    )
    found = Cert(directory / "cert.pem", directory / "key.pem", directory / "other-key.pem")
    chain = [certificate] + ([signer_cert] if signer_cert is not None else [])
    found.certfile.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    _write_key(key, found.keyfile)
    _write_key(ec.generate_private_key(ec.SECP256R1()), found.other_keyfile)
    return found, certificate, key


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))[0]


async def start_tls_server(nursery: trio.Nursery, tmp_path: Path, cert: Cert) -> Server:
    """hypercorn over https and the chat socket over wss://, both with ``cert``."""
    settings = make_settings(tmp_path, ws_certfile=cert.certfile, ws_keyfile=cert.keyfile)
    app = ChatApp(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1
    config.certfile = str(cert.certfile)
    config.keyfile = str(cert.keyfile)
    shutdown = trio.Event()
    binds = await nursery.start(
        functools.partial(serve, app, config, shutdown_trigger=shutdown.wait)
    )
    http_url = binds[0]
    assert http_url.startswith("https://")
    assert app.node is not None
    wss = f"wss://127.0.0.1:{app.node.chat_socket_port}/ws"
    return Server(app, http_url, wss, http_url.replace("https://", "wss://") + "/ws", shutdown)


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tmp_path: Path, cert: Cert) -> Server:
    return await start_tls_server(nursery, tmp_path, cert)


async def test_chat_socket_speaks_wss_and_config_says_so(
    tls_server: Server, cert: Cert, connect: Any
) -> None:
    context = cert.client_context()
    async with httpx.AsyncClient(base_url=tls_server.http_url, verify=context) as http:
        config = (await http.get("/api/config")).json()
    port = tls_server.node.chat_socket_port
    assert config["ws_url"] == f"wss://127.0.0.1:{port}/ws"
    url = config["ws_url"]
    async with (
        connect(url, "alice", ssl_context=context) as alice,
        connect(url, "bob", ssl_context=context) as bob,
    ):
        assert len(tls_server.node.chat_socket.connections) == 2
        await alice.join("tls")
        await bob.join("tls")
        # 24 KiB of messages, more than a TLS record holds: several records, in order.
        big = "x" * 3000
        for i in range(8):
            await alice.chat("tls", f"{i} {big}")
        for i in range(8):
            assert (await bob.next_of("message"))["text"] == f"{i} {big}"
        await bob.chat("tls", "hello over wss")
        assert (await alice.next_of("message"))["text"] == "hello over wss"
    async with connect(url, "carol", ssl_context=context) as carol:
        replay, _ = await carol.join("tls")
        assert [m["text"] for m in replay][-1] == "hello over wss"
        assert len(replay) == 9


async def test_plain_text_client_on_the_tls_port_is_cut(
    tls_server: Server, cert: Cert, connect: Any
) -> None:
    context = cert.client_context()
    url = tls_server.chat_socket_url
    async with (
        connect(url, "alice", ssl_context=context) as alice,
        connect(url, "bob", ssl_context=context) as bob,
    ):
        await alice.join("room")
        await bob.join("room")
        stream = await open_raw(tls_server.node.chat_socket_port)
        async with stream:
            with trio.fail_after(HANDSHAKE_TIMEOUT / 2):
                await stream.send_all(upgrade("127.0.0.1"))
                # Cut at once: closed with the request unread, so the kernel may reset.
                with contextlib.suppress(trio.BrokenResourceError):
                    assert b"HTTP" not in await read_to_eof(stream)
        assert tls_server.node.errors["tls_handshake"] == 1
        await eventually(lambda: len(tls_server.node.chat_socket.connections) == 2)
        await alice.chat("room", "still chatting")
        assert (await bob.next_of("message"))["text"] == "still chatting"
    assert not tls_server.node.failures.statistics().contained


async def test_stalled_tls_handshake_is_cut_at_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, cert: Cert
) -> None:
    failures = FailureBoundary()
    errors: list[str] = []
    settings = Settings(ws_certfile=cert.certfile, ws_keyfile=cert.keyfile)
    bare, port = await start_bare(nursery, failures, errors, settings.chat_socket_tls())
    context = cert.client_context()
    async with open_websocket_url(f"wss://127.0.0.1:{port}/ok", ssl_context=context) as other:
        stalled = [await open_raw(port) for _ in range(2)]
        start = trio.current_time()
        # One sends half a ClientHello, one sends nothing: both wait for more.
        await stalled[0].send_all(client_hello()[:40])
        await eventually(lambda: len(bare.connections) == 3)
        for stream in stalled:
            async with stream:
                assert await read_to_eof(stream) == b""
        assert trio.current_time() - start >= HANDSHAKE_TIMEOUT
        assert errors == ["handshake_timeout"] * 2
        await eventually(lambda: len(bare.connections) == 1)
        await other.send_message("still here")
        assert await other.get_message() == "still here"
    assert not failures.statistics().contained


class _TlsSocket:
    """A TLS stream with the two socket calls `RawClient` makes."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> int:
        await self.stream.send_all(data)
        return len(data)

    async def recv(self, size: int) -> bytes:
        try:
            return await self.stream.receive_some(size)
        except trio.BrokenResourceError:
            return b""

    def close(self) -> None:
        self.stream.transport_stream.socket.close()


async def tls_raw_client(url: str, name: str, cert: Cert, rcvbuf: int = 4096) -> RawClient:
    """`RawClient` (test_backpressure.py) over TLS: the test decides when bytes are read."""
    parts = urllib.parse.urlsplit(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SSLStream(
        trio.SocketStream(sock), cert.client_context(), server_hostname=parts.hostname
    )
    await stream.do_handshake()
    client = RawClient(_TlsSocket(stream))  # type: ignore[arg-type]
    await client._send(Request(host=parts.netloc, target=f"{parts.path}?name={name}"))
    while not any(isinstance(e, AcceptConnection) for e in await client._receive_events()):
        pass
    return client


async def test_partial_tls_writes_never_tear_a_frame_and_a_slow_reader_is_closed_4008(
    nursery: trio.Nursery, tmp_path: Path, cert: Cert
) -> None:
    settings = make_settings(
        tmp_path,
        rate_limit=0.0,
        backlog=64 * 1024,
        store="memory",
        ws_certfile=cert.certfile,
        ws_keyfile=cert.keyfile,
    )
    app = ChatApp(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1
    await nursery.start(functools.partial(serve, app, config, shutdown_trigger=trio.Event().wait))
    assert app.node is not None
    node = app.node
    url = f"wss://127.0.0.1:{node.chat_socket_port}/ws"
    slow = await tls_raw_client(url, "slow", cert, rcvbuf=2048)
    sipper = await tls_raw_client(url, "sipper", cert, rcvbuf=2048)
    publisher = await tls_raw_client(url, "publisher", cert)
    for client in (slow, sipper, publisher):
        await client.send(type="join", room="flood")
        await client.read_until(lambda c=client: c.count["joined"] > 0)
    count = 200
    async with trio.open_nursery() as inner:

        async def read_when_dropped() -> None:
            await eventually(lambda: node.chat_socket.statistics().slow_closes == 1)
            await slow.read_until(lambda: False)

        inner.start_soon(read_when_dropped)
        # The sipper reads a few hundred bytes at a time, often enough to stay within
        # its backlog; the slow client reads nothing until it is dropped.
        for start in range(0, count, 20):
            for i in range(start, start + 20):
                await publisher.send(type="send", room="flood", text=f"{i:06d} " + "x" * 2000)
            await sipper.read_until(lambda n=start + 20: sipper.count["message"] >= n, 300)
            await publisher.read_until(lambda n=start + 20: publisher.count["message"] >= n)
    assert [m["text"][:6] for m in messages(sipper)] == [f"{i:06d}" for i in range(count)]
    stats = node.chat_socket.statistics()
    assert stats.partial_writes > 0
    assert stats.slow_closes == 1
    # What the slow client got is whole frames (each decrypted and parsed), then 4008.
    assert slow.close_code == 4008
    assert 0 < len(messages(slow)) < count
    for client in (slow, sipper, publisher):
        client.close()
    assert not node.failures.statistics().contained


async def test_heal_requests_trust_exactly_this_nodes_certificate(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Host mode: workers heal from each other at https://127.0.0.1:…, a name a real
    certificate does not carry; they trust their own certificate, and not its issuer."""
    ca, ca_cert, ca_key = make_cert(tmp_path / "ca")
    leaf = make_cert(tmp_path / "leaf", (ca_cert, ca_key))[0]
    sibling = make_cert(tmp_path / "sibling", (ca_cert, ca_key))[0]
    server = await start_tls_server(nursery, tmp_path / "server", leaf)

    async def status(verify: ssl.SSLContext | bool) -> int:
        async with httpx.AsyncClient(verify=verify) as http:
            return (await http.get(server.http_url + "/healthz")).status_code

    assert await status(peer_tls(Settings(cluster="host", ws_certfile=leaf.certfile))) == 200
    for other in (sibling, ca):
        with pytest.raises(httpx.ConnectError):
            await status(peer_tls(Settings(cluster="host", ws_certfile=other.certfile)))
    # LAN peers: the usual checks (here: an unknown CA).
    lan = Settings(cluster="lan", ws_certfile=leaf.certfile)
    assert peer_tls(lan) is True
    with pytest.raises(httpx.ConnectError):
        await status(peer_tls(lan))


def test_a_bad_certificate_names_the_setting(cert: Cert, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"TRIO_CHAT_WS_CERTFILE=.*no such file"):
        Settings(ws_certfile=missing).chat_socket_tls()
    with pytest.raises(ConfigError, match=r"TRIO_CHAT_WS_KEYFILE=.*no such file"):
        Settings(ws_certfile=cert.certfile, ws_keyfile=missing).chat_socket_tls()
    with pytest.raises(ConfigError, match=r"TRIO_CHAT_WS_CERTFILE=.*matching key"):
        Settings(ws_certfile=cert.certfile, ws_keyfile=cert.other_keyfile).chat_socket_tls()
    with pytest.raises(ConfigError, match=r"TRIO_CHAT_WS_CERTFILE=.*matching key"):
        Settings(ws_certfile=cert.keyfile, ws_keyfile=cert.keyfile).chat_socket_tls()
    with pytest.raises(ConfigError, match="TRIO_CHAT_WS_KEYFILE is set without"):
        Settings.from_env({"TRIO_CHAT_WS_KEYFILE": str(cert.keyfile)})
    assert Settings().chat_socket_tls() is None
    settings = Settings(ws_certfile=cert.certfile, ws_keyfile=cert.keyfile)
    assert settings.chat_socket_url("chat.test:8443", 8001) == "wss://chat.test:8001/ws"


@pytest.mark.parametrize("which", ["missing", "mismatched"])
def test_serve_exits_2_on_a_bad_certificate(cert: Cert, tmp_path: Path, which: str) -> None:
    keyfile = cert.other_keyfile if which == "mismatched" else cert.keyfile
    certfile = tmp_path / "missing.pem" if which == "missing" else cert.certfile
    env = {**os.environ, "TRIO_CHAT_DATA_DIR": str(tmp_path / "data")}
    env.pop("TRIO_CHAT_WS_CERTFILE", None)
    done = subprocess.run(
        [*SERVE, "--certfile", str(certfile), "--keyfile", str(keyfile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "TRIO_CHAT_WS_CERTFILE" in done.stderr
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- the browser


@pytest.fixture
def public_url() -> str | None:
    """``TRIO_CHAT_WS_PUBLIC_URL`` for `https_serve` (``{ws_port}``: its chat socket port)."""
    return None


@pytest.fixture
def https_serve(cert: Cert, tmp_path: Path, public_url: str | None) -> Iterator[int]:
    """``trio-chat serve --certfile --keyfile`` on free ports; yields the page's port."""
    port, ws_port = free_port(), free_port()
    env = {
        **os.environ,
        "TRIO_CHAT_DATA_DIR": str(tmp_path / "data"),
        "TRIO_CHAT_CLUSTER": "off",
        "TRIO_CHAT_WS_BIND": f"127.0.0.1:{ws_port}",
        "TRIO_CHAT_ALLOWED_HOSTS": "chat.test,127.0.0.1",
    }
    if public_url is not None:
        env["TRIO_CHAT_WS_PUBLIC_URL"] = public_url.format(ws_port=ws_port)
    args = [*SERVE, "--bind", f"127.0.0.1:{port}"]
    args += ["--certfile", str(cert.certfile), "--keyfile", str(cert.keyfile)]
    log_path = tmp_path / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        context = cert.client_context()
        wait_healthy(proc, f"https://127.0.0.1:{port}", log_path, limit=20, verify=context)
        config = httpx.get(f"https://127.0.0.1:{port}/api/config", verify=context).json()
        if public_url is None:
            assert config["ws_url"] == f"wss://127.0.0.1:{ws_port}/ws"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@contextlib.contextmanager
def chromium_browser(netns: str | None = None, scratch: Path | None = None) -> Iterator[Any]:
    """Chromium with ``chat.test`` mapped to 127.0.0.1, run in network namespace ``netns``.

    A real host name: Chromium treats 127.0.0.1 as a secure context, which would hide a
    blocked ws:// (mixed content) from an https page. In a namespace, 127.0.0.1 is that
    namespace's: Playwright talks to Chromium over a pipe, which a wrapper script running
    it under ``ip netns exec`` (written to ``scratch``) passes on.
    """
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install it with `make browsers`")
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM
    if netns is not None:
        assert scratch is not None
        executable = scratch / "chromium-in-netns"
        executable.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
        executable.chmod(0o755)
    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP chat.test 127.0.0.1"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(executable), args=args)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """`chromium_browser` in a context that ignores https errors."""
    with chromium_browser() as browser:
        yield browser.new_context(ignore_https_errors=True)


@pytest.mark.slow
def test_https_page_chats_over_the_wss_chat_socket(https_serve: int) -> None:
    from playwright.sync_api import expect
    from test_browser import message_with, say, wait_online

    port = https_serve
    with chromium() as context:
        sockets: list[str] = []
        pages = []
        errors: list[str] = []
        for name in ("alice", "bob"):
            page = context.new_page()
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"https://chat.test:{port}/?name={name}#general")
            # "chat": the chat socket, not the /ws fallback.
            wait_online(page, "chat")
            pages.append(page)
        alice, bob = pages
        say(alice, "hello over wss")
        expect(message_with(bob, "hello over wss")).to_have_count(1)
        assert len(sockets) == 2, sockets
        assert all(url.startswith("wss://chat.test:") for url in sockets), sockets
        assert not any(f":{port}/" in url for url in sockets), sockets
        assert not errors


@pytest.mark.slow
@pytest.mark.parametrize(
    "public_url",
    [
        # A plain chat socket named to an https page: mixed content, never offered.
        "ws://chat.test:{ws_port}/ws",
        # A URL `new WebSocket` refuses (a fragment): it throws, as it does with a
        # SecurityError, and the page must go on to /ws.
        "wss://chat.test:{ws_port}/ws#fragment",
    ],
)
def test_https_page_falls_back_to_ws_when_the_chat_socket_cannot_be_opened(
    https_serve: int,
) -> None:
    from test_browser import wait_online

    port = https_serve
    with chromium() as context:
        sockets: list[str] = []
        errors: list[str] = []
        page = context.new_page()
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"https://chat.test:{port}/?name=alice#general")
        wait_online(page, "fallback")
        # One socket, to /ws on the page's own origin: the chat socket's never opened.
        assert len(sockets) == 1, sockets
        assert sockets[0].startswith(f"wss://chat.test:{port}/ws?"), sockets
        assert not errors
