"""The page in jwt mode, in a real browser (docs/auth.md, "The page in jwt mode").

The server is a real ``hypercorn trio_chat:app`` subprocess with ``TRIO_CHAT_AUTH=jwt``.
Its ``TRIO_CHAT_TOKEN_URL`` is served by `TokenApp`, a tiny stand-in for the app's backend
on another port, so another origin: it knows its user by a cookie and answers the page's
credentialed fetch with the CORS headers a real backend must send. Fixtures and helpers
come from test_browser.py; nothing sleeps: ``expect`` and Playwright's waits poll with a
deadline, and the page's timers run on ``page.clock`` where their timing is the point.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from test_browser import (
    STEP_TIMEOUT_MS,
    _make_server,
    browser,  # noqa: F401 (a fixture)
    message_with,
    messages,
    say,
    shot,
    transport,  # noqa: F401 (a fixture)
    wait_online,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from playwright.sync_api import Browser, BrowserContext, Page, WebSocket, WebSocketRoute

    from _server_process import ServerProcess

pytestmark = pytest.mark.slow

KEY = "browser-test-jwt-secret-of-32-bytes+"
API_KEY = "browser-test-api-key"
#: The app's users, by the cookie its login would set; bob is an admin.
USERS: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice"},
    "bob": {"name": "Bob", "admin": True},
}


def mint(sub: str, ttl: float, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(payload, KEY, algorithm="HS256")


class TokenApp:
    """The app's token endpoint: ``GET /chat-token`` answers ``{"token"}`` for the user
    its ``session`` cookie names (401 without one), with CORS for the page's origin only.

    Attributes:
      origin: the page's origin, allowed to read the answers with credentials.
      ttl: the lifetime of the tokens it signs, in seconds.
      served: (user, Origin header) per token signed, in order.
    """

    def __init__(self) -> None:
        self.origin = ""
        self.ttl = 600.0
        self.served: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cookie = SimpleCookie(self.headers.get("Cookie", ""))
                user = cookie["session"].value if "session" in cookie else ""
                origin = self.headers.get("Origin", "")
                if self.path != "/chat-token" or user not in USERS:
                    self._answer(401, {"error": "not signed in"}, origin)
                    return
                with app._lock:
                    app.served.append((user, origin))
                    ttl = app.ttl
                self._answer(200, {"token": mint(user, ttl, **USERS[user])}, origin)

            def _answer(self, status: int, body: dict[str, str], origin: str) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Vary", "Origin")
                # Credentialed CORS: the one origin by name (never "*"), and say so.
                if origin == app.origin:
                    self.send_header("Access-Control-Allow-Origin", origin)
                    self.send_header("Access-Control-Allow-Credentials", "true")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the tests read `served`, not a log

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/chat-token"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def tokens_for(self, user: str) -> int:
        with self._lock:
            return sum(1 for u, _ in self.served if u == user)

    def __enter__(self) -> TokenApp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def token_app() -> Iterator[TokenApp]:
    with TokenApp() as app:
        yield app


@pytest.fixture
def jwt_server(tmp_path: Path, token_app: TokenApp) -> Iterator[ServerProcess]:
    env = {
        "TRIO_CHAT_AUTH": "jwt",
        "TRIO_CHAT_JWT_KEY": KEY,
        "TRIO_CHAT_TOKEN_URL": token_app.url,
        "TRIO_CHAT_PUBLIC_ROOMS": "general",
        "TRIO_CHAT_API_KEY": API_KEY,
    }
    for srv in _make_server(tmp_path, **env):
        token_app.origin = srv.http_url
        yield srv


@pytest.fixture
def fragment_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """jwt mode without a token URL: the page reads ``#token=``."""
    env = {"TRIO_CHAT_AUTH": "jwt", "TRIO_CHAT_JWT_KEY": KEY, "TRIO_CHAT_PUBLIC_ROOMS": "general"}
    yield from _make_server(tmp_path, **env)


class Browsers:
    """Fresh contexts (one user each), closed at the end; any page error fails the test."""

    def __init__(self, chromium: Browser) -> None:
        self.browser = chromium
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []

    def context(self, user: str | None = None) -> BrowserContext:
        ctx = self.browser.new_context(viewport={"width": 1100, "height": 700})
        ctx.set_default_timeout(STEP_TIMEOUT_MS)
        self.contexts.append(ctx)
        if user is not None:
            # The app's login cookie: host-only on 127.0.0.1, so sent to the token app's
            # port too (cookies do not care about ports; CORS does).
            ctx.add_cookies([{"name": "session", "value": user, "url": "http://127.0.0.1/"}])
        return ctx

    def page(self, ctx: BrowserContext, label: str) -> Page:
        page = ctx.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{label}: {exc}"))
        return page


@pytest.fixture
def browsers(browser: Browser) -> Iterator[Browsers]:  # noqa: F811 (the imported fixture)
    b = Browsers(browser)
    try:
        yield b
    finally:
        for ctx in b.contexts:
            ctx.close()
    assert not b.errors, b.errors


def _q(transport: str) -> str:  # noqa: F811 (the imported fixture's name)
    return "?transport=fallback" if transport == "fallback" else ""


