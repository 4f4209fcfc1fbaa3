"""No acknowledged message is lost: a real server stopped mid-stream, then restarted.

Clients send continuously with cids and record every ack. The server process is killed
(SIGKILL: no chance to flush anything) or stopped (SIGTERM) while they send, then
started again on the same data directory. Every acked message must be in the history,
once; the clients then retry everything they never saw acked, as a real client would,
and every cid must end up stored exactly once.
"""

from __future__ import annotations

import json
import secrets
import signal
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from _server_process import ServerProcess

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

ROOM: Final = "general"
SENDERS: Final = 4
# Acks (all senders together) before the server is stopped: well into the stream.
STOP_AFTER: Final = 600
# Sends a client keeps in flight: enough for the node to batch several per commit.
WINDOW: Final = 16


class Sender:
    """A client that sends ``<name>-<n>`` cids as fast as its window allows."""

    def __init__(self, name: str) -> None:
        self.name = name
        # The retry secret: what makes a resend after the reconnect the same send.
        self.url_query = f"?name={name}&client_id={secrets.token_urlsafe(16)}"
        self.sent: list[str] = []
        self.acked: dict[str, str] = {}
        self.duplicates: set[str] = set()

    async def run(self, url: str, on_ack: trio.Condition) -> None:
        """Send until the connection ends (the server goes away)."""
        try:
            async with open_websocket_url(url + self.url_query) as ws:
                await ws.send_message(json.dumps({"type": "join", "room": ROOM}))
                window = trio.Semaphore(WINDOW)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, ws, window, on_ack)
                    while True:
                        await window.acquire()
                        cid = f"{self.name}-{len(self.sent)}"
                        self.sent.append(cid)
                        await ws.send_message(
                            json.dumps({"type": "send", "room": ROOM, "text": cid, "cid": cid})
                        )
        except* (ConnectionClosed, HandshakeError, OSError):
            pass

    async def _read(self, ws: Any, window: trio.Semaphore, on_ack: trio.Condition) -> None:
        while True:
            for line in str(await ws.get_message()).split("\n"):
                event = json.loads(line)
                if event["type"] == "ack":
                    self.acked[event["cid"]] = event["id"]
                    window.release()
                    async with on_ack:
                        on_ack.notify_all()
                elif event["type"] == "error":
                    raise AssertionError(event)

    async def retry_unacked(self, url: str) -> None:
        """Reconnect with the same client_id and resend every cid that got no ack."""
        missing = [cid for cid in self.sent if cid not in self.acked]
        async with open_websocket_url(url + self.url_query) as ws:
            await ws.send_message(json.dumps({"type": "join", "room": ROOM}))
            for cid in missing:
                await ws.send_message(
                    json.dumps({"type": "send", "room": ROOM, "text": cid, "cid": cid})
                )
            while any(cid not in self.acked for cid in missing):
                for line in str(await ws.get_message()).split("\n"):
                    event = json.loads(line)
                    if event["type"] == "ack":
                        self.acked[event["cid"]] = event["id"]
                        if event.get("duplicate"):
                            self.duplicates.add(event["cid"])


async def history(base: str) -> list[dict[str, Any]]:
    """The whole room, oldest first, read page by page through the HTTP API."""
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": 200}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while True:
            resp = await http.get(f"/api/rooms/{ROOM}/messages", params=params)
            resp.raise_for_status()
            body = resp.json()
            pages.append(body["messages"])
            if not body["more"]:
                break
            params["before"] = body["messages"][0]["id"]
    return [m for page in reversed(pages) for m in page]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_every_acked_message_survives_a_stop(tmp_path: Path, signum: int) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    senders = [Sender(f"w{i}") for i in range(SENDERS)]
    try:
        await server.start()
        on_ack = trio.Condition()
        async with trio.open_nursery() as nursery:
            for sender in senders:
                nursery.start_soon(sender.run, server.chat_url, on_ack)
            async with on_ack:
                while sum(len(s.acked) for s in senders) < STOP_AFTER:
                    await on_ack.wait()
            if signum == signal.SIGKILL:
                server.signal(signal.SIGKILL, group=True)  # the server and its worker
            else:
                server.signal(signal.SIGTERM)
            await server.wait_exit()
        acked_before = {cid: mid for s in senders for cid, mid in s.acked.items()}
        assert len(acked_before) >= STOP_AFTER

        await server.start()
        stored = await history(server.http_url)
        ids = [m["id"] for m in stored]
        assert len(ids) == len(set(ids)), "a message id twice in history"
        assert ids == sorted(ids)
        by_cid: dict[str, list[str]] = {}
        for m in stored:
            by_cid.setdefault(m["cid"], []).append(m["id"])
        assert all(len(v) == 1 for v in by_cid.values()), "a cid stored twice"
        lost = {cid for cid in acked_before if by_cid.get(cid) != [acked_before[cid]]}
        assert not lost, f"{len(lost)} acked messages lost, e.g. {sorted(lost)[:5]}"

        async with trio.open_nursery() as nursery:
            for sender in senders:
                nursery.start_soon(sender.retry_unacked, server.chat_url)
        stored = await history(server.http_url)
        cids = [m["cid"] for m in stored]
        assert sorted(cids) == sorted(cid for s in senders for cid in s.sent)
        for sender in senders:
            for cid in sender.sent:
                if cid in acked_before:
                    assert sender.acked[cid] == acked_before[cid]
                elif cid in by_cid:  # stored before the stop, its ack lost with the server
                    assert cid in sender.duplicates
                    assert sender.acked[cid] == by_cid[cid][0]
                else:
                    assert cid not in sender.duplicates
    finally:
        await server.kill()
