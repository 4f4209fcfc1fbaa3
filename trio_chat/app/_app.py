"""The ASGI application: the page, the HTTP API, ``/ws``, and the node's lifetime.

`ChatApp` wraps the Quart-trio app. Its lifespan call runs for the server's whole life,
so the node lives in a nursery inside it: the chat socket, the hub and the commit task
start before the first request and stop after the last. If a node task fails, the
lifespan reports a failure and hypercorn stops the worker: it never runs on silently
without its socket or its store. Quart-trio's own lifespan (its nursery, background
tasks, serving hooks) is not used: nothing here runs outside a nursery we own.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from quart import Response, abort, jsonify, request, send_from_directory, websocket
from quart_trio import QuartTrio

from .._errors import ConfigError, ProtocolError, StoreError
from ..node._cluster import HEAL_HEADER, HEAL_PAGE
from ..node._identity import NodeIdentity, claim_identity
from ..node._multicast import MulticastBus, link_config, peer_tls
from ..node._node import Node, open_store
from ..node._peer_http import cluster_secret
from ..node._redis import RedisBus
from ..protocol._codes import CLOSE_INTERNAL_ERROR, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED
from ..protocol._hosts import bound_to_loopback, host_allowed, origin_allowed
from ..protocol._wire import ROOM_PATTERN
from ..server._asgi_transport import AsgiTransport
from ..server._auth import Tokens
from ..server._limits import RETRY_AFTER, raise_nofile_limit, refusal_body
from ..server._session import Session
from ..settings._settings import Settings
from ._api import add_server_api
from ._clients import resolve_scope, serve_logged_websocket
from ._hypercorn import install as install_hypercorn_boundary
from ._logs import configure_from as configure_logging_from
from ._logs import install as install_log_adoption
from ._logs import set_node as set_log_node
from ._metrics import render_metrics
from ._reads import add_room_reads

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..node._bus import Bus
    from ..node._store import Store

log = logging.getLogger("trio_chat.app")


def _web_dir() -> Path:
    """The page's files: ``TRIO_CHAT_WEB_DIR``, else the installed copy, else the checkout's.

    A wheel ships them as ``trio_chat/web/`` (pyproject.toml maps web/ there); a checkout
    (an editable install, ``make run``) serves web/ itself, so edits show at once.
    """
    override = os.environ.get("TRIO_CHAT_WEB_DIR", "")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    installed = package / "web"
    return installed if installed.is_dir() else package.parent / "web"


WEB_DIR: Final = _web_dir()

_Scope = dict[str, Any]
# After SIGTERM, how long a worker waits for hypercorn's shutdown: its graceful timeout
# for HTTP connections (3 s by default) plus room to start.
_SUPERVISOR_WAIT: Final = 10.0
# The longest request target (path and query, in bytes) answered; longer ones get 414.
# nginx's default header buffer; no URL of ours comes near it.
MAX_TARGET: Final = 8 * 1024
# No file under web/ has a name this long, and the file system refuses longer ones
# (ENAMETOOLONG: 255 bytes a component) with an error instead of "not found".
_MAX_FILE_NAME: Final = 255
# After the server's close on /ws, how long the client's answer is awaited (as on the
# chat socket).
_CLOSE_DRAIN: Final = 2.0

# Hypercorn's connection handler, behind our failure boundary (app/_hypercorn.py), and
# its loggers in our format (app/_logs.py): before any worker serves, whoever imports
# the app (trio-chat serve, plain hypercorn).
install_hypercorn_boundary()
install_log_adoption()


class ChatApp:
    """The ASGI callable hypercorn serves (``trio_chat:app``).

    Args:
      settings: the settings to run with; by default they are read from the environment
        when the server starts (so a bad value stops it with a clear message).
      take_sigterm: handle SIGTERM in this process (`_close_on_sigterm`); for the
        server's own worker processes, not for an app embedded in tests.
      store: the history engine to serve with, instead of the one the settings name
        (tests inject failing ones); the app closes it when it stops.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        take_sigterm: bool = False,
        store: Store | None = None,
    ) -> None:
        self._settings = settings
        self._take_sigterm = take_sigterm
        self._store = store
        self.node: Node | None = None
        self.quart = _make_quart(self)

    async def __call__(
        self,
        scope: _Scope,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        node = self.node
        if node is not None:
            resolve_scope(scope, node.proxies)
        if (refusal := self._refusal(scope)) is not None:
            await _send_refusal(scope, send, *refusal)
        elif node is not None and scope["type"] == "websocket":
            await serve_logged_websocket(self.quart, scope, receive, send, node.node_id)
        else:
            await self.quart(scope, receive, send)  # type: ignore[arg-type]

    def _refusal(self, scope: _Scope) -> tuple[int, str] | None:
        """What every HTTP request and ``/ws`` handshake passes before Quart sees it.

        Returns the status and text of a refusal, or None. A refusal is the client's
        mistake (or an attack): it is logged at DEBUG and counted in ``/metrics``.
        """
        settings = self._settings
        if settings is None:
            return 503, "starting\n"
        if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_TARGET:
            code, refusal = "uri_too_long", (414, "request target too long\n")
        else:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_allowed(host, settings):
                return None
            code, refusal = "bad_host", (400, "bad host\n")
        log.debug("refused a request from %s: %s", (scope.get("client") or ["?"])[0], code)
        if self.node is not None:
            self.node.count_error(code)
        return refusal

    async def _lifespan(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        await receive()  # lifespan.startup
        if not logging.getLogger().handlers:
            # Under plain hypercorn nothing has configured logging (trio-chat serve has).
            configure_logging_from(self._settings)
        identity: NodeIdentity | None = None
        store: Store | None = None
        try:
            settings = self._settings = self._settings or Settings.from_env()
            tls = settings.chat_socket_tls()
            if settings.auth == "jwt":
                # The node reads the key file again; a bad one is one line here, not a
                # traceback from inside the node.
                Tokens(settings)
            raise_nofile_limit()
            identity = claim_identity(settings.data_dir)
            set_log_node(identity.node_id)
            store = self._store if self._store is not None else open_store(settings)
            bus: Bus | None = None
            if settings.cluster == "redis" and settings.redis_url is not None:
                # Started even when Redis is unreachable: the node chats locally and
                # the bus connects with backoff, saying so in the log (no crash loop).
                bus = RedisBus(
                    settings.redis_url,
                    node_id=identity.node_id,
                    incarnation=identity.incarnation,
                    http_url=settings.http_url or "",
                    secret=cluster_secret(settings),
                    store=store,
                    state_dir=settings.data_dir / "node",
                    stream_max=settings.redis_stream_max,
                )
            elif settings.cluster != "off":
                link = link_config(
                    settings,
                    identity.node_id,
                    identity.incarnation,
                    secret=cluster_secret(settings),
                    http_url=settings.http_url or "",
                )
                bus = MulticastBus.from_config(link, peer_tls(settings))
        except Exception as exc:
            # Anything at all: an exception escaping the lifespan would make hypercorn
            # serve on without it (and without a node) instead of stopping the worker.
            if isinstance(exc, (ConfigError, OSError)):
                log.error("cannot start: %s", exc)
            else:
                log.critical("cannot start", exc_info=exc)
            if store is not None:
                store.close()
            if identity is not None:
                identity.release()
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        started = False
        try:
            async with trio.open_nursery() as nursery:
                node = Node(settings, identity.node_id, store, bus, tls)
                await nursery.start(node.run)
                if self._take_sigterm:
                    nursery.start_soon(_close_on_sigterm, node)
                self.node = node
                log.info(
                    "node %s ready; chat socket %s; data in %s",
                    node.node_id,
                    f"on port {node.chat_socket_port}" if node.chat_socket_port else "off",
                    settings.data_dir.resolve(),
                )
                if settings.allowed_hosts is None and not bound_to_loopback(settings):
                    log.info(
                        "answering any Host name: set TRIO_CHAT_ALLOWED_HOSTS to the names"
                        " clients use, so that DNS-rebinding pages are refused"
                    )
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
                await node.shutdown()
                nursery.cancel_scope.cancel()
            await send({"type": "lifespan.shutdown.complete"})
        except* Exception as group:
            log.critical("the chat node failed; stopping this worker", exc_info=group)
            kind = "shutdown" if started else "startup"
            # Hypercorn ends the worker on a lifespan failure; its supervisor restarts it.
            await send({"type": f"lifespan.{kind}.failed", "message": repr(group.exceptions[0])})
        finally:
            self.node = None
            store.close()
            identity.release()


async def _close_on_sigterm(node: Node) -> None:
    """Close every client with 1001 when this worker gets SIGTERM, then let it end.

    Hypercorn's supervisor handles SIGTERM, but its spawned workers keep the default
    action, so a signal to the whole process group (a service manager's usual stop)
    would kill a worker mid-write and its clients would see 1006. Here the worker
    closes its clients first. The supervisor's own shutdown then follows; if it does not
    (the signal was for this worker alone), the worker ends as SIGTERM would have.
    """
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("SIGTERM: closing every client with 1001")
            await node.shutdown()
            break
    await trio.sleep(_SUPERVISOR_WAIT)
    log.warning("no shutdown from hypercorn after SIGTERM: ending this worker")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


async def _send_refusal(
    scope: _Scope, send: Callable[[dict[str, Any]], Awaitable[None]], status: int, text: str
) -> None:
    """Answer a request, or refuse a WebSocket handshake, with a plain-text HTTP error."""
    kind = "http.response"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            # An ASGI server without the extension can only answer 403.
            await send({"type": "websocket.close"})
            return
        kind = "websocket.http.response"
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": f"{kind}.start", "status": status, "headers": headers})
    await send({"type": f"{kind}.body", "body": body})


class _ChatQuart(QuartTrio):
    """Quart-trio with the failure boundary of every HTTP request.

    Quart hands whatever escapes a view to `handle_exception`; its own version logs
    every traceback (a client that can trigger a bug could fill the disk) and answers
    with an HTML page. Here the exception is counted and logged by the node's
    `FailureBoundary` (rate-limited), and the client gets a short 500.
    """

    def __init__(self, chat: ChatApp) -> None:
        super().__init__(__name__, static_folder=None)
        self._chat = chat

    async def handle_exception(self, error: Exception) -> Response:
        if self._chat.node is not None:
            self._chat.node.failures.record("http", error, request.remote_addr or "?")
        else:
            log.error("an HTTP request failed while the node was down", exc_info=error)
        if request.path.startswith("/api/"):
            response = jsonify(code="internal_error", message="internal error")
            response.status_code = 500
            # Quart calls this, as it calls the routes: no caller of ours awaits it.
            return response  # noqa: ASYNC910
        return Response("internal error\n", 500, content_type="text/plain; charset=utf-8")  # noqa: ASYNC910


def _make_quart(chat: ChatApp) -> QuartTrio:
    quart = _ChatQuart(chat)

    def node() -> Node:
        if chat.node is None:
            abort(503)
        return chat.node

    @quart.get("/")
    async def index() -> Response:
        return await send_from_directory(WEB_DIR, "index.html")

    @quart.get("/<path:name>")
    async def static(name: str) -> Response:
        if len(name.encode()) > _MAX_FILE_NAME:
            abort(404)
        return await send_from_directory(WEB_DIR, name)

    @quart.get("/healthz")
    async def healthz() -> tuple[str, int]:
        if chat.node is None:
            return "starting\n", 503
        # Writes fail (disk full, I/O error): the node serves on, but refuses every send.
        if not chat.node.store_up:
            return "degraded: store\n", 503
        return "ok\n", 200

    @quart.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(node()), content_type="text/plain; version=0.0.4")

    @quart.get("/api/config")
    async def config() -> Response:
        n = node()
        return jsonify(
            ws_url=n.settings.chat_socket_url(request.host, n.chat_socket_port),
            fallback_ws_url="/ws",
            node=n.node_id,
            max_text=n.settings.max_text,
            room_pattern=ROOM_PATTERN,
            auth=n.settings.auth,
            token_url=n.settings.token_url,
        )

    @quart.get("/api/cluster/messages")
    async def cluster_messages() -> Response | tuple[str, int]:
        """Messages one node accepted, for a peer healing a gap (signed requests only)."""
        n = node()
        origin = request.args.get("origin", "")
        after = request.args.get("after", "")
        limit = request.args.get("limit", "")
        signature = request.headers.get(HEAL_HEADER, "")
        if n.cluster is None or not n.cluster.heal_requests.check_untrusted(
            origin, after, limit, signature, time.time()
        ):
            log.debug("refused an unsigned, stale or replayed heal request")
            return "a fresh signed request from a cluster peer is required\n", 403
        if not (
            len(limit) <= len(str(HEAL_PAGE))
            and limit.isascii()
            and limit.isdigit()
            and 1 <= int(limit) <= HEAL_PAGE
        ):
            return f"limit must be a whole number from 1 to {HEAL_PAGE}\n", 400
        try:
            found = await n.history.read_store(n.store.from_origin, origin, after, int(limit))
        except StoreError:
            # The peer asks another node, or heals later.
            return "this node's store is unavailable\n", 503
        return Response(msgspec.json.encode(found), content_type="application/json")

    @quart.websocket("/ws")
    async def ws() -> tuple[str, int] | tuple[str, int, dict[str, str]] | None:
        n = node()
        # The chat socket's caps, in the same counter: refused before any work is done.
        address = websocket.remote_addr or "?"
        refused = n.limits.admit(address)
        if refused is not None:
            n.count_error(refused)
            return refusal_body(refused), 503, {"Retry-After": str(RETRY_AFTER)}
        try:
            if not origin_allowed(
                websocket.headers.get("Origin"),
                websocket.host,
                n.settings.allowed_origins,
                secure=websocket.scheme == "wss",
            ):
                log.debug("refused /ws from origin %s", websocket.headers.get("Origin"))
                n.count_error("origin_refused")
                return "this origin may not open /ws\n", 403
            await websocket.accept()
            await _serve_fallback(n)
        finally:
            n.limits.release(address)
        return None

    add_room_reads(quart, node)
    add_server_api(quart, node)
    return quart


async def _serve_fallback(node: Node) -> None:
    """Run a session over hypercorn's WebSocket: the one-port path (slower)."""
    transport = AsgiTransport(websocket.remote_addr or "?", node.settings.backlog, node.count_slow)
    max_frame = node.settings.max_frame

    async def receive() -> list[str]:
        data = await websocket.receive()
        # Not ``isinstance(data, bytes)``: Quart-trio hands an empty binary message on as
        # None (``event.get("bytes") or event["text"]``).
        if not isinstance(data, str):
            raise ProtocolError(
                "binary_unsupported",
                "binary frames are not part of the protocol: send JSON text",
                close_code=CLOSE_UNSUPPORTED,
            )
        if len(data) > max_frame // 4 and len(data.encode()) > max_frame:
            raise ProtocolError(
                "too_big", f"messages are limited to {max_frame} bytes", close_code=CLOSE_TOO_BIG
            )
        return [data]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            transport.run_writer, websocket.send, websocket.close, nursery.cancel_scope
        )
        try:
            try:
                args = websocket.args
                session = Session(
                    node, transport, args.get("name"), args.get("client_id"), args.get("token")
                )
                node.register(session)
                await session.run(receive)
            except Exception as exc:
                # The failure boundary of one /ws client (DESIGN.md §4): a bug in serving
                # it closes this client only, with 1011, and is counted and logged
                # (rate-limited). Left to Quart, it would log every traceback and close
                # the client with 1000 as if all were well.
                node.failures.record("ws_fallback", exc, transport.remote)
                transport.close_nowait(CLOSE_INTERNAL_ERROR, "internal error")
            # The session closed the connection: let the writer send the close frame.
            with trio.move_on_after(node.settings.shutdown_grace, shield=True):
                await transport.done.wait()
        finally:
            nursery.cancel_scope.cancel()
    # The server closed: read on until the client's answer. Left unread, Quart-trio's and
    # hypercorn's queues (10 messages each) fill, hypercorn's reader blocks on them and
    # never sees the client's FIN, and the socket stays in CLOSE-WAIT for ever. The
    # disconnect ends this handler (Quart-trio cancels it); a client that never answers
    # is left after the bound.
    with trio.move_on_after(_CLOSE_DRAIN):
        while True:
            await websocket.receive()


app: Final = ChatApp(take_sigterm=True)