def open_as(
    browsers: Browsers,
    server: ServerProcess,
    user: str,
    transport: str,  # noqa: F811
) -> Page:
    page = browsers.page(browsers.context(user), user)
    page.goto(f"{server.http_url}/{_q(transport)}#general")
    wait_online(page, transport)
    return page


def pause_clock(page: Page) -> None:
    """Stop the page's installed clock (a second ahead of now: its time runs on while
    we ask), so that its timers fire only when the test steps it."""
    page.clock.pause_at(page.evaluate("Date.now()") / 1000 + 1)  # seconds, not ms


def sent_frames(page: Page) -> tuple[list[WebSocket], list[dict[str, Any]]]:
    """The page's WebSockets, and every JSON object it sends on them, from its first
    frame on (the handlers are attached when a socket is created)."""
    sockets: list[WebSocket] = []
    sent: list[dict[str, Any]] = []

    def record(payload: str | bytes) -> None:
        sent.append(json.loads(payload))

    def opened(ws: WebSocket) -> None:
        sockets.append(ws)
        ws.on("framesent", record)

    page.on("websocket", opened)
    return sockets, sent


def _refreshed(payload: str | bytes) -> bool:
    return '"refreshed"' in (payload if isinstance(payload, str) else payload.decode())


# --------------------------------------------------------------------------- scenarios


