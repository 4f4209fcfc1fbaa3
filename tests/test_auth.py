"""jwt mode: tokens refused and accepted, expiry and refresh, private rooms (socket, HTTP)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import time
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from trio_websocket import ConnectionClosed, open_websocket_url

from trio_chat import Settings
from trio_chat.app._cli import main
from trio_chat.server._auth import Tokens
from trio_chat.server._session import HELLO_TIMEOUT

from _server_process import BIN, ServerProcess, free_port
from conftest import Client, _close, eventually, make_settings, start_server

if TYPE_CHECKING:
    import subprocess
    from collections.abc import AsyncIterator
    from pathlib import Path

    from conftest import Server

KEY = b"test-secret-of-at-least-32-bytes!"
API_KEY = "api-key-of-the-backend-0123"
API_AUTH = {"Authorization": f"Bearer {API_KEY}"}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "exp": int(time.time()) + 600,
        "aud": "chat",
        "iss": "app",
        "rooms": ["team-*"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), KEY, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with_public_key() -> str:
    """The algorithm-confusion forgery, built by hand (PyJWT refuses to make it)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    signature = hmac.new(RSA_PUBLIC_PEM, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


@pytest.fixture
async def jwt_server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    pem = tmp_path / "public.pem"
    pem.write_bytes(RSA_PUBLIC_PEM)
    settings = make_settings(
        tmp_path,
        auth="jwt",
        jwt_key=KEY,
        jwt_public_key=pem,
        jwt_audience="chat",
        jwt_issuer="app",
        public_rooms=frozenset({"lobby"}),
        token_url="https://app.example/chat-token",
        api_key=API_KEY.encode(),
        # Big enough for the 100 KB token to reach the token check.
        max_frame=256 * 1024,
    )
    return await start_server(nursery, settings)


@contextlib.asynccontextmanager
async def signed_in(url: str, tok: str, *, in_url: bool = False) -> AsyncIterator[Client]:
    async with open_websocket_url(url + (f"?token={tok}" if in_url else "")) as ws:
        try:
            client = Client(ws)
            if not in_url:
                await client.send(type="hello", token=tok)
            client.welcome = await client.expect("welcome")
            yield client
        finally:
            await _close(ws)


async def _read_to_close(client: Client) -> None:
    while True:
        await client.recv()


async def closed_with(client: Client) -> int:
    """The close code the server ended ``client`` with (after its unread events)."""
    with pytest.raises(ConnectionClosed) as closed:
        await _read_to_close(client)
    assert closed.value.reason is not None
    return closed.value.reason.code


REFUSED = {
    "wrong signature": lambda: jwt.encode(claims(), b"another-secret-of-32-bytes-long!!", "HS256"),
    "alg none": lambda: jwt.encode(claims(), None, algorithm="none"),
    "HS256 with the public key": hs256_signed_with_public_key,
    "expired": lambda: token(exp=int(time.time()) - 60),
    "nbf in the future": lambda: token(nbf=int(time.time()) + 120),
    "wrong aud": lambda: token(aud="another-app"),
    "wrong iss": lambda: token(iss="someone-else"),
    "no sub": lambda: token(sub=None),
    "no exp": lambda: token(exp=None),
    "rooms not a list": lambda: token(rooms="team-*"),
    "garbage": lambda: "garbage.garbage.garbage",
    "100 KB": lambda: "a" * 100_000,
}


@pytest.mark.parametrize("case", REFUSED)
async def test_refused_tokens_get_unauthorized_and_4001(
    jwt_server: Server, transport: str, case: str
) -> None:
    async with open_websocket_url(jwt_server.url(transport)) as ws:
        client = Client(ws)
        await client.send(type="hello", token=REFUSED[case]())
        await client.expect("error", code="unauthorized")
        assert await closed_with(client) == 4001


async def test_a_refused_url_token_gets_4001(jwt_server: Server, transport: str) -> None:
    async with open_websocket_url(jwt_server.url(transport) + "?token=garbage") as ws:
        client = Client(ws)
        await client.expect("error", code="unauthorized")
        assert await closed_with(client) == 4001


async def test_valid_tokens_name_the_user_and_every_message_carries_uid(
    jwt_server: Server, transport: str
) -> None:
    url = jwt_server.url(transport)
    rs256 = jwt.encode(claims(sub="bob"), RSA_KEY, algorithm="RS256")
    async with (
        signed_in(url, token(name="Alice A.")) as alice,
        signed_in(url, rs256, in_url=True) as bob,
    ):
        assert alice.welcome["user"] == "alice"
        assert alice.welcome["name"] == "Alice A."
        assert bob.welcome["name"] == "bob"
        await alice.join("team-1")
        await bob.join("team-1")
        ack = await alice.chat("team-1", "hi", cid="c1")
        message = await bob.next_of("message")
        assert message["from"] == "Alice A."
        assert message["uid"] == "alice"
        assert message["id"] == ack["id"]
    async with signed_in(url, token()) as again:
        replay, _ = await again.join("team-1")
        assert [(m["uid"], m["text"]) for m in replay] == [("alice", "hi")]
        # Retries dedupe per user, across connections.
        assert (await again.chat("team-1", "hi", cid="c1"))["duplicate"] is True


async def test_a_user_leaves_a_room_with_the_last_of_its_tabs(
    jwt_server: Server, transport: str
) -> None:
    url = jwt_server.url(transport)
    async with signed_in(url, token(sub="bob")) as bob:
        async with signed_in(url, token()) as tab2:
            await bob.join("team-1")
            await tab2.join("team-1")
            async with signed_in(url, token()) as tab1:
                await tab1.join("team-1")
            await eventually(lambda: len(jwt_server.node.sessions) == 2)
            # One tab is gone, the other one speaks: bob heard no "alice left" meanwhile.
            await tab2.chat("team-1", "still here")
            seen = []
            while (event := await bob.recv())["type"] != "message":
                seen.append(event)
            assert {"type": "presence", "room": "team-1", "left": "alice"} not in seen
            assert sorted(jwt_server.node.members("team-1")) == ["alice", "bob"]
        # The last tab closed: now she leaves.
        assert await bob.next_of("presence") == {
            "type": "presence",
            "room": "team-1",
            "left": "alice",
        }


async def test_the_admin_claim_deletes_and_the_api_disconnects_by_sub(
    jwt_server: Server, transport: str
) -> None:
    url = jwt_server.url(transport)
    async with httpx.AsyncClient(base_url=jwt_server.http_url) as http:
        path = "/api/rooms/team-1/messages"
        too_long = {"text": "x", "uid": "u" * 257}
        refused = await http.post(path, json=too_long, headers=API_AUTH)
        assert (refused.status_code, refused.json()["code"]) == (400, "bad_field")
        body = {"text": "spam", "from": "bot", "uid": "bot-7"}
        message_id = (await http.post(path, json=body, headers=API_AUTH)).json()["id"]
    async with (
        signed_in(url, token(name="Alice A.")) as member,
        signed_in(url, token(sub="mod", admin=True)) as mod,
    ):
        replay, _ = await member.join("team-1")
        assert [(m["from"], m["uid"]) for m in replay] == [("bot", "bot-7")]
        await member.send(type="delete", room="team-1", id=message_id)
        assert (await member.next_of("error"))["code"] == "forbidden"
        await mod.join("team-1")
        await mod.send(type="delete", room="team-1", id="0000000000000001-nobody")
        assert (await mod.next_of("error"))["code"] == "unknown_id"
        await mod.send(type="delete", room="team-1", id=message_id)
        assert (await member.next_of("deleted"))["id"] == message_id
        async with httpx.AsyncClient(base_url=jwt_server.http_url) as http:
            # The user is the token's sub, not its display name.
            answer = await http.post("/api/users/alice/disconnect", headers=API_AUTH)
        assert (answer.status_code, answer.json()) == (200, {"closed": 1})
        assert await closed_with(member) == 4003
        await mod.send(type="ping")  # another user's connection stays open
        assert (await mod.next_of("pong"))["type"] == "pong"
    async with signed_in(url, token()) as again:
        replay, _ = await again.join("team-1")
        assert [(m["uid"], m.get("text"), m["deleted"]) for m in replay] == [("bot-7", None, True)]


async def test_only_ping_is_answered_before_hello(jwt_server: Server, transport: str) -> None:
    async with open_websocket_url(jwt_server.url(transport)) as ws:
        client = Client(ws)
        await client.send(type="ping")
        await client.expect("pong")
        await client.send(type="join", room="lobby")
        await client.expect("error", code="unauthorized")
        assert await closed_with(client) == 4001


async def test_no_hello_within_10_s_gets_4001(
    jwt_server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_websocket_url(jwt_server.chat_socket_url) as ws:
        client = Client(ws)
        start = trio.current_time()
        await client.expect("error", code="unauthorized")
        assert trio.current_time() - start >= HELLO_TIMEOUT
        assert await closed_with(client) == 4001


@pytest.mark.timeout(600)  # virtual seconds: the token lives 90 of them
async def test_expiry_closes_with_4002_and_a_refresh_extends_it(
    jwt_server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    url = jwt_server.chat_socket_url
    now = int(time.time())
    async with signed_in(url, token(exp=now + 60)) as client:
        start = trio.current_time()
        await client.send(type="refresh", token=token(exp=now + 300))
        await client.expect("refreshed", exp=now + 300)
        await client.expect("error", code="token_expired")
        assert await closed_with(client) == 4002
        # The new exp, plus the 30 s leeway of every token check (not the first exp).
        assert 300 + 30 - 2 <= trio.current_time() - start <= 300 + 30 + 2


async def test_a_refresh_for_another_user_gets_4001(jwt_server: Server, transport: str) -> None:
    async with signed_in(jwt_server.url(transport), token()) as client:
        await client.send(type="refresh", token=token(sub="mallory"))
        await client.expect("error", code="unauthorized")
        assert await closed_with(client) == 4001


async def test_private_rooms_are_forbidden_on_every_command(
    jwt_server: Server, transport: str
) -> None:
    async with signed_in(jwt_server.url(transport), token()) as client:
        for command in (
            {"type": "join", "room": "secret"},
            {"type": "history", "room": "secret"},
            {"type": "send", "room": "secret", "text": "hi"},
            {"type": "typing", "room": "secret"},
        ):
            await client.send(**command)
            await client.expect("error", code="forbidden", room="secret")
        # The connection stays open; public and token rooms are allowed.
        await client.join("lobby")
        await client.join("team-7")


async def test_http_history_and_room_list_follow_the_same_rule(jwt_server: Server) -> None:
    async with signed_in(jwt_server.chat_socket_url, token()) as alice:
        await alice.join("team-1")
        await alice.join("lobby")
        await alice.chat("team-1", "private")
        async with httpx.AsyncClient(base_url=jwt_server.http_url) as http:

            def bearer(tok: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {tok}"}

            path = "/api/rooms/team-1/messages"
            assert (await http.get(path)).status_code == 401
            assert (await http.get(path, headers=bearer("garbage"))).status_code == 401
            expired = token(exp=int(time.time()) - 60)
            assert (await http.get(path, headers=bearer(expired))).status_code == 401
            other = token(sub="bob", rooms=[])
            assert (await http.get(path, headers=bearer(other))).status_code == 403
            allowed = await http.get(path, headers=bearer(token()))
            assert allowed.status_code == 200
            assert [m["text"] for m in allowed.json()["messages"]] == ["private"]

            def listed(response: httpx.Response) -> set[str]:
                assert response.status_code == 200
                return {r["room"] for r in response.json()["rooms"]}

            assert listed(await http.get("/api/rooms")) == {"lobby"}
            assert listed(await http.get("/api/rooms", headers=bearer(other))) == {"lobby"}
            everything = await http.get("/api/rooms", headers=bearer(token()))
            assert listed(everything) == {"lobby", "team-1"}
            assert (await http.get("/api/rooms", headers=bearer("garbage"))).status_code == 401


def test_the_token_command_signs_what_the_server_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIO_CHAT_JWT_KEY", KEY.decode())
    argv = ["token", "--sub", "alice", "--name", "Alice", "--rooms", "team-*, dm-*", "--admin"]
    assert main([*argv, "--ttl", "2h"]) == 0
    settings = Settings.from_env({"TRIO_CHAT_AUTH": "jwt", "TRIO_CHAT_JWT_KEY": KEY.decode()})
    identity = Tokens(settings).check_untrusted(capsys.readouterr().out.strip())
    assert (identity.sub, identity.name, identity.rooms, identity.admin) == (
        "alice",
        "Alice",
        ("team-*", "dm-*"),
        True,
    )
    assert 2 * 3600 - 5 <= identity.exp - time.time() <= 2 * 3600
    monkeypatch.delenv("TRIO_CHAT_JWT_KEY")
    assert main(["token", "--sub", "alice"]) == 2
    assert "TRIO_CHAT_JWT_KEY" in capsys.readouterr().err


async def test_the_page_config_names_the_mode(jwt_server: Server, server: Server) -> None:
    async with httpx.AsyncClient() as http:
        jwt_config = (await http.get(jwt_server.http_url + "/api/config")).json()
        open_config = (await http.get(server.http_url + "/api/config")).json()
    assert (jwt_config["auth"], jwt_config["token_url"]) == (
        "jwt",
        "https://app.example/chat-token",
    )
    assert (open_config["auth"], open_config["token_url"]) == ("open", None)


def _bad_public_keys(tmp_path: Path) -> dict[str, Path]:
    """One file per way a public key file can be wrong, by what is wrong."""
    private = RSA_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # P-521: a curve PyJWT signs with (ES512) but trio-chat does not accept.
    p521 = (
        ec.generate_private_key(ec.SECP521R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    files = {"not a PEM": b"hello\n", "a private key": private, "an unsupported key": p521}
    paths = {"missing": tmp_path / "missing.pem"}
    for what, content in files.items():
        paths[what] = tmp_path / f"{what.replace(' ', '-')}.pem"
        paths[what].write_bytes(content)
    return paths


async def test_serve_refuses_a_bad_public_key_before_it_starts(tmp_path: Path) -> None:
    """Status 2 and one line naming TRIO_CHAT_JWT_PUBLIC_KEY, before anything is bound
    (nothing on stdout: ``serve`` prints where to connect only once it starts). The
    processes run side by side: each is a Python start-up, the slow part."""
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def serve(what: str, path: Path) -> None:
        env = {
            **os.environ,
            "TRIO_CHAT_DATA_DIR": str(tmp_path / "data"),
            "TRIO_CHAT_AUTH": "jwt",
            "TRIO_CHAT_JWT_PUBLIC_KEY": str(path),
        }
        args = [str(BIN / "trio-chat"), "serve", "--bind", f"127.0.0.1:{free_port()}"]
        args += ["--ws-bind", f"127.0.0.1:{free_port()}"]
        results[what] = await trio.run_process(
            args, env=env, capture_stdout=True, capture_stderr=True, check=False
        )

    # Generous: four Python start-ups at once on a busy machine.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for what, path in _bad_public_keys(tmp_path).items():
                nursery.start_soon(serve, what, path)
    for what, result in results.items():
        stderr = result.stderr.decode()
        assert result.returncode == 2, (what, stderr)
        assert stderr.startswith("trio-chat: TRIO_CHAT_JWT_PUBLIC_KEY"), (what, stderr)
        assert stderr.count("\n") == 1, (what, stderr)
        assert not result.stdout, (what, "nothing may look like a start")
    assert "RSA, EC (P-256, P-384) or Ed25519" in results["an unsupported key"].stderr.decode()
    assert "No such file" in results["missing"].stderr.decode()


async def test_hypercorn_refuses_a_bad_public_key_in_one_line(tmp_path: Path) -> None:
    """Under plain hypercorn the worker's lifespan fails with one log line naming the
    variable (not a traceback from inside the node: hypercorn's own follows), and
    nothing serves."""
    path = _bad_public_keys(tmp_path)["a private key"]
    env = {"TRIO_CHAT_AUTH": "jwt", "TRIO_CHAT_JWT_PUBLIC_KEY": str(path)}
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", env=env)
    try:
        await server.spawn()
        await server.wait_exit(60)
    finally:
        await server.kill()
    log = server.log()
    # The node is "-" until the worker has one.
    line = f"ERROR [-] trio_chat.app: cannot start: TRIO_CHAT_JWT_PUBLIC_KEY={path}: "
    assert line in log, log
    assert "the chat node failed" not in log, log
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(server.http_url + "/healthz")
