"""The page in a real browser: Debian's Chromium driven by Playwright (sync API).

The server is a real ``hypercorn trio_chat:app`` subprocess on free 127.0.0.1 ports. Every
scenario runs twice: over the chat socket (the port named by /api/config) and over the
``/ws`` fallback on hypercorn's own port (``?transport=fallback``). Screenshots go to
``test-output/``. Nothing sleeps to wait: Playwright's ``expect`` polls with a deadline.

Without /usr/bin/chromium these tests skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
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
def server_env() -> dict[str, str]:
    """Settings for `server`, as environment variables: tests parametrize it."""
    return {}


@pytest.fixture
def server(tmp_path: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    yield from _make_server(tmp_path, **server_env)


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
        fake_clock: bool = False,
    ) -> Page:
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        ctx.set_default_timeout(STEP_TIMEOUT_MS)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: {exc}"))
        if fake_clock:
            page.clock.install()  # runs on real time until the test pauses it
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


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_PRESENCE_NAMES_MAX": "2"}])
def test_a_big_room_shows_its_head_count_and_its_list_again_when_small(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)", "bob"])
    carol = pages.open(server, "carol")
    # Over the limit: a count, on the page that had the list and on the newcomer's.
    for page in (alice, carol):
        expect(page.locator("#member-list li")).to_have_text(["too many to list"])
        expect(page.locator("#member-count")).to_have_text("(3)")
    shot(alice, "big-room", transport)
    for gone in (carol, bob):
        gone.context.close()
        pages.contexts.remove(gone.context)
    # Half the limit: the list is back.
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)"])
    expect(alice.locator("#member-count")).to_have_text("(1)")


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
    expect(status).to_contain_text("reconnecting in")
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


@pytest.mark.parametrize(
    ("server_env", "stored", "older"),
    [
        ({"TRIO_CHAT_RATE_LIMIT": "0"}, 10, False),
        # Exactly one join's replay: nothing older, though the replay was full.
        ({"TRIO_CHAT_RATE_LIMIT": "0"}, 50, False),
        # Replays shorter and longer than a "load older" page (50): the page used to
        # take a replay of fewer than 50 for all there is.
        ({"TRIO_CHAT_RATE_LIMIT": "0", "TRIO_CHAT_HISTORY_ON_JOIN": "20"}, 30, True),
        ({"TRIO_CHAT_RATE_LIMIT": "0", "TRIO_CHAT_HISTORY_ON_JOIN": "80"}, 60, False),
    ],
    ids=["fewer-than-a-replay", "one-full-replay", "replay-20-of-30", "replay-60-of-60"],
)
def test_load_older_is_offered_only_when_older_messages_exist(
    server: ServerProcess, server_env: dict[str, str], stored: int, older: bool, pages: Pages
) -> None:
    from playwright.sync_api import expect

    send_as(server.chat_url, "writer", "general", [f"m{i:03d}" for i in range(stored)])
    replayed = min(stored, int(server_env.get("TRIO_CHAT_HISTORY_ON_JOIN", "50")))
    alice = pages.open(server, "alice")  # returns once joined: the box has the focus
    expect(messages(alice)).to_have_count(replayed)
    expect(messages(alice).last.locator(".text")).to_have_text(f"m{stored - 1:03d}")
    button = alice.locator("#load-older")
    if older:
        expect(button).to_be_visible()
        button.click()
        expect(messages(alice)).to_have_count(stored)
        expect(messages(alice).first.locator(".text")).to_have_text("m000")
    expect(button).to_be_hidden()


@pytest.mark.parametrize(
    "server_env",
    # Three frames of burst, then ten a second; no close for refusals in a row, so
    # nothing but the page's own retry can send the refused messages again.
    [{"TRIO_CHAT_RATE_LIMIT": "10", "TRIO_CHAT_RATE_BURST": "3", "TRIO_CHAT_RATE_STRIKES": "1000"}],
)
def test_sends_refused_as_rate_limited_are_retried_from_their_own_room(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice", "a", fake_clock=True)
    alice.locator("#join-input").fill("b")
    alice.keyboard.press("Enter")
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)"])  # joined b
    alice.clock.pause_at(alice.evaluate("Date.now()") / 1000 + 0.1)  # no retry until we say
    texts = [f"to b {i}" for i in range(8)]
    alice.evaluate(
        """texts => {
            const box = document.getElementById("text");
            for (const t of texts) {
                box.value = t;
                document.getElementById("send-form").requestSubmit();
            }
        }""",
        texts,
    )
    expect(alice.locator("#typing")).to_contain_text("frames a second")
    alice.keyboard.press("Alt+ArrowUp")  # to #a, while b's refused sends wait
    expect(alice.locator("#room-title")).to_have_text("#a")
    pending = alice.locator('.log[data-room="b"] li.pending')
    expect(pending).not_to_have_count(0)
    # Each step lets a retry's backoff run out (the page's clock) and the server's
    # bucket refill a little (real time).
    for _ in range(40):
        alice.clock.run_for(1000)
        with contextlib.suppress(AssertionError):
            expect(pending).to_have_count(0, timeout=250)
            break
    expect(pending).to_have_count(0, timeout=1)
    expect(messages(alice, "b")).to_have_count(len(texts))
    assert sorted(server.stored_texts("b")) == texts
    assert server.stored_texts("a") == []


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_MAX_TEXT": "20"}])
def test_the_page_keeps_to_the_servers_text_limit(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    box = alice.locator("#text")
    counter = alice.locator("#counter")
    box.press_sequentially("x" * 17)
    expect(counter).to_be_hidden()  # far from the limit: no counter
    box.press_sequentially("x")
    expect(counter).to_have_text("2 characters left")
    box.press_sequentially("xx")
    expect(counter).to_have_text("0 characters left")
    box.press_sequentially("x")
    expect(counter).to_have_text("1 character too many")
    expect(counter).to_have_class(re.compile(r"\bover\b"))
    expect(box).to_have_attribute("aria-invalid", "true")
    alice.keyboard.press("Enter")
    expect(alice.locator("#typing")).to_have_text("too long: messages are limited to 20 characters")
    expect(box).to_have_value("x" * 21)  # kept, to shorten
    shot(alice, "too-long", transport)
    expect(messages(alice)).to_have_count(0)
    # Counted as the server counts: 20 characters, though 40 UTF-16 units.
    smiles = "\U0001f600" * 20
    box.fill(smiles)
    expect(box).not_to_have_attribute("aria-invalid", "true")
    alice.keyboard.press("Enter")
    expect(messages(alice)).to_have_count(1)
    expect(message_with(alice, smiles)).not_to_have_class(re.compile(r"\bpending\b"))
    assert server.stored_texts("general") == [smiles]


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
    """Three people, two rooms, an unread count, someone typing: docs/screenshot.png, and
    the same room on a phone: docs/screenshot-phone.png."""
    from playwright.sync_api import expect

    pages = Pages(browser, "chat")
    try:
        alice = pages.open(server, "alice", "random", width=1000, height=560)
        alice.locator("#join-input").fill("general")
        alice.keyboard.press("Enter")
        expect_focus_on_message_box(alice)
        bob = pages.open(server, "bob")
        carol = pages.open(server, "carol", width=375, height=667)
        say(bob, "Morning! Did the deploy go out?")
        say(bob, "Release notes: https://example.org/trio-chat/releases")
        expect(message_with(alice, "Release notes")).to_have_count(1)
        say(alice, "Yes: both nodes are on the new build.")
        expect(message_with(carol, "both nodes")).to_have_count(1)
        carol.locator("#text").press_sequentially("I closed my laptop on the train,")
        carol.locator("#text").press("Shift+Enter")
        carol.locator("#text").press_sequentially("and got every message back on resume.")
        carol.locator("#text").press("Enter")
        expect(message_with(alice, "on resume")).to_have_count(1)
        say(bob, "And <b>tags</b> show up as plain text, as they should.")
        expect(message_with(alice, "plain text")).to_have_count(1)
        send_as(server.chat_url, "dave", "random", ["anyone up for lunch?"])
        expect(alice.locator('#room-list li[data-room="random"] .unread')).to_have_text("1")
        expect(alice).to_have_title("(1) #general · trio-chat")
        bob.locator("#text").press_sequentially("sounds go")
        expect(alice.locator("#typing")).to_have_text("bob is typing…")
        expect(carol.locator("#typing")).to_have_text("bob is typing…")
        expect(alice.locator("#member-list li")).to_have_text(["alice (you)", "bob", "carol"])
        alice.screenshot(path=str(OUTPUT / "readme.png"))
        carol.screenshot(path=str(OUTPUT / "readme-phone.png"))
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


# --------------------------------------------------------------------------- issue 15: the page as people expect it


def test_links_are_clickable_and_only_http(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    say(bob, "docs at https://example.org/a?b=1&c=2, not javascript:alert(1) or ftp://x.org")
    text = message_with(alice, "docs at").locator(".text")
    link = text.locator("a")
    expect(link).to_have_count(1)
    expect(link).to_have_text("https://example.org/a?b=1&c=2")  # the comma ends the sentence
    expect(link).to_have_attribute("href", "https://example.org/a?b=1&c=2")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")
    expect(text).to_have_text(
        "docs at https://example.org/a?b=1&c=2, not javascript:alert(1) or ftp://x.org"
    )
    say(bob, 'https://x.org/"><img src=y onerror="window.__pwned=1">')
    expect(message_with(alice, "x.org/").locator("a")).to_have_attribute("href", "https://x.org/")
    assert alice.locator(".log img").count() == 0
    assert alice.evaluate("window.__pwned") is None


def test_shift_enter_writes_lines_that_are_shown(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    box = alice.locator("#text")
    box.press_sequentially("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    expect(messages(alice)).to_have_count(0)  # Shift+Enter did not send
    box.press("Enter")
    text = message_with(bob, "second line").locator(".text")
    expect(text).to_have_text("first line\nsecond line")
    assert text.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
    line = bob.locator(".log .from").first.bounding_box()
    box_two = text.bounding_box()
    assert line is not None
    assert box_two is not None
    assert box_two["height"] > 1.5 * line["height"], "the two lines are shown as one"
    assert server.stored_texts("general") == ["first line\nsecond line"]


def test_right_to_left_text_lays_out_right_to_left(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    say(alice, "שלום לכולם")
    say(alice, "مرحبا بالجميع")
    say(alice, "hello everyone")
    for text, direction in [("שלום", "rtl"), ("مرحبا", "rtl"), ("hello", "ltr")]:
        node = message_with(alice, text).locator(".text")
        expect(node).to_have_attribute("dir", "auto")
        assert node.evaluate("(e, d) => e.matches(':dir(' + d + ')')", direction), text


#: The page's clock in the day-separator test starts at noon of this day (UTC, as is the
#: page's time zone there), so "today" never depends on when the test runs.
PAGE_NOON_TS = 1_772_625_600  # 2026-03-04 12:00 UTC, a Wednesday
DAY_S = 86_400


def _days_back(line: str) -> str:
    """A server frame with each message's ``ts`` moved N days back if its text starts ``[-N]``,
    and to the page's noon if ``[0]``: a real server's messages, sent days apart."""
    event = json.loads(line)
    for m in [event, *event.get("messages", [])]:
        found = re.match(r"\[(-?\d+)\]", str(m.get("text", "")))
        if m.get("type") == "message" and found:
            m["ts"] = PAGE_NOON_TS + int(found.group(1)) * DAY_S + (m["ts"] % 60)
    return json.dumps(event)


def test_day_separators_and_grouping(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    send_as(
        server.chat_url,
        "bob",
        "general",
        ["[-3] three days ago", "[-3] same day, same sender", "[-1] yesterday", "[0] today"],
    )

    def route(ws: WebSocketRoute) -> None:
        to_server = ws.connect_to_server()
        to_server.on_message(
            lambda m: (
                ws.send("\n".join(_days_back(x) for x in m.split("\n") if x))
                if isinstance(m, str)
                else ws.send(m)
            )
        )

    ctx = pages.browser.new_context(timezone_id="UTC", locale="en-US")
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    pages.contexts.append(ctx)
    alice = ctx.new_page()
    alice.route_web_socket("**/ws?*", route)
    alice.clock.install(time=PAGE_NOON_TS)  # runs on from the page's noon
    alice.goto(f"{server.http_url}/?name=alice{_q(transport)}#general")
    wait_online(alice, transport)
    expect(messages(alice)).to_have_count(4)
    say(alice, "[0] mine")
    # Acked (stored) before carol sends, so the two are in this order on the server too.
    expect(alice.locator(".log li.pending")).to_have_count(0)
    send_as(server.chat_url, "carol", "general", ["[0] live, from carol"])
    expect(messages(alice)).to_have_count(6)
    rows = alice.eval_on_selector_all(
        '.log[data-room="general"] li:not(.system)',
        """els => els.map(e => e.classList.contains("day") ? "-- " + e.textContent + " --"
            : (e.classList.contains("grouped") ? "  " : e.dataset.from + ": ")
              + e.querySelector(".text").textContent)""",
    )
    assert rows == [
        "-- Sunday, March 1, 2026 --",
        "bob: [-3] three days ago",
        "  [-3] same day, same sender",
        "-- Yesterday --",
        "bob: [-1] yesterday",
        "-- Today --",
        "bob: [0] today",
        "alice: [0] mine",
        "carol: [0] live, from carol",
    ]
    # The page stays open past midnight: the labels move on.
    alice.clock.fast_forward(DAY_S * 1000)
    days = alice.locator('.log[data-room="general"] li.day')
    expect(days).to_have_text(["Sunday, March 1, 2026", "Tuesday, March 3, 2026", "Yesterday"])
    # A grouped message keeps its sender for screen readers, hidden from view.
    grouped = message_with(alice, "same sender").locator(".from")
    expect(grouped).to_have_text("bob")
    assert grouped.evaluate("e => e.getBoundingClientRect().width") <= 1
    shot(alice, "day-separators", transport)


def test_room_browser_lists_rooms_with_members_and_joins_in_one_click(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    pages.open(server, "bob", "random")
    pages.open(server, "carol", "random")
    pages.open(server, "dave", "lobby")
    alice.locator("#browse").click()
    dialog = alice.locator("#rooms-dialog")
    expect(dialog).to_be_visible()
    rows = dialog.locator("#rooms-dialog-list li")
    # Busiest first; the one alice is in counts her.
    expect(rows).to_have_text(
        [
            re.compile(r"#random\s+2 members\s+Join"),
            re.compile(r"#general\s+1 member\s+Join"),
            re.compile(r"#lobby\s+1 member\s+Join"),
        ]
    )
    expect(rows.first.locator("button")).to_be_focused()
    shot(alice, "room-browser", transport)
    dialog.get_by_role("button", name="Join lobby").click()
    expect(dialog).to_be_hidden()
    expect(alice.locator("#room-title")).to_have_text("#lobby")
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)", "dave"])
    expect_focus_on_message_box(alice)


def test_unread_total_is_in_the_tab_title(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice", "a")
    alice.locator("#join-input").fill("b")
    alice.keyboard.press("Enter")
    expect(alice.locator("#member-list li")).to_have_text(["alice (you)"])  # joined b
    expect(alice).to_have_title("#b · trio-chat")
    send_as(server.chat_url, "bob", "a", ["one", "two", "three"])
    expect(alice).to_have_title("(3) #b · trio-chat")
    alice.keyboard.press("Alt+ArrowUp")
    expect(alice).to_have_title("#a · trio-chat")


def test_each_tab_has_its_own_name(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    ctx = pages.browser.new_context()
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    pages.contexts.append(ctx)
    first = ctx.new_page()
    first.goto(f"{server.http_url}/?name=alice{_q(transport)}#general")
    wait_online(first, transport)
    # A new tab is asked, with the last name used already typed: Enter keeps it.
    second = ctx.new_page()
    second.goto(f"{server.http_url}/?{_q(transport)}#general")
    expect(second.locator("#name-input")).to_be_focused()
    expect(second.locator("#name-input")).to_have_value("alice")
    second.keyboard.type("bob")
    second.keyboard.press("Enter")
    wait_online(second, transport)
    expect(second.locator("#me-name")).to_have_text("bob")
    # Renaming in the second tab leaves the first alone, across reloads too.
    second.locator("#rename").click()
    second.keyboard.type("carol")
    second.keyboard.press("Enter")
    expect(second.locator("#me-name")).to_have_text("carol")
    wait_online(second, transport)
    expect(first.locator("#member-list li")).to_have_text(["alice (you)", "carol"])
    third = ctx.new_page()
    third.goto(f"{server.http_url}/?{_q(transport)}#general")
    expect(third.locator("#name-input")).to_have_value("carol")  # the last one used
    third.close()
    first.reload()
    wait_online(first, transport)
    expect(first.locator("#me-name")).to_have_text(re.compile(r"^alice(-\d+)?$"))
    second.reload()
    wait_online(second, transport)
    expect(second.locator("#me-name")).to_have_text(re.compile(r"^carol(-\d+)?$"))


def test_a_refused_name_is_explained_and_asked_again(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    page = pages.open(server, "no spaces!", wait_joined=False)
    expect(page.locator("#name-dialog")).to_be_visible()
    expect(page.locator("#name-refused")).to_contain_text("Refused: names are 1-32 letters")
    expect(page.locator("#name-input")).to_be_focused()
    shot(page, "name-refused", transport)
    page.keyboard.press("Control+a")
    page.keyboard.type("dora")
    page.keyboard.press("Enter")
    expect(page.locator("#me-name")).to_have_text("dora")
    wait_online(page, transport)
    expect(page.locator("#member-list li")).to_have_text(["dora (you)"])
    expect(page).to_have_url(re.compile(r"\?name=dora"))  # a reload keeps the new one


def test_a_suffixed_name_is_explained(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    first = pages.open(server, "alice")
    second = pages.open(server, "alice")
    expect(second.locator("#me-name")).to_have_text("alice-2")
    expect(second.locator("#name-note")).to_have_text(
        "\u201calice\u201d is in use, so you are \u201calice-2\u201d here."
        " Change it with \u201cchange\u201d."
    )
    expect(first.locator("#name-note")).to_be_hidden()
    shot(second, "name-suffixed", transport)


def test_reconnect_counts_down_and_retries_now(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice", fake_clock=True)
    # The page's clock stands still from here: only run_for moves its timers, so no
    # countdown runs on while the test reads it (a loaded machine once let it reach 1 s).
    alice.clock.pause_at(alice.evaluate("Date.now()") + 1)
    trio.run(server.stop)
    status = alice.locator("#status")
    # Each failed try doubles the backoff: step the clock until a wait of 3 s or more.
    countdown = re.compile(r"reconnecting in ([3-9]) s")
    for _ in range(600):
        found = countdown.fullmatch(status.inner_text())
        if found:
            break
        alice.clock.run_for(100)
    assert found, status.inner_text()
    left = int(found.group(1))
    alice.clock.run_for(1000)
    expect(status).to_have_text(f"reconnecting in {left - 1} s")
    shot(alice, "countdown", transport)
    trio.run(server.start)
    retry = alice.locator("#retry-now")
    expect(retry).to_be_visible()
    retry.click()  # the page's clock stands still: only the button can reconnect it
    wait_online(alice, transport)
    expect(retry).to_be_hidden()
    expect(alice.locator("#why")).to_have_text("")


def test_close_codes_are_explained(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    codes = [1008, 1011, 4008, 1001]
    sentences = {
        1008: "The server closed the connection: too many messages too fast (rate limit).",
        1011: "The server hit an internal error; it is not your fault.",
        4008: "The connection was too slow to keep up; nothing is lost.",
        1001: "The server is restarting.",
    }
    connections: list[str] = []

    def route(ws: WebSocketRoute) -> None:
        connections.append(ws.url)
        if len(connections) <= len(codes):
            ws.send(json.dumps({"type": "welcome", "name": "alice", "node": "test"}))
            ws.close(code=codes[len(connections) - 1], reason="")
        else:
            ws.connect_to_server()

    ctx = pages.browser.new_context()
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    pages.contexts.append(ctx)
    page = ctx.new_page()
    page.route_web_socket("**/ws?*", route)
    page.clock.install()  # the reconnect delays run on a clock we advance
    page.goto(f"{server.http_url}/?name=alice{_q(transport)}#general")
    for i, code in enumerate(codes):
        expect(page.locator("#why")).to_have_text(sentences[code])
        assert len(connections) == i + 1
        if code == 1008:
            shot(page, "closed-1008", transport)
        # Step the clock in slices shorter than the page's shortest reconnect delay
        # (250 ms), so exactly one reconnect happens before the next sentence is read.
        deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
        while len(connections) == i + 1 and time.monotonic() < deadline:
            page.clock.run_for(100)
    wait_online(page, transport)
    expect(page.locator("#why")).to_have_text("")


_FOCUSED = """() => {
    const e = document.activeElement;
    const style = getComputedStyle(e);
    return {
        name: e === document.body ? "" : e.getAttribute("aria-label") || e.id || e.textContent.trim(),
        outline: style.outlineStyle + " " + style.outlineWidth,
    };
}"""


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_RATE_LIMIT": "0"}])
def test_keyboard_only_use(server: ServerProcess, pages: Pages, transport: str) -> None:
    from playwright.sync_api import expect

    send_as(server.chat_url, "writer", "general", [f"line {i:03d}" for i in range(80)])
    alice = pages.open(server, "alice")
    pages.open(server, "bob", "lobby")
    box = alice.locator("#text")
    scroll_top = "document.getElementById('messages').scrollTop"
    at_bottom = alice.evaluate(scroll_top)
    box.press("PageUp")
    expect(box).to_be_focused()
    assert alice.evaluate(scroll_top) < at_bottom
    box.press("PageDown")
    assert alice.evaluate(scroll_top) == at_bottom

    # Tab reaches every control, each with a visible focus ring.
    alice.evaluate("document.activeElement.blur()")
    reached: dict[str, str] = {}
    for _ in range(30):
        alice.keyboard.press("Tab")
        focused = alice.evaluate(_FOCUSED)
        reached.setdefault(focused["name"], focused["outline"])
    reached.pop("", None)  # the page itself, between the last control and the first
    controls = ["rename", "#general", "Leave general", "join-input", "Join", "browse"]
    controls += ["load-older", "text", "Send"]
    assert sorted(reached) == sorted(controls)
    for name, outline in reached.items():
        style, width = outline.split()
        assert style != "none", (name, outline)
        assert float(width.removesuffix("px")) >= 2, (name, outline)

    # The room browser, by keyboard alone.
    alice.locator("#browse").focus()
    alice.keyboard.press("Enter")
    expect(alice.get_by_role("button", name="Join general")).to_be_focused()
    alice.keyboard.press("Tab")
    expect(alice.get_by_role("button", name="Join lobby")).to_be_focused()
    alice.keyboard.press("Enter")
    expect(alice.locator("#room-title")).to_have_text("#lobby")
    expect_focus_on_message_box(alice)
    alice.keyboard.type("typed without a mouse")
    alice.keyboard.press("Enter")
    expect(message_with(alice, "typed without a mouse", "lobby")).not_to_have_class(
        re.compile(r"\bpending\b")
    )


AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"


def axe_violations(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['impact']}: {v['id']}: {v['help']} at {[n['target'] for n in v['nodes']]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def test_axe_core_finds_no_serious_violations(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    bob = pages.open(server, "bob")
    say(bob, "see https://example.org and שלום")
    say(alice, "a message of mine")
    expect(message_with(alice, "example.org")).to_have_count(1)
    second = pages.open(server, "alice")
    expect(second.locator("#name-note")).to_be_visible()  # alice-2, and why
    assert axe_violations(second) == []
    bob.locator("#text").press_sequentially("typing")
    expect(alice.locator("#typing")).to_have_text("bob is typing…")
    assert axe_violations(alice) == []
    alice.locator("#browse").click()
    expect(alice.locator("#rooms-dialog-list li")).to_have_count(1)
    assert axe_violations(alice) == []
    alice.keyboard.press("Escape")
    phone = pages.open(server, "carol", width=375, height=667)
    assert axe_violations(phone) == []
    trio.run(server.stop)
    expect(alice.locator("#retry-now")).to_be_visible()
    assert axe_violations(alice) == []


#: Messages a page keeps rendered per room (web/render.js MAX_RENDERED), and the slack it
#: lets pile up before trimming.
MAX_RENDERED = 300
TRIM_SLACK = 50


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_RATE_LIMIT": "0"}])
def test_a_flood_keeps_the_dom_bounded_and_the_page_responsive(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    flood = 5_000
    alice = pages.open(server, "alice")
    before = alice.evaluate("document.getElementsByTagName('*').length")
    failed: list[BaseException] = []

    def post() -> None:
        try:
            send_as(server.chat_url, "flood", "general", [f"flood {i:04d}" for i in range(flood)])
        # A plain thread (send_as's trio.run lets no Cancelled out): the test thread raises it.
        except BaseException as exc:  # noqa: ASYNC103
            failed.append(exc)

    poster = threading.Thread(target=post)
    started = time.monotonic()
    poster.start()
    try:
        expect(messages(alice)).not_to_have_count(0)
        # Typing and sending while the flood comes in: answered within a deadline.
        # Acked (no longer pending); it may be trimmed away already by the flood after it.
        say(alice, "typed during the flood")
        expect(alice.locator(".log li.pending")).to_have_count(0, timeout=10_000)
    finally:
        poster.join(timeout=60)
    assert not poster.is_alive()
    assert not failed, failed
    expect(message_with(alice, f"flood {flood - 1:04d}")).to_be_visible(timeout=30_000)
    took = time.monotonic() - started
    shown = messages(alice).count()
    assert shown <= MAX_RENDERED + TRIM_SLACK + 1, shown
    elements = alice.evaluate("document.getElementsByTagName('*').length")
    assert elements - before < 6 * (MAX_RENDERED + TRIM_SLACK), (before, elements)
    say(alice, "typed after the flood")
    expect(message_with(alice, "typed after the flood")).not_to_have_class(
        re.compile(r"\bpending\b"), timeout=5_000
    )
    # What was trimmed comes back through "load older".
    first = messages(alice).first.locator(".text").inner_text()
    alice.locator("#messages").evaluate("e => { e.scrollTop = 0; }")
    alice.locator("#load-older").click()
    expect(messages(alice)).to_have_count(shown + 1 + 50)
    expect(message_with(alice, first)).to_have_count(1)
    older = messages(alice).first.locator(".text").inner_text()
    assert older < first, (older, first)
    print(f"{flood} messages in {took:.1f} s; {shown} shown, {elements} elements")


def _inside(page: Page, selector: str, width: int, height: int) -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    assert box["x"] >= 0, (selector, box)
    assert box["y"] >= 0, (selector, box)
    assert box["x"] + box["width"] <= width, (selector, box)
    assert box["y"] + box["height"] <= height, (selector, box)


def _current_room_shown(page: Page) -> None:
    """The current room's entry is wholly inside the room strip's visible part."""
    strip = page.locator("#room-list").bounding_box()
    room = page.locator("#room-list li.current").bounding_box()
    assert strip is not None
    assert room is not None
    assert strip["x"] <= room["x"], (strip, room)
    assert room["x"] + room["width"] <= strip["x"] + strip["width"] + 0.5, (strip, room)


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_RATE_LIMIT": "0"}])
def test_phone_keeps_room_and_join_box_in_reach_and_the_list_tall_with_a_keyboard(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    from playwright.sync_api import expect

    alice = pages.open(server, "alice", width=375, height=667)
    for i in range(8):
        room = f"a-long-room-name-{i}"
        alice.locator("#join-input").fill(room)
        alice.keyboard.press("Enter")
        expect(alice.locator("#room-title")).to_have_text(f"#{room}")
        expect(alice.locator("#member-list li")).to_have_text(["alice (you)"])
        # The current room and the join box stay on screen, however many rooms there are.
        for selector in ("#join-input", "#join-form button", "#browse"):
            _inside(alice, selector, 375, 667)
        _current_room_shown(alice)
    assert alice.evaluate("document.documentElement.scrollWidth") <= 375
    shot(alice, "phone-rooms", transport)
    # The first room, far left in the strip: it scrolls into view when it becomes current.
    alice.locator("#join-input").fill("general")
    alice.keyboard.press("Enter")
    expect(alice.locator("#room-title")).to_have_text("#general")
    _current_room_shown(alice)

    # An on-screen keyboard takes about half the height: the messages keep most of the rest.
    send_as(server.chat_url, "bob", "general", [f"line {i}" for i in range(30)])
    alice.set_viewport_size({"width": 375, "height": 330})
    expect(alice.locator("body")).to_have_class(re.compile(r"\bshort\b"))
    box = alice.locator("#messages").bounding_box()
    assert box is not None
    assert box["height"] >= 0.5 * 330, box
    for selector in ("#text", "#join-input"):
        _inside(alice, selector, 375, 330)
    _current_room_shown(alice)
    expect(message_with(alice, "line 29")).to_be_visible()
    shot(alice, "phone-keyboard", transport)
    alice.set_viewport_size({"width": 375, "height": 667})
    expect(alice.locator("body")).not_to_have_class(re.compile(r"\bshort\b"))


API_KEY = "browser-test-api-key"


@pytest.mark.parametrize("server_env", [{"TRIO_CHAT_API_KEY": API_KEY}])
def test_a_message_deleted_over_the_server_api_loses_its_text(
    server: ServerProcess, pages: Pages, transport: str
) -> None:
    import httpx
    from playwright.sync_api import expect

    alice = pages.open(server, "alice")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.http_url}/api/rooms/general/messages"
    answer = httpx.post(url, json={"text": "buy cheap pills", "from": "spammer"}, headers=auth)
    assert answer.status_code == 201, answer.text
    message_id = answer.json()["id"]
    msg = message_with(alice, "buy cheap pills")
    expect(msg).to_have_count(1)
    assert httpx.delete(f"{url}/{message_id}", headers=auth).status_code == 204
    deleted = messages(alice).and_(alice.locator(f'[data-id="{message_id}"]'))
    expect(deleted.locator(".text")).to_have_text("message deleted")
    expect(deleted).to_have_class(re.compile(r"\bdeleted\b"))
    # A page opened later gets it deleted from history.
    bob = pages.open(server, "bob")
    later = messages(bob).and_(bob.locator(f'[data-id="{message_id}"]'))
    expect(later.locator(".text")).to_have_text("message deleted")
    expect(message_with(bob, "pills")).to_have_count(0)
