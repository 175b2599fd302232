"""A node ledger pruned while sparkd runs on it: the daemon keeps appending, starts
again on the pruned file, and `sparkctl verify` and `sparkctl audit` check what stays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.prune import prune_ledger
from tests.integration.daemon.conftest import VENV_BIN, Sparkd

SPARKCTL = str(VENV_BIN / "sparkctl")


def _sparkctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SPARKCTL, *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_prune_beside_a_running_sparkd(root: Path) -> None:
    sparkd = Sparkd(root / "d", keys=True)
    assert sparkd.keys is not None
    ledger = sparkd.state_dir / "ledger.db"
    sparkd.state_dir.mkdir(parents=True)
    clock = ManualClock()
    # a node that has run a while: 700 records, then its checkpoint
    with Ledger.open(ledger, load_hmac_key(sparkd.keys.hmac_key),
                     load_signing_key(sparkd.keys.signing_key), node="n1", cluster="spark",
                     clock=clock) as led:
        led.append_many([("cap", {"v": 1, "node": "n1", "job_id": str(i // 10),
                                  "power_mw": i}) for i in range(700)])
        led.checkpoint()
    sparkd.add_job("901", gpus=[0, 1])
    sparkd.add_job("902", gpus=[2, 3])
    try:
        sparkd.start()
        assert sparkd.prolog("901", watts=800, gpus=[0, 1])["ok"]
        done = prune_ledger(ledger, root / "d" / "old.seg", before_seq=600, align=256)
        assert done.cut == 512 and done.removed > 500
        assert sparkd.prolog("902", watts=700, gpus=[2, 3])["ok"]  # still writing
        assert sparkd.stop() == 0
        sparkd.start()  # start-up on the pruned ledger: ready, and it appends its reconcile
        assert sparkd.stop() == 0
    finally:
        sparkd.stop()
    out = _sparkctl("verify", str(ledger), "--key", str(sparkd.keys.hmac_key), "--pubkey",
                    str(sparkd.keys.public_key), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    (report,) = json.loads(out.stdout)
    assert report["ok"] and report["hmac_checked"] and report["first_seq"] == 512
    audit = _sparkctl("audit", "902", "--db", str(ledger), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    doc = json.loads(audit.stdout)
    assert doc["verdict"]["ok"], doc["verdict"]
    assert all(e["verified"] for e in doc["timeline"])
    gone = _sparkctl("audit", "5", "--db", str(ledger))
    assert gone.returncode == 2 and "were pruned into old.seg" in gone.stderr
