"""Benchmark peer: a chat server on Python ``websockets`` using ``websockets.broadcast``.

It speaks the minimal subset of trio-chat's wire protocol the benchmarks use (``welcome``,
``join``/``joined``, ``send`` -> ``message`` to every member plus ``ack`` to the sender), the
way a competent developer would write it with this library: each message is encoded once
and handed to ``broadcast``, which writes to every connection without awaiting.

Run: ``python benchmarks/peers/websockets_server.py --port 8765`` (prints ``ready``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: dict[str, set[ServerConnection]] = {}
names: dict[ServerConnection, str] = {}
ids = itertools.count(1)


async def handler(ws: ServerConnection) -> None:
    query = parse_qs(urlsplit(ws.request.path if ws.request else "/").query)
    name = query.get("name", ["anon"])[0]
    names[ws] = name
    joined: set[str] = set()
    await ws.send(json.dumps({"type": "welcome", "name": name, "node": "websockets"}))
    try:
        async for raw in ws:
            cmd = json.loads(raw)
            kind = cmd.get("type")
            if kind == "join":
                room = str(cmd["room"])
                members = rooms.setdefault(room, set())
                members.add(ws)
                joined.add(room)
                # Members are not listed: with thousands of receivers the reply would
                # dominate the join cost, and the benchmarks do not read it.
                await ws.send(json.dumps({"type": "joined", "room": room, "members": []}))
            elif kind == "send":
                room = str(cmd["room"])
                msg_id = str(next(ids))
                cid = cmd.get("cid")
                event = {
                    "type": "message",
                    "room": room,
                    "id": msg_id,
                    "from": name,
                    "text": cmd["text"],
                    "ts": time.time(),
                    "cid": cid,
                }
                broadcast(rooms.get(room, ()), json.dumps(event))
                await ws.send(json.dumps({"type": "ack", "cid": cid, "id": msg_id}))
            elif kind == "ping":
                await ws.send('{"type":"pong"}')
    finally:
        for room in joined:
            rooms[room].discard(ws)
        names.pop(ws, None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    # Messages are small; the default 1 MiB max_size and 20 s pings are kept as shipped.
    async with serve(handler, args.host, args.port, compression=None):
        print(f"ready {args.host}:{args.port}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
