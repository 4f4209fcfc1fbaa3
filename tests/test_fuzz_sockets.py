"""Socket-level fuzzing: raw handshakes and raw frame sequences against a live server.

Each example starts a real server in-process on 127.0.0.1 (tests/conftest.py), connects
a canary client, then opens a raw TCP socket to the chat socket or to ``/ws`` on
hypercorn's port and sends what the strategies in `_fuzz_strategies` drew: a handshake
(valid, near-valid, another protocol, garbage) or a valid handshake and then a frame
sequence (every opcode, flag, length form, mask, fragmentation, close payload and
payload kind). It reads whatever the server answers until the server closes or a short
deadline passes, and ends the connection one of three ways (half-close, close, reset).

The property, after every example:
- no exception escaped a connection: the node's failure boundary contained nothing,
  nothing was logged at ERROR, and the node is still the app's running node;
- what the server wrote parses: an HTTP response, and after a 101 only well-formed
  server frames, JSON events, and nothing after a close frame;
- the canary, connected all along, receives the message a second client sends after
  the example, which gets its own message back and its ack;
- every connection is gone once its client is.

``make test`` runs 50 examples per test (plus the issue's cases) and does not shrink a
failure. ``make fuzz`` runs a campaign: set ``TRIO_CHAT_FUZZ_MINUTES`` (the Makefile's
default is 10), shared by the four tests. It runs rounds of examples, each with a fresh
seed (printed, and appended to ``.fuzz/seeds.log``), keeps hypothesis's example database
in ``.fuzz/examples`` (so failures found once are replayed first next time) and writes
each falsifying input to ``.fuzz/failures/``: the last one written for a test is the
shrunk example.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import hypothesis
import pytest
import trio
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from _fuzz_strategies import (
    FOUND_HANDSHAKES,
    ISSUE_FRAME_SEQUENCES,
    ISSUE_HANDSHAKES,
    encode_sequence,
    frame_sequences,
    handshakes,
    valid_handshake,
)
from conftest import eventually, make_settings, start_server

if TYPE_CHECKING:
    from collections.abc import Callable

    from _fuzz_strategies import Frame, Junk

ROOT: Final = Path(__file__).resolve().parent.parent
FUZZ_DIR: Final = ROOT / ".fuzz"
#: The campaign's length for all fuzz tests together; unset or 0: the quick run.
CAMPAIGN_MINUTES: Final = float(os.environ.get("TRIO_CHAT_FUZZ_MINUTES") or 0)
FUZZ_TESTS: Final = 4
QUICK_EXAMPLES: Final = 50
ROUND_EXAMPLES: Final = 250
#: Wall-clock bound of one example, server start and stop included.
EXAMPLE_TIMEOUT: Final = 20.0
#: How long to wait for more of the server's answer before giving up on it.
READ_DEADLINE: Final = 0.3
#: How long sending may block (a server that stopped reading, say).
SEND_DEADLINE: Final = 2.0
CANARY_ROOM: Final = "canary"
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
if CAMPAIGN_MINUTES > 0:
    _SETTINGS = hypothesis.settings(
        max_examples=ROUND_EXAMPLES,
        database=DirectoryBasedExampleDatabase(FUZZ_DIR / "examples"),
        suppress_health_check=_HEALTH,
        print_blob=True,
    )
else:
    # No shrinking in the quick run: a failure is reported at once, as found (make
    # fuzz shrinks it), and make test stays bounded in time.
    _SETTINGS = hypothesis.settings(
        max_examples=QUICK_EXAMPLES,
        suppress_health_check=_HEALTH,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )

#: How the fuzz client ends: half-close and read to the end, read then close, or reset.
endings = st.sampled_from(["eof", "read", "reset"])
#: Sizes of the first pieces the bytes are sent in (the server sees partial reads).
splits = st.lists(st.integers(1, 64), max_size=3)

# quart-trio's TrioFileBody opens the page's file, then awaits a seek before its
# ``async with`` is entered: a client that resets the connection while the page is being
# sent cancels it there, and the file is left to the garbage collector (CPython closes it
# at once). A library bug outside trio-chat, not a descriptor leak.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <_io.FileIO:pytest.PytestUnraisableExceptionWarning"
)


def test_handshakes_leave_the_server_serving(
    transport: str,
    connect: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pytestconfig: pytest.Config,
) -> None:
    @_SETTINGS
    @given(first=handshakes(), ending=endings, split=splits)
    @_issue_cases("first", ISSUE_HANDSHAKES + FOUND_HANDSHAKES)
    def one(first: bytes, ending: str, split: list[int]) -> None:
        _record_failure(
            f"handshake-{transport}",
            dict(first=first, ending=ending, split=split),
            lambda: trio.run(_run_one, transport, connect, tmp_path, first, None, ending, split),
        )

    _campaign(one, f"handshake-{transport}", capsys, pytestconfig)


def test_frame_sequences_leave_the_server_serving(
    transport: str,
    connect: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pytestconfig: pytest.Config,
) -> None:
    @_SETTINGS
    @given(frames=frame_sequences, ending=endings, split=splits)
    @_issue_cases("frames", ISSUE_FRAME_SEQUENCES)
    def one(frames: list[Frame | Junk], ending: str, split: list[int]) -> None:
        data = encode_sequence(frames)
        _record_failure(
            f"frames-{transport}",
            dict(frames=frames, ending=ending, split=split),
            lambda: trio.run(
                _run_one, transport, connect, tmp_path, valid_handshake(), data, ending, split
            ),
        )

    _campaign(one, f"frames-{transport}", capsys, pytestconfig)


def _issue_cases(name: str, cases: list[Any]) -> Callable[[Any], Any]:
    """Try each case of issue 9 (and each found since) as an explicit example, every run."""

    def decorate(test: Any) -> Any:
        for case in reversed(cases):
            test = example(**{name: case, "ending": "read", "split": []})(test)
        return test

    return decorate


# --- one example -----------------------------------------------------------------------


async def _run_one(
    transport: str,
    connect: Any,
    data_dir: Path,
    first: bytes,
    frames: bytes | None,
    ending: str,
    split: list[int],
) -> None:
    errors = _ErrorRecords()
    logging.getLogger().addHandler(errors)
    try:
        with trio.fail_after(EXAMPLE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery, _fuzz_settings(data_dir))
                node = server.node
                url = server.url(transport)
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                async with connect(url, "canary") as canary:
                    await canary.join(CANARY_ROOM)
                    reply = await _attack(port, first, frames, ending, split)
                    _check_reply(first, reply)
                    async with connect(url, "late") as late:
                        await late.join(CANARY_ROOM)
                        await late.send(type="send", room=CANARY_ROOM, text="still here", cid="c")
                        await late.expect("message", text="still here", cid="c")
                        await late.expect("ack", cid="c")
                    seen = await canary.next_of("message")
                    assert seen["text"] == "still here", seen
                await eventually(lambda: not node.sessions)
                await eventually(lambda: not node.chat_socket.connections)
                assert node.failures.statistics().contained == {}
                assert server.app.node is node, "the node stopped"
                server.shutdown.set()
    finally:
        logging.getLogger().removeHandler(errors)
    assert not errors.records, "\n".join(map(logging.Formatter().format, errors.records))


def _fuzz_settings(data_dir: Path) -> Any:
    # Tight limits, so that a few generated frames reach the rate limiter's strikes and
    # the size limit's close. The fuzzer connects from 127.0.0.1: as a trusted proxy, its
    # forwarding headers are parsed.
    return make_settings(
        data_dir,
        store="memory",
        rate_limit=10,
        rate_burst=5,
        rate_strikes=5,
        max_frame=4096,
        trusted_proxies=frozenset({"127.0.0.1/32"}),
    )


async def _attack(
    port: int, first: bytes, frames: bytes | None, ending: str, split: list[int]
) -> bytes:
    """Send ``first`` (then, after a 101, ``frames``) on a raw socket; return the answer."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    reply = bytearray()
    try:
        open_ = await _send(stream, first, split)
        if frames is not None:
            while b"\r\n\r\n" not in reply:
                chunk = await stream.receive_some()
                assert chunk, f"no answer to a valid handshake: {bytes(reply)!r}"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 101 "), bytes(reply)
            open_ = await _send(stream, frames, split)
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return bytes(reply)
        if ending == "eof" and open_:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_eof()
        with trio.move_on_after(READ_DEADLINE):
            while chunk := await _receive(stream):
                reply += chunk
        return bytes(reply)
    finally:
        await stream.aclose()


