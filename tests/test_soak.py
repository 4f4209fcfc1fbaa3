"""The soak benchmark's smoke run: a minute of churn and hostile input against a real server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

if TYPE_CHECKING:
    import subprocess

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
#: Descriptors above the start level still counted as "back" (as in benchmarks/soak.py).
FD_SLACK = 2


@pytest.mark.timeout(240)
async def test_soak_smoke_loses_nothing_and_gives_back_every_descriptor(tmp_path: Path) -> None:
    done: subprocess.CompletedProcess[bytes] = await trio.run_process(
        [sys.executable, str(SOAK), "--smoke", "--results", str(tmp_path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")[-4000:]
    assert done.returncode == 0, output
    (run,) = json.loads((tmp_path / "soak.json").read_text())["runs"]
    assert run["server_alive"], output
    assert run["acked"] > 100, output
    assert run["lost"] == 0, output
    assert run["counts"]["resumes"] > 0
    assert run["counts"]["resets"] > 0
    assert set(run["hostile"]) == {
        "not_http",
        "plain_get",
        "no_key",
        "wrong_version",
        "tls_hello",
        "unmasked_frame",
        "reserved_opcode",
        "big_ping",
        "bad_close_code",
        "bad_utf8",
        "continuation_first",
        "nested_json",
        "ping_after_close",
        "flood",
        "half_frame_reset",
    }
    assert run["fds_end"] <= run["fds_start"] + FD_SLACK, output
    assert (tmp_path / "soak.png").stat().st_size > 0
