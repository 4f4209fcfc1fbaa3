"""The terminal client: ``trio-chat client URL --name alice --room general``.

Theory of operation: one task reads stdin lines (in a thread, so pipes and terminals both
work) into a bounded channel; one task turns them into commands and sends; one connection
loop keeps a WebSocket open, reconnecting with exponential backoff and jitter. The client's
state outlives any one connection:

- per room, the ids already printed (so a replay never prints a message twice) and the
  highest id seen, sent as ``since`` when the room is joined again after a reconnect;
- the outbox: every ``send`` with its ``cid`` until the server acks it. After a reconnect
  the outbox is sent again; the server stores a ``cid`` once per ``client_id``, so a
  retry is never a duplicate.

On a terminal, the prompt is prompt_toolkit's (``_screen``, which says why):
incoming lines are printed above it and the line being typed is redrawn intact; a status
line under it shows the current room and who is typing there. Piped stdin is read line by
line as before.

A connection the server refuses for good (HTTP 400, 403, 404, 426, a name it refuses,
the auth close codes 4001-4003) ends the run with one plain sentence and exit status 1:
trying again would be refused the same way. Everything else (connection refused, 503 over
the connection cap, closes 1001, 1006, 1008, 1011, 4008) is transient and retried with
backoff, as before.

The ``client_id`` (sent as ``?client_id=``) is a random secret made once per run: the
outbox lives in this process's memory only, so no retry outlives the run, and a file
would be state to guard and share between runs for nothing. It is never the name,
which anyone can ask for.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

import trio

from ._chat import ChatClient

if TYPE_CHECKING:
    import argparse

#: Exit status after a refusal for good; 2 is a bad command line, 130 Ctrl-C.
EXIT_REFUSED: Final = 1
EXIT_INTERRUPTED: Final = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``client`` command's arguments to ``parser``.

    Args:
        parser: The (sub)parser of the ``client`` command.
    """
    parser.add_argument(
        "url",
        help="chat socket URL, e.g. ws://127.0.0.1:8001/ws or ws://127.0.0.1:8000/ws",
    )
    parser.add_argument(
        "--name",
        default=os.environ.get("USER") or "guest",
        help="nickname (the server may add a suffix if it is taken; default: $USER)",
    )
    parser.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="ROOM",
        help="room to join at start; repeat for several (default: general)",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="longest wait between reconnection attempts (default: 8)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the terminal client until ``/quit``, end of input, Ctrl-C or a refusal.

    Args:
        args: Parsed arguments, as declared by :func:`add_arguments`.

    Returns:
        The process exit status: 0 after ``/quit`` or end of input (Ctrl-D), 1 when the
        server refused the connection for good, 2 for a bad URL, 130 after Ctrl-C (as a
        shell reports a program ended by SIGINT).
    """
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        print(f"trio-chat client: {exc}", file=sys.stderr)
        return 2
    rooms = args.rooms or ["general"]
    on_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        if on_terminal:
            interrupted, failure = _run_on_terminal(url, args, rooms)
        else:
            client = ChatClient(
                url, name=args.name, rooms=rooms, max_backoff=args.max_backoff, out=sys.stdout
            )
            trio.run(client.run_until_quit, _read_stdin_lines)
            interrupted, failure = False, client.failure
    except KeyboardInterrupt:
        # SIGINT outside the prompt (piped stdin, or between two prompts).
        return EXIT_INTERRUPTED
    if failure is not None:
        # A prompt its thread had no time to erase may still be on the line: clear it.
        erase = "\r\x1b[K" if on_terminal else ""
        print(f"{erase}trio-chat client: {failure}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_INTERRUPTED if interrupted else 0


def _run_on_terminal(
    url: str, args: argparse.Namespace, rooms: list[str]
) -> tuple[bool, str | None]:
    """Run with prompt_toolkit's prompt; return (interrupted, failure)."""
    # Imported here: piped runs (scripts, tests) do without prompt_toolkit's start-up cost.
    from prompt_toolkit.patch_stdout import patch_stdout

    from ._screen import TerminalScreen

    with patch_stdout():
        # sys.stdout is now the proxy that prints above the prompt.
        client = ChatClient(
            url, name=args.name, rooms=rooms, max_backoff=args.max_backoff, out=sys.stdout
        )
        screen = TerminalScreen(
            client.prompt, on_typing=client.note_typing, on_interrupt=client.stop
        )
        client.set_status_callback(screen.set_status)
        trio.run(client.run_until_quit, screen.read_lines)
    return screen.interrupted, client.failure


def normalize_url(url: str) -> str:
    """Turn what a user types into a WebSocket URL.

    ``http(s)://`` becomes ``ws(s)://`` and an empty path (or ``/``, the page's URL)
    becomes ``/ws``.

    Args:
        url: The URL given on the command line.

    Returns:
        A ``ws://`` or ``wss://`` URL.

    Raises:
        ValueError: The URL has another scheme or no host.
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or http:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


async def _read_stdin_lines(send: trio.MemorySendChannel[str]) -> None:
    """Forward stdin lines into ``send``; close it at end of input.

    A thread reads, because a blocking read works the same on a pipe, a file and a
    terminal (a non-blocking ``FdStream`` on fd 0 would also flip the terminal's mode
    under the shell).

    Cancellation: abandons the blocked reader thread, which ends with the process.
    """
    async with send:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            await send.send(line.rstrip("\r\n"))
