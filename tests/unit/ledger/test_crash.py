"""kill -9 at random moments: every append that returned is present, the chain verifies."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key
from spark_slurm.ledger.reader import read_records

CHILD = r"""
import sys
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
path, keys, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
led = Ledger.open(path, load_hmac_key(keys + "/hmac.key"), load_signing_key(keys + "/node.key"),
                  node="n1", epoch_seconds=1, checkpoint_interval_s=0.05)
i = start
while True:
    if i % 7 == 0:
        receipts = led.append_many([("cap", {"job_id": str(i), "n": n}) for n in range(5)])
    else:
        receipts = [led.append("cap", {"job_id": str(i), "n": 0})]
    for r in receipts:
        sys.stdout.write(f"{r.seq} {r.hash}\n")
        sys.stdout.flush()
    if i % 5 == 0:
        led.maintain()
    i += 1
"""


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    files = keygen(tmp_path / "keys")
    path = tmp_path / "l.db"
    rng = random.Random(1234)
    acked: dict[int, str] = {}
    for round_ in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(tmp_path / "keys"),
                                  str(round_ * 1000)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        # Odd rounds: SIGKILL at a random moment from the start, often mid-open.
        # Even rounds: after the first acknowledgement, however slow the start is
        # on a loaded machine, so the run always holds appends to look for.
        first = "" if round_ % 2 else child.stdout.readline()
        time.sleep(rng.uniform(0.2, 1.2))
        child.kill()
        out = first + child.stdout.read()  # the same buffered reader readline used
        child.stdout.close()
        child.wait(timeout=30)
        # A line is an acknowledgement only when complete: the kill may cut the last.
        for line in out.split("\n")[:-1]:
            seq, digest = line.split()
            acked[int(seq)] = digest
    assert acked, "the child never acknowledged an append"
    stored = {r.seq: r.hash for r in read_records(path)}
    missing = {s: h for s, h in acked.items() if stored.get(s) != h}
    assert missing == {}
    report = verify_ledger(path, load_hmac_key(files.hmac_key))
    assert report.ok, report.summary()
    with Ledger.open(path, node="n1", epoch_seconds=1) as led:  # still writable afterwards
        led.append("cap", {"after": 1})
    assert verify_ledger(path, load_hmac_key(files.hmac_key)).ok
