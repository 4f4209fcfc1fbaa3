"""Closing handshakes under churn: every client's close is answered, at once, on both
transports.

The clients are the Python ``websockets`` library (asyncio), in a thread of their own
against the in-process server: an independent client whose close waits
``close_timeout`` for the server's close frame and reports 1006 when it never comes.
Each one reads everything until its connection ends, as an application does: the
library stops reading the socket while more than 16 messages wait unread, and then no
server's answer could reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import trio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from pathlib import Path

CLIENTS = 50
ROOMS = 10
ROUNDS = 6
CLOSE_TIMEOUT = 3.0
# A close answered at once takes milliseconds; one never answered takes CLOSE_TIMEOUT.
PROMPT = 1.0


async def _read_all(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


async def _one_client(url: str, room: str) -> tuple[bool, float]:
    """Join, send three messages, linger, close.

    Returns:
      Whether the server answered the close, and how long the close took.
    """
    async with connect(url, close_timeout=CLOSE_TIMEOUT) as ws:
        reader = asyncio.create_task(_read_all(ws))
        await ws.send(json.dumps({"type": "join", "room": room}))
        for i in range(3):
            await ws.send(json.dumps({"type": "send", "room": room, "text": f"m{i}"}))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await ws.close()
        took = time.monotonic() - start
        await reader
    return ws.protocol.close_rcvd is not None, took


async def _churn(url: str) -> list[tuple[bool, float]]:
    results: list[tuple[bool, float]] = []
    async with asyncio.timeout(ROUNDS * (CLOSE_TIMEOUT + 2)):
        for _ in range(ROUNDS):
            # several clients per room: messages and acks are in flight when they close
            clients = (_one_client(url, f"r{i % ROOMS}") for i in range(CLIENTS))
            results += await asyncio.gather(*clients)
    return results


async def test_every_close_is_answered_promptly_under_churn(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    server = await start_server(nursery, make_settings(tmp_path, rate_limit=0.0))
    url = server.url(transport)
    results = await trio.to_thread.run_sync(asyncio.run, _churn(url))
    assert len(results) == CLIENTS * ROUNDS
    assert [answered for answered, _ in results].count(False) == 0
    assert max(took for _, took in results) < PROMPT
    with trio.fail_after(PROMPT):
        while server.node.statistics().connections:  # noqa: ASYNC110 (no event for this)
            await trio.sleep(0.005)


async def test_a_close_is_answered_while_a_commit_is_pending(
    nursery: trio.Nursery, tmp_path: Path, transport: str, connect: Any
) -> None:
    server = await start_server(nursery, make_settings(tmp_path))
    node = server.node
    # Another writer holds the database: the commit task waits for its lock.
    blocker = sqlite3.connect(tmp_path / "history.sqlite3", isolation_level=None)
    try:
        async with connect(server.url(transport), "alice") as alice:
            await alice.join("r")
            blocker.execute("BEGIN IMMEDIATE")
            await alice.send(type="send", room="r", text="pending", cid="c-1")
            await eventually(lambda: node.statistics().messages_in == 1)
            with trio.fail_after(PROMPT):
                await alice.ws.aclose()
            assert alice.ws.closed is not None
            assert alice.ws.closed.code == 1000
            assert node.statistics().committed == 0
    finally:
        blocker.close()
    # the message is stored once the lock is free; its ack had no one left to go to
    await eventually(lambda: node.statistics().committed == 1)
    await eventually(lambda: node.statistics().connections == 0)
