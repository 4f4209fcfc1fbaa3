"""Debian's nginx and HAProxy running deploy/'s own files, for the proxy tests.

The shipped files name example hosts (10.0.0.11 and 10.0.0.12, hypercorn on 8000 and the
chat socket on 8001), the public name chat.example.com, ports 80 and 443, and system
paths. `render_nginx` and `render_haproxy` replace exactly those (each must still be in
the file) and nothing else, so what runs is what we ship. `Proxy` runs one as a plain
process in a process group of its own (never the system service), with its pid, logs and
temporary files in the test's directory, on 127.0.0.1 or in a network namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx
import pytest
import trio

from _netns import entered
from _server_process import READY_TIMEOUT, log_tail

if TYPE_CHECKING:
    from collections.abc import Callable

    from test_tls import Cert

DEPLOY: Final = Path(__file__).resolve().parents[1] / "deploy"
#: The public name: the one the test certificate carries (test_tls.make_cert).
NAME: Final = "chat.test"
_EXAMPLE_NAME: Final = "chat.example.com"
_EXAMPLE_HOSTS: Final = ("10.0.0.11", "10.0.0.12")
_EXAMPLE_HTTP_PORT: Final = 8000
_EXAMPLE_WS_PORT: Final = 8001


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A trio-chat host as the proxy sees it: its address, hypercorn's port, the chat socket's."""

    address: str
    http_port: int
    ws_port: int


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is no longer in the shipped file: update tests/_proxies.py"
    return text.replace(old, new)


def _servers(
    text: str,
    line: Callable[[str], re.Pattern[str]],
    render: Callable[[int, Upstream, bool], str],
    upstreams: list[Upstream],
) -> str:
    """Replace each upstream block's example server lines by one line per upstream.

    ``line(host)`` matches a server line of an example host, with groups ``head``,
    ``port`` and ``tail``: the first host's lines become ours, the second's go.
    """
    first, second = (line(re.escape(host)) for host in _EXAMPLE_HOSTS)
    out: list[str] = []
    found = dropped = 0
    for text_line in text.splitlines():
        if match := first.fullmatch(text_line):
            found += 1
            ws = int(match["port"]) == _EXAMPLE_WS_PORT
            out += [
                match["head"] + render(i, u, ws) + match["tail"] for i, u in enumerate(upstreams)
            ]
        elif second.fullmatch(text_line):
            dropped += 1
        else:
            out.append(text_line)
    assert found == dropped == 2, f"expected 2 upstream blocks of 2 hosts: {found}, {dropped}"
    return "\n".join(out) + "\n"


def _port(upstream: Upstream, ws: bool) -> int:
    return upstream.ws_port if ws else upstream.http_port


def _finish(text: str) -> str:
    text = text.replace(_EXAMPLE_NAME, NAME)
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for leftover in (*_EXAMPLE_HOSTS, "example.com"):
        assert not any(leftover in line for line in settings), f"{leftover} left in the file"
    return text