async def _send(stream: trio.SocketStream, data: bytes, split: list[int]) -> bool:
    """Send ``data`` in pieces; False if the server closed or stopped reading first."""
    pieces, rest = [], data
    for size in split:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    with trio.move_on_after(SEND_DEADLINE):
        try:
            for piece in pieces:
                if piece:
                    await stream.send_all(piece)
        except trio.BrokenResourceError:
            return False
        return True
    return False


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some()
    except trio.BrokenResourceError:  # reset by the server
        return b""


def _check_reply(request: bytes, reply: bytes) -> None:
    """What the server wrote is HTTP, then (after a 101) well-formed server frames."""
    if not reply or request.startswith(H2_PREFACE):
        return  # hypercorn speaks HTTP/2 to a client that opens with its preface
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    head, sep, rest = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 ") or not sep:
        return
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(rest)
    text: list[str] = []
    closed = False
    try:
        for frame in parser.received_frames():
            assert not closed, f"a frame after the close frame: {frame}"
            if frame.opcode is Opcode.CLOSE:
                closed = True
            elif frame.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
                assert isinstance(frame.payload, str)
                text.append(frame.payload)
                if frame.message_finished:
                    for line in "".join(text).split("\n"):
                        assert "type" in json.loads(line), line
                    text = []
            else:
                assert frame.opcode in (Opcode.PING, Opcode.PONG), frame
    except ParseFailed as exc:
        raise AssertionError(f"the server wrote a bad frame: {exc}: {rest[:300]!r}") from None