def test_signed_in_users_chat_and_an_admin_deletes(
    jwt_server: ServerProcess,
    token_app: TokenApp,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    from playwright.sync_api import expect

    alice = open_as(browsers, jwt_server, "alice", transport)
    bob = open_as(browsers, jwt_server, "bob", transport)
    # Names come from the tokens: no prompt, nothing to rename.
    for page, name in ((alice, "Alice"), (bob, "Bob")):
        expect(page.locator("#me-name")).to_have_text(name)
        expect(page.locator("#rename")).to_be_hidden()
        expect(page.locator("#name-dialog")).not_to_be_visible()
    expect(alice.locator("#member-list li")).to_have_text(["Alice (you)", "Bob"])
    # Each page fetched its token from the other origin, with its user's cookie.
    assert token_app.served == [("alice", jwt_server.http_url), ("bob", jwt_server.http_url)]

    say(alice, "hello from alice")
    say(alice, "second from alice")
    on_bob = message_with(bob, "hello from alice")
    expect(on_bob.locator(".from")).to_have_text("Alice")
    expect(message_with(alice, "hello from alice")).to_have_class(re.compile(r"\bmine\b"))
    expect(message_with(bob, "second from alice")).to_have_count(1)
    # Only the admin is offered "delete".
    expect(alice.locator(".log .delete")).to_have_count(0)
    expect(bob.locator(".log .delete")).to_have_count(2)
    shot(bob, "jwt-admin", transport)

    on_bob.get_by_role("button", name="Delete this message from Alice").click()
    for page in (alice, bob):
        gone = message_with(page, "message deleted")
        expect(gone).to_have_class(re.compile(r"\bdeleted\b"))
        expect(message_with(page, "hello from alice")).to_have_count(0)
        expect(message_with(page, "second from alice")).to_have_count(1)
        expect(messages(page)).to_have_count(2)
    expect(bob.locator(".log .delete")).to_have_count(1)


def test_the_page_refreshes_its_token_before_it_expires(
    jwt_server: ServerProcess,
    token_app: TokenApp,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    """A 30-second token is refreshed at 80% of its life (24 s), again and again, on the
    same socket. The page's clock is stepped; the tokens are real ones."""
    from playwright.sync_api import expect

    token_app.ttl = 30
    page = browsers.page(browsers.context("alice"), "alice")
    sockets, sent = sent_frames(page)
    page.clock.install()
    page.goto(f"{jwt_server.http_url}/{_q(transport)}#general")
    wait_online(page, transport)
    # From here the page's timers wait for the test: each step is exact.
    pause_clock(page)
    assert token_app.tokens_for("alice") == 1
    page.clock.run_for(20_000)  # not yet: 80% of 30 s is 24 s
    assert token_app.tokens_for("alice") == 1
    for n, step in ((2, 5_000), (3, 25_000)):
        with sockets[0].expect_event("framereceived", predicate=_refreshed):
            page.clock.run_for(step)
        assert token_app.tokens_for("alice") == n
        refreshes = [f for f in sent if f["type"] == "refresh"]
        assert len(refreshes) == n - 1
        assert jwt.decode(refreshes[-1]["token"], KEY, algorithms=["HS256"])["sub"] == "alice"
    hellos = [f["token"] for f in sent if f["type"] == "hello"]
    assert len(hellos) == 1  # one connection all along
    page.clock.resume()
    say(page, "still here")
    expect(message_with(page, "still here")).not_to_have_class(re.compile(r"\bpending\b"))
    expect(page.locator("#status")).to_have_attribute("data-state", "online")
    assert len(sockets) == 1


def test_after_4002_the_page_signs_in_again_and_resumes(
    jwt_server: ServerProcess,
    token_app: TokenApp,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    """Closed with 4002 (the token expired): the sentence, then a new token from the
    token URL, a new connection, and what was said meanwhile exactly once."""
    from playwright.sync_api import expect

    routes: list[WebSocketRoute] = []
    servers: list[WebSocketRoute] = []

    def route(ws: WebSocketRoute) -> None:
        routes.append(ws)
        servers.append(ws.connect_to_server())

    page = browsers.page(browsers.context("alice"), "alice")
    page.route_web_socket("**/ws?*", route)
    page.clock.install()
    page.goto(f"{jwt_server.http_url}/{_q(transport)}#general")
    wait_online(page, transport)
    bob = open_as(browsers, jwt_server, "bob", transport)
    say(bob, "before")
    expect(message_with(page, "before")).to_have_count(1)
    # From here the page's timers wait for the test: the reconnect comes after bob spoke.
    pause_clock(page)

    routes[0].close(code=4002, reason="token expired")
    servers[0].close(code=1000, reason="")
    expect(page.locator("#why")).to_have_text("Your sign-in expired; signing in again.")
    say(bob, "while alice was away")
    expect(message_with(bob, "while alice was away")).not_to_have_class(re.compile(r"pending"))
    assert token_app.tokens_for("alice") == 1
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    while len(routes) == 1 and time.monotonic() < deadline:
        page.clock.run_for(100)
    page.clock.resume()
    wait_online(page, transport)
    assert token_app.tokens_for("alice") == 2
    expect(message_with(page, "while alice was away")).to_have_count(1)
    expect(messages(page)).to_have_count(2)


def test_a_fragment_token_leaves_the_url_and_survives_a_reload(
    fragment_server: ServerProcess,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    """Without a token URL the page takes ``#token=`` (beside the room, or alone), keeps
    it in the tab, and never sends it to the HTTP server."""
    from playwright.sync_api import expect

    token = mint("carol", 600, name="Carol", rooms=["lobby"])
    page = browsers.page(browsers.context(), "carol")
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(f"{fragment_server.http_url}/{_q(transport)}#lobby&token={token}")
    expect(page.locator("#room-title")).to_contain_text("lobby")
    wait_online(page, transport)
    expect(page.locator("#me-name")).to_have_text("Carol")
    assert page.url.endswith("#lobby"), page.url
    stored = page.evaluate("sessionStorage.getItem('trio-chat.token')")
    assert json.loads(stored) == token
    page.reload()
    wait_online(page, transport)
    expect(page.locator("#me-name")).to_have_text("Carol")
    assert not [u for u in requested if token in u], requested
    assert token not in page.url

    # Alone in the fragment: the page opens its default room.
    alone = browsers.page(browsers.context(), "carol-2")
    alone.goto(f"{fragment_server.http_url}/{_q(transport)}#token={token}")
    wait_online(alone, transport)
    expect(alone.locator("#me-name")).to_have_text("Carol")
    assert alone.url.endswith("#general"), alone.url


def test_a_refused_token_is_explained_and_not_retried(
    fragment_server: ServerProcess,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    """An expired token gets 4001: the page says so and waits for "retry now" instead
    of reconnecting in a loop; a new fragment token gets it in."""
    from playwright.sync_api import expect

    expired = mint("carol", -120, name="Carol")  # past the server's 30 s of leeway
    page = browsers.page(browsers.context(), "carol")
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    page.clock.install()
    page.goto(f"{fragment_server.http_url}/{_q(transport)}#general&token={expired}")
    why = "The server did not accept your sign-in token (missing, expired or not valid)."
    expect(page.locator("#why")).to_have_text(why)
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#retry-now")).to_be_visible()
    page.clock.run_for(120_000)  # far past any backoff
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    assert len(sockets) == 1

    page.evaluate(f"location.hash = 'general&token={mint('carol', 600, name='Carol')}'")
    wait_online(page, transport)
    expect(page.locator("#me-name")).to_have_text("Carol")
    assert page.url.endswith("#general"), page.url
    assert len(sockets) == 2


def test_disconnected_by_the_app_the_page_waits_for_retry_now(
    jwt_server: ServerProcess,
    token_app: TokenApp,
    browsers: Browsers,
    transport: str,  # noqa: F811 (the imported fixture)
) -> None:
    """The server API closes alice's connection with 4003: the page says so and stays
    disconnected (the app decided) until "retry now", which signs in with a new token."""
    import httpx
    from playwright.sync_api import expect

    page = browsers.page(browsers.context("alice"), "alice")
    sockets, _ = sent_frames(page)
    page.clock.install()
    page.goto(f"{jwt_server.http_url}/{_q(transport)}#general")
    wait_online(page, transport)
    answer = httpx.post(
        f"{jwt_server.http_url}/api/users/alice/disconnect",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert answer.json() == {"closed": 1}, answer.text
    expect(page.locator("#why")).to_have_text("The server disconnected you.")
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    page.clock.run_for(120_000)  # far past any backoff
    assert len(sockets) == 1
    assert token_app.tokens_for("alice") == 1

    page.locator("#retry-now").click()
    wait_online(page, transport)
    assert len(sockets) == 2
    assert token_app.tokens_for("alice") == 2