def render_nginx(
    directory: Path, upstreams: list[Upstream], cert: Cert, https: str, http: str
) -> Path:
    """deploy/nginx.conf for these upstreams, listening on ``https`` and ``http``
    (nginx's ``listen`` syntax), and a main configuration around it, as Debian's
    /etc/nginx/nginx.conf includes it; returns the main configuration's path."""
    text = (DEPLOY / "nginx.conf").read_text()
    text = _replace(
        text, "/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(cert.certfile)
    )
    text = _replace(text, "/etc/letsencrypt/live/chat.example.com/privkey.pem", str(cert.keyfile))
    text = _replace(text, "/var/log/nginx/trio-chat.access.log", str(directory / "access.log"))
    text = _replace(text, "listen 443 ssl;", f"listen {https} ssl;")
    text = _replace(text, "listen 80;", f"listen {http};")
    text = _servers(
        text,
        lambda host: re.compile(rf"(?P<head>\s*server ){host}:(?P<port>\d+)(?P<tail> .*)"),
        lambda _, u, ws: f"{u.address}:{_port(u, ws)}",
        upstreams,
    )
    (directory / "trio-chat.conf").write_text(_finish(text))
    # Workers write temporary files here, which only this user may enter.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = directory / "nginx.conf"
    main.write_text(
        user
        + f"worker_processes 1;\npid {directory}/nginx.pid;\n"
        + f"error_log {directory}/error.log info;\n"
        + "events { worker_connections 512; }\nhttp {\n"
        + "".join(
            f"    {kind}_temp_path {directory}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {directory}/trio-chat.conf;\n}}\n"
    )
    return main


def render_haproxy(
    directory: Path, upstreams: list[Upstream], cert: Cert, https: str, http: str
) -> Path:
    """deploy/haproxy.cfg for these upstreams, binding ``https`` and ``http`` (HAProxy's
    ``bind`` syntax); returns its path. The upstreams share one hypercorn port (the
    chat socket backend checks it)."""
    (http_port,) = {u.http_port for u in upstreams}
    pem = directory / "haproxy.pem"
    pem.write_bytes(cert.certfile.read_bytes() + cert.keyfile.read_bytes())
    text = (DEPLOY / "haproxy.cfg").read_text()
    text = _replace(text, "/etc/haproxy/certs/chat.example.com.pem", str(pem))
    text = _replace(text, "bind :443 ", f"bind {https} ")
    text = _replace(text, "bind :80\n", f"bind {http}\n")
    text = _replace(text, f"check port {_EXAMPLE_HTTP_PORT} ", f"check port {http_port} ")
    text = _servers(
        text,
        lambda host: re.compile(rf"(?P<head>\s*server )host\d {host}:(?P<port>\d+)(?P<tail>)"),
        lambda i, u, ws: f"host{i + 1} {u.address}:{_port(u, ws)}",
        upstreams,
    )
    path = directory / "haproxy.cfg"
    path.write_text(_finish(text))
    return path


def proxy_unavailable(kind: str) -> str:
    """The path of Debian's ``kind`` (nginx or haproxy); skips the test (fails it under
    CI) when it is not installed."""
    found = shutil.which(kind, path="/usr/sbin:/usr/bin")
    if found is None:
        why = f"{kind} is not installed (apt-get install {kind}; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


class Proxy:
    """nginx or HAProxy on a rendered configuration, in ``netns`` (None: this namespace).

    Args:
      kind: ``nginx`` or ``haproxy``.
      directory: where its configuration, pid, logs and temporary files go.
      upstreams: the trio-chat hosts behind it.
      cert: its certificate, for `NAME`.
      https_port, http_port: its public ports; ``address``: where it listens.
    """

    def __init__(
        self,
        kind: str,
        directory: Path,
        upstreams: list[Upstream],
        cert: Cert,
        *,
        address: str = "127.0.0.1",
        https_port: int = 443,
        http_port: int = 80,
        netns: str | None = None,
    ) -> None:
        program = proxy_unavailable(kind)
        directory.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.directory = directory
        self.address = address
        self.https_port = https_port
        self.http_port = http_port
        self.netns = netns
        self.cert = cert
        https, http = f"{address}:{https_port}", f"{address}:{http_port}"
        if kind == "nginx":
            main = render_nginx(directory, upstreams, cert, https, http)
            self.args = [program, "-e", str(directory / "error.log"), "-c", str(main)]
            self.args += ["-g", "daemon off;"]
        else:
            self.args = [
                program,
                "-f",
                str(render_haproxy(directory, upstreams, cert, https, http)),
                "-db",
            ]
        self.log_path = directory / f"{kind}.out"
        self.proc: trio.Process | None = None

    @property
    def url(self) -> str:
        """The public https URL, by the name the page is loaded from."""
        return f"https://{NAME}" + ("" if self.https_port == 443 else f":{self.https_port}")

    async def start(self) -> None:
        """Start it and wait until it serves ``/healthz`` of some host through its TLS port."""
        args = self.args if self.netns is None else ["ip", "netns", "exec", self.netns, *self.args]
        with self.log_path.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with trio.move_on_after(READY_TIMEOUT):
            while (await self.get("/healthz")).status_code != 200:
                if self.proc.returncode is not None:
                    pytest.fail(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
                await trio.sleep(0.05)  # poll interval, bounded by READY_TIMEOUT
            return
        pytest.fail(f"{self.kind} not ready after {READY_TIMEOUT} s:\n{self.log()}")

    async def get(self, path: str, *, tls: bool = True) -> httpx.Response:
        """GET ``path`` through the proxy as a browser at `NAME` would (from its namespace).

        A response with status 0 when nothing answers.
        """
        scheme, port = ("https", self.https_port) if tls else ("http", self.http_port)
        url = f"{scheme}://{self.address}:{port}{path}"

        def get() -> httpx.Response:
            with entered(self.netns):
                try:
                    # The certificate names 127.0.0.1 too; Host says which site.
                    return httpx.get(
                        url, headers={"Host": NAME}, verify=self.cert.client_context(), timeout=2
                    )
                except httpx.TransportError:
                    return httpx.Response(0)

        return await trio.to_thread.run_sync(get)

    async def kill(self) -> None:
        """SIGKILL its process group (master and workers) and reap it; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with trio.move_on_after(5, shield=True):
            await proc.wait()

    def log(self) -> str:
        """Its own output and error log, for failure messages."""
        return "\n".join(log_tail(p) for p in (self.log_path, self.directory / "error.log"))

    def access_log(self) -> list[str]:
        """The request lines it logged (nginx: its access log; HAProxy: its output)."""
        path = self.directory / ("access.log" if self.kind == "nginx" else f"{self.kind}.out")
        return path.read_text(errors="replace").splitlines()
