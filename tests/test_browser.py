"""The page in a real browser: Debian's Chromium driven by Playwright (sync API).

The server is a real ``hypercorn trio_chat:app`` subprocess on free 127.0.0.1 ports. Every
scenario runs twice: over the chat socket (the port named by /api/config) and over the
``/ws`` fallback on hypercorn's own port (``?transport=fallback``). Screenshots go to
``test-output/``. Nothing sleeps to wait: Playwright's ``expect`` polls with a deadline.

Without /usr/bin/chromium these tests skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from trio_websocket import open_websocket_url

from _server_process import ServerProcess, free_port
from conftest import fill

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, Page, WebSocketRoute

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
#: Upper bound for any single wait in the page (Playwright actions and expectations).
STEP_TIMEOUT_MS = 15_000


# --------------------------------------------------------------------------- server process


def _make_server(tmp_path: Path, **env: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "data", tmp_path / "server.log", env=env, limit_rate=True)
    trio.run(srv.start)
    try:
        yield srv
    finally:
        trio.run(srv.stop)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from _make_server(tmp_path)


@pytest.fixture
def unlimited_server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from _make_server(tmp_path, TRIO_CHAT_RATE_LIMIT="0")


@pytest.fixture
def server_with_dead_chat_socket(tmp_path: Path) -> Iterator[ServerProcess]:
    """/api/config names a chat socket nobody listens on (a proxy that drops it, say)."""
    yield from _make_server(tmp_path, TRIO_CHAT_WS_PUBLIC_URL=f"ws://127.0.0.1:{free_port()}/ws")


def send_as(url: str, name: str, room: str, texts: list[str]) -> None:
    """Send ``texts`` to ``room`` from a trio-websocket client, waiting for every ack."""

    async def main() -> None:
        with trio.fail_after(20):
            async with open_websocket_url(f"{url}?name={name}") as ws:
                await ws.send_message(json.dumps({"type": "join", "room": room}))
                for i, text in enumerate(texts):
                    frame = {"type": "send", "room": room, "text": text, "cid": f"{name}-{i}"}
                    await ws.send_message(json.dumps(frame))
                waiting = {f"{name}-{i}" for i in range(len(texts))}
                while waiting:
                    for line in str(await ws.get_message()).split("\n"):
                        event = json.loads(line)
                        assert event["type"] != "error", event
                        if event["type"] == "ack":
                            waiting.discard(event["cid"])

    trio.run(main)


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} not found: install it with `make browsers` (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(params=["chat", "fallback"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Pages:
    """Opens pages in fresh browser contexts (one user each) and closes them at the end."""

    def __init__(self, browser: Browser, transport: str) -> None:
        self.browser = browser
        self.transport = transport
        self.contexts: list[Any] = []
        self.errors: list[str] = []

    def open(
        self,
        server: ServerProcess,
        name: str,
        room: str = "general",
        *,
        width: int = 1100,
        height: int = 700,
        wait_joined: bool = True,
    ) -> Page:
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        ctx.set_default_timeout(STEP_TIMEOUT_MS)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: {exc}"))
        query = f"?name={name}" + ("&transport=fallback" if self.transport == "fallback" else "")
        page.goto(f"{server.http_url}/{query}#{room}")
        if wait_joined:
            wait_online(page, self.transport)
            expect_focus_on_message_box(page)
        return page

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()


@pytest.fixture
def pages(browser: Browser, transport: str) -> Iterator[Pages]:
    p = Pages(browser, transport)
    try:
        yield p
    finally:
        p.close()
    assert not p.errors, p.errors


def wait_online(page: Page, transport: str) -> None:
    from playwright.sync_api import expect

    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "online")
    expect(status).to_have_attribute("data-transport", transport)


def expect_focus_on_message_box(page: Page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#text")).to_be_focused()


def say(page: Page, text: str) -> None:
    page.locator("#text").fill(text)
    page.keyboard.press("Enter")


def messages(page: Page, room: str = "general") -> Any:
    return page.locator(f'.log[data-room="{room}"] li.msg')


def message_with(page: Page, text: str, room: str = "general") -> Any:
    return messages(page, room).filter(has=page.locator(".text", has_text=text))


def shot(page: Page, name: str, transport: str) -> None:
    page.screenshot(path=str(OUTPUT / f"{name}-{transport}.png"))


# --------------------------------------------------------------------------- scenarios


def test_two_users_chat_with_presence_and_typing(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")

    expect(alice.locator("#member-list li")).to_have_text(["alice (you)", "bob"])
    expect(bob.locator("#member-list li")).to_have_text(["alice", "bob (you)"])
    expect(alice.locator(".log li.system", has_text="bob joined")).to_have_count(1)

    say(alice, "hello bob")
    msg = message_with(bob, "hello bob")
    expect(msg).to_have_count(1)
    expect(msg.locator(".from")).to_have_text("alice")
    expect(msg.locator("time")).to_have_text(re.compile(r"\d\d:\d\d"))
    expect(message_with(alice, "hello bob")).not_to_have_class("pending")

    bob.locator("#text").press_sequentially("hi al")
    expect(alice.locator("#typing")).to_have_text("bob is typing…")
    bob.keyboard.press("Enter")
    expect(message_with(alice, "hi al")).to_have_count(1)
    expect(alice.locator("#typing")).to_have_text("")  # a message ends the typing notice
    expect(messages(alice)).to_have_count(2)
    shot(alice, "two-users", transport)

    bob.context.close()
    pages.contexts.remove(bob.context)
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)"])
    expect(alice.locator(".log li.system", has_text="bob left")).to_have_count(1)


def test_rooms_are_separate_with_unread_counts_and_keyboard(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    carol = pages.open(server, "carol", "random")
    expect(carol.locator("#room-title")).to_have_text("#random")

    say(carol, "only for random")
    say(alice, "only for general")
    expect(message_with(bob, "only for general")).to_have_count(1)
    expect(message_with(carol, "only for random", "random")).to_have_count(1)
    expect(carol.locator("#member-list li")).to_have_text(["carol (you)"])
    # Carol's page knows nothing of #general: it was never joined.
    expect(carol.locator('.log[data-room="general"]')).to_have_count(0)
    expect(messages(bob)).to_have_count(1)

    # Alice joins #random with the keyboard only: Tab to the join box, type, Enter.
    alice.locator("#join-input").focus()
    alice.keyboard.type("random")
    alice.keyboard.press("Enter")
    expect(alice.locator("#room-title")).to_have_text("#random")
    expect(alice).to_have_url(f"{server.http_url}/?name=alice" + _q(transport) + "#random")
    expect(message_with(alice, "only for random", "random")).to_have_count(1)  # history
    expect_focus_on_message_box(alice)
    expect(carol.locator("#member-list li")).to_have_text(["alice", "carol (you)"])

    # While alice reads #random, #general counts what she has not seen.
    say(bob, "unread one")
    say(bob, "unread two")
    general = alice.locator('#room-list li[data-room="general"] .unread')
    expect(general).to_have_text("2")
    expect(message_with(carol, "unread", "random")).to_have_count(0)
    shot(alice, "unread", transport)

    alice.keyboard.press("Alt+ArrowUp")
    expect(alice.locator("#room-title")).to_have_text("#general")
    expect(general).to_have_count(0)
    expect(message_with(alice, "unread two")).to_be_visible()

    # Leaving a room tells its members.
    alice.locator('#room-list li[data-room="random"] .leave').click()
    expect(carol.locator("#member-list li")).to_have_text(["carol (you)"])
    expect(alice.locator('#room-list li[data-room="random"]')).to_have_count(0)


def test_html_is_shown_literally(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    evil = '<script>window.__pwned = 1</script><b>bold</b><img src=x onerror="window.__pwned=2">'
    say(alice, evil)
    msg = message_with(bob, "<script>")
    expect(msg).to_have_count(1)
    expect(msg.locator(".text")).to_have_text(evil)
    assert msg.locator(".text").inner_html() != evil  # escaped, not parsed
    assert bob.locator(".log b, .log img, .log script").count() == 0
    assert bob.evaluate("window.__pwned") is None
    assert alice.evaluate("window.__pwned") is None


def test_phone_width_layout(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice", width=375, height=667)
    bob = pages.open(server, "bob")
    say(bob, "a-very-long-word-without-any-spaces-" * 6)
    say(bob, "a short one")
    expect(message_with(alice, "a short one")).to_be_visible()
    say(alice, "typed on a phone")
    expect(message_with(bob, "typed on a phone")).to_have_count(1)

    width = alice.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"horizontal scroll: content is {width}px wide"
    for selector in ("#text", "#send-form button", "#status", ".room-link"):
        box = alice.locator(selector).first.bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0, selector
        assert box["x"] + box["width"] <= 375, selector
        assert box["y"] + box["height"] <= 667, selector
    shot(alice, "phone", transport)


def test_server_restart_page_resumes_exactly_once(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    say(alice, "before the restart")
    expect(message_with(bob, "before the restart")).to_have_count(1)

    trio.run(server.stop)
    status = alice.locator("#status")
    expect(status).to_have_attribute("data-state", "reconnecting")
    expect(status).to_contain_text("reconnecting…")
    shot(alice, "reconnecting", transport)
    # Keep alice off the network until bob has talked, so she must catch up by resuming.
    alice.context.set_offline(True)
    say(alice, "typed while offline")
    expect(message_with(alice, "typed while offline")).to_have_class(re.compile(r"\bpending\b"))

    trio.run(server.start)
    wait_online(bob, transport)
    expect(bob.locator("#member-list li")).to_have_text(["bob (you)"])
    missed = ["missed one", "missed two", "missed three"]
    send_as(server.chat_url, "carol", "general", missed)
    for text in missed:
        expect(message_with(bob, text)).to_have_count(1)
    expect(status).not_to_have_attribute("data-state", "online")

    alice.context.set_offline(False)
    wait_online(alice, transport)
    for text in missed:
        expect(message_with(alice, text)).to_have_count(1)
    expect(message_with(alice, "typed while offline")).to_have_count(1)
    expect(alice.locator(".log li.pending")).to_have_count(0)
    expect(message_with(bob, "typed while offline")).to_have_count(1)
    expect(message_with(alice, "before the restart")).to_have_count(1)
    expect(messages(alice)).to_have_count(5)
    ids = alice.eval_on_selector_all(".log li.msg", "els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)) == 5
    assert ids == sorted(ids)
    stored = [m["text"] for m in server.stored("general")]
    assert stored.count("typed while offline") == 1
    shot(alice, "resumed", transport)


def test_load_older_pages_back_through_history(
    unlimited_server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    texts = [f"old message {i:03d}" for i in range(120)]
    send_as(unlimited_server.chat_url, "writer", "general", texts)
    alice = pages.open(unlimited_server, "alice")
    expect(messages(alice)).to_have_count(50)
    expect(messages(alice).last.locator(".text")).to_have_text("old message 119")
    older = alice.locator("#load-older")
    older.focus()
    alice.keyboard.press("Enter")
    expect(messages(alice)).to_have_count(100)
    older.click()
    expect(messages(alice)).to_have_count(120)
    expect(messages(alice).first.locator(".text")).to_have_text("old message 000")
    expect(older).to_be_hidden()


def test_slow_disconnect_is_shown_then_recovers(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    # The first connection is closed with 4008 "slow", as the server does to a client
    # that cannot keep up; later ones go to the real server.
    connections: list[str] = []

    def route(ws: WebSocketRoute) -> None:
        connections.append(ws.url)
        if len(connections) == 1:
            welcome = {"type": "welcome", "name": "alice", "node": "test"}
            ws.send(json.dumps(welcome))
            ws.close(code=4008, reason="slow")
        else:
            ws.connect_to_server()

    ctx = pages.browser.new_context()
    pages.contexts.append(ctx)
    page = ctx.new_page()
    page.route_web_socket("**/ws?*", route)
    page.clock.install()  # the reconnect delay runs on a fake clock we advance
    query = "?name=alice" + _q(transport)
    page.goto(f"{server.http_url}/{query}#general")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "slow")
    expect(status).to_contain_text("too slow")
    shot(page, "slow", transport)
    page.clock.run_for(2000)
    wait_online(page, transport)
    assert len(connections) == 2


def _q(transport: str) -> str:
    return "&transport=fallback" if transport == "fallback" else ""


def test_three_users_two_rooms_readme_scene(server: ServerProcess, browser: Browser) -> None:
    """Three people, two rooms, an unread count, someone typing: docs/screenshot.png."""
    from playwright.sync_api import expect

    pages = Pages(browser, "chat")
    try:
        alice = pages.open(server, "alice", "random", width=1000, height=520)
        alice.locator("#join-input").fill("general")
        alice.keyboard.press("Enter")
        expect_focus_on_message_box(alice)
        bob = pages.open(server, "bob")
        carol = pages.open(server, "carol")
        say(bob, "Morning! Did the deploy go out?")
        expect(message_with(alice, "Morning!")).to_have_count(1)
        say(alice, "Yes: both nodes are on the new build.")
        expect(message_with(carol, "both nodes")).to_have_count(1)
        say(carol, "I closed my laptop on the train and got every message back on resume.")
        expect(message_with(alice, "on resume")).to_have_count(1)
        say(bob, "And <b>tags</b> show up as plain text, as they should.")
        expect(message_with(alice, "plain text")).to_have_count(1)
        send_as(server.chat_url, "dave", "random", ["anyone up for lunch?"])
        expect(alice.locator('#room-list li[data-room="random"] .unread')).to_have_text("1")
        bob.locator("#text").press_sequentially("sounds go")
        expect(alice.locator("#typing")).to_have_text("bob is typing…")
        expect(alice.locator("#member-list li")).to_have_text(["alice (you)", "bob", "carol"])
        alice.screenshot(path=str(OUTPUT / "readme.png"))
    finally:
        pages.close()
    assert not pages.errors, pages.errors


def test_nickname_is_asked_once_then_remembered(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    ctx = pages.browser.new_context()
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    pages.contexts.append(ctx)
    page = ctx.new_page()
    page.goto(f"{server.http_url}/?{_q(transport)}")
    expect(page.locator("#name-dialog")).to_be_visible()
    expect(page.locator("#name-input")).to_be_focused()
    page.keyboard.type("dora")
    page.keyboard.press("Enter")
    wait_online(page, transport)
    expect_focus_on_message_box(page)
    expect(page.locator("#room-title")).to_have_text("#general")  # the default room
    expect(page).to_have_url(re.compile(r"#general$"))
    page.reload()
    wait_online(page, transport)
    expect(page.locator("#name-dialog")).to_be_hidden()
    # The old connection may still hold "dora" for a moment: the server adds a suffix.
    expect(page.locator("#me-name")).to_have_text(re.compile(r"^dora(-\d+)?$"))


def test_page_falls_back_to_ws_when_the_chat_socket_is_unreachable(
    server_with_dead_chat_socket: ServerProcess, browser: Browser
) -> None:
    from playwright.sync_api import expect

    pages = Pages(browser, "chat")  # nothing forced: the page must find /ws by itself
    try:
        alice = pages.open(server_with_dead_chat_socket, "alice", wait_joined=False)
        wait_online(alice, "fallback")
        expect(alice.locator("#status")).to_have_text("online (via /ws)")
        say(alice, "over the fallback")
        expect(message_with(alice, "over the fallback")).not_to_have_class(
            re.compile(r"\bpending\b")
        )
    finally:
        pages.close()
    assert not pages.errors, pages.errors


def test_page_sends_again_what_a_full_disk_refused(
    small_disk: Path, tmp_path: Path, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    server = ServerProcess(small_disk, tmp_path / "server.log", limit_rate=True)
    trio.run(server.start)
    try:
        alice = pages.open(server, "alice")
        bob = pages.open(server, "bob")
        say(alice, "before the disk filled")
        expect(message_with(bob, "before the disk filled")).to_have_count(1)
        filler = fill(small_disk)
        say(alice, "while the disk is full")
        expect(alice.locator("#typing")).to_contain_text("store is unavailable")
        expect(message_with(alice, "while the disk is full")).to_have_class(re.compile("pending"))
        shot(alice, "store-unavailable", transport)
        filler.unlink()
        # The page sends it again by itself (same cid, after a backoff): stored once.
        expect(message_with(bob, "while the disk is full")).to_have_count(1)
        expect(message_with(alice, "while the disk is full")).not_to_have_class(
            re.compile("pending")
        )
        stored = server.stored_texts("general")
        assert stored == ["before the disk filled", "while the disk is full"]
    finally:
        trio.run(server.stop)


def test_page_sends_a_retry_secret_kept_per_tab(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    """Retried cids dedupe per ``client_id``: the page keeps one per tab, across reloads."""
    alice = pages.open(server, "alice")
    opened: list[str] = []
    alice.on("websocket", lambda ws: opened.append(ws.url))
    read_id = "JSON.parse(sessionStorage.getItem('trio-chat.clientId'))"
    client_id = alice.evaluate(read_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", client_id)
    alice.reload()
    wait_online(alice, transport)
    assert alice.evaluate(read_id) == client_id
    assert parse_qs(urlsplit(opened[-1]).query)["client_id"] == [client_id]
    other_tab = alice.context.new_page()
    other_tab.goto(alice.url)
    wait_online(other_tab, transport)
    other_id = other_tab.evaluate(read_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", other_id)
    assert other_id != client_id