class _ErrorRecords(logging.Handler):
    """Collects what was logged at ERROR or above: an exception the server did not handle."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --- the campaign ----------------------------------------------------------------------


def _campaign(
    run_examples: Callable[[], None],
    name: str,
    capsys: pytest.CaptureFixture[str],
    pytestconfig: pytest.Config,
) -> None:
    """Run the examples once (the quick run), or round after round until the budget is spent.

    Hypothesis draws a seed per round; each is printed to the terminal as the round ends
    (past pytest's capture) and appended to ``.fuzz/seeds.log``. ``--hypothesis-seed=<seed>``
    replays one round. The rounds are not seeded here: hypothesis keeps failing examples
    in its database only for the rounds it seeded itself.
    """
    if CAMPAIGN_MINUTES <= 0:
        run_examples()
        return
    FUZZ_DIR.mkdir(exist_ok=True)
    forced = pytestconfig.getoption("hypothesis_seed", None)
    deadline = time.monotonic() + CAMPAIGN_MINUTES * 60 / FUZZ_TESTS
    rounds = 0
    while time.monotonic() < deadline:
        try:
            run_examples()
        finally:
            # Where hypothesis keeps the seed it drew for the last run of this test.
            seed = getattr(run_examples, "_hypothesis_internal_use_generated_seed", None)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            _say(capsys, f"{stamp} {name} round {rounds} seed {seed or forced}")
        rounds += 1
        if forced is not None:
            break
    _say(capsys, f"{name}: {rounds} rounds of {ROUND_EXAMPLES} examples, no failure")


def _say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(line, flush=True)
    with (FUZZ_DIR / "seeds.log").open("a") as log:
        log.write(line + "\n")


def _record_failure(name: str, inputs: dict[str, Any], run: Callable[[], None]) -> None:
    """Run one example; in a campaign, save its inputs if it fails (the last is minimal)."""
    try:
        run()
    except Exception:
        if CAMPAIGN_MINUTES > 0:
            folder = FUZZ_DIR / "failures"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text(
                "".join(f"{k} = {v!r}\n" for k, v in inputs.items()) + "\n" + traceback.format_exc()
            )
        raise
