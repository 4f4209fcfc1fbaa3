"""The failure boundary's accounting: every contained exception counted, logs rate-limited."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trio_chat.server._boundary import FailureBoundary

if TYPE_CHECKING:
    import pytest


def test_counts_every_failure_and_logs_one_traceback_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    boundary = FailureBoundary(clock=lambda: now[0], log_interval=60.0)
    caplog.set_level(logging.ERROR, logger="trio_chat.boundary")
    for _ in range(1000):
        boundary.record("chat_socket", ValueError("boom"), "1.2.3.4:5")
    boundary.record("chat_socket", KeyError("k"))
    boundary.record("http", ValueError("boom"))
    assert boundary.statistics().contained == {
        ("chat_socket", "ValueError"): 1000,
        ("chat_socket", "KeyError"): 1,
        ("http", "ValueError"): 1,
    }
    assert len(caplog.records) == 3
    assert caplog.records[0].exc_info is not None
    now[0] = 60.0
    boundary.record("chat_socket", ValueError("again"))
    assert len(caplog.records) == 4
    assert "999 more like it not logged" in caplog.records[-1].getMessage()
