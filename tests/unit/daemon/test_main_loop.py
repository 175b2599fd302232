"""The main loop outlives a bad turn: an error escaping maintenance or the flush of
counted requests must not end sparkd while jobs run (it would take the metrics
endpoint and the socket with it)."""

from __future__ import annotations

import logging
import sqlite3
from typing import cast

import pytest

from spark_slurm.daemon.main import Daemon, turn


class _Daemon:
    def __init__(self, fail_maintain: bool, fail_flush: bool) -> None:
        self.fail_maintain, self.fail_flush = fail_maintain, fail_flush
        self.calls: list[str] = []

    def maintain(self) -> None:
        self.calls.append("maintain")
        if self.fail_maintain:
            raise RuntimeError("journal scan broke")

    def flush_refusals(self) -> None:
        self.calls.append("flush")
        if self.fail_flush:
            raise sqlite3.OperationalError("database is locked")


@pytest.mark.parametrize(("fail_maintain", "fail_flush"),
                         [(True, False), (False, True), (True, True)])
def test_a_failing_turn_is_logged_and_the_loop_goes_on(
        fail_maintain: bool, fail_flush: bool, caplog: pytest.LogCaptureFixture) -> None:
    fake = _Daemon(fail_maintain, fail_flush)
    with caplog.at_level(logging.ERROR, logger="sparkd"):
        turn(cast(Daemon, fake), flush=True)
        turn(cast(Daemon, fake), flush=True)
    assert fake.calls == ["maintain", "flush"] * 2  # a failed maintenance still flushes
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("maintenance turn failed") == 2 * fail_maintain
    assert messages.count("recording counted requests failed") == 2 * fail_flush


def test_the_flush_runs_only_when_due() -> None:
    fake = _Daemon(False, False)
    turn(cast(Daemon, fake), flush=False)
    assert fake.calls == ["maintain"]
