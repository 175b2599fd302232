"""Denials job_submit.lua spools become PERs on their own, within seconds (issue 16).

A real sparkd with the default `automations.ingest_period_s` (1 s): nothing sends
it an `ingest` request, yet each spooled line becomes an admission PER shortly
after it is appended, a torn line waits for its newline, and nothing is
recorded twice, across a restart too.
"""

from __future__ import annotations

import json
from typing import Any

from tests.integration.daemon.conftest import Sparkd


def _denial(n: int) -> dict[str, Any]:
    return {"v": 1, "time_ns": 1_700_000_000_000_000_000 + n, "decision": "deny",
            "rule": "tenant:students", "reason": "500 W/GPU above 350", "user_id": 4242,
            "user": "u4242", "account": "students", "partition": "gpu",
            "job_name": f"refused-{n}", "request": {"gpus": 2, "watts": 1000},
            "comment": "", "policy_sha256": "ab" * 32}


def _spooled(sparkd: Sparkd) -> list[str]:
    return [str(r["body"]["context"]["job_name"]) for r in sparkd.records("admission")
            if r["body"].get("source") == "spool"]


def test_spooled_denials_become_pers_without_an_ingest_request(sparkd: Sparkd) -> None:
    sparkd.start()
    assert _spooled(sparkd) == []
    with sparkd.spool.open("a") as fh:
        for n in range(15):           # the 15 refusals that used to sit unrecorded
            fh.write(json.dumps(_denial(n)) + "\n")
        fh.write(json.dumps(_denial(15))[:40])           # a line still being written
    sparkd.wait_record(lambda r: r["body"].get("context", {}).get("job_name") == "refused-14",
                       15, "the spooled denials as PERs")
    assert _spooled(sparkd) == [f"refused-{n}" for n in range(15)]
    with sparkd.spool.open("a") as fh:
        fh.write(json.dumps(_denial(15))[40:] + "\n")
    sparkd.wait_record(lambda r: r["body"].get("context", {}).get("job_name") == "refused-15",
                       15, "the finished line as a PER")
    assert sparkd.stop() == 0
    sparkd.start()
    assert _spooled(sparkd) == [f"refused-{n}" for n in range(16)]
