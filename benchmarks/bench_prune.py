"""Node ledger retention: `sparkctl ledger prune` on a 1M-PER node ledger.

Each figure beside a baseline of the same run: the prune (archive segment written
and checked, kept records proven, rows removed) against a raw SQLite copy of the
same range into a new file plus a raw DELETE of it, on a second copy of the same
ledger; `sparkctl verify` of the pruned ledger against the read + SHA-256 floor over
the rows it still holds.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks import gen_node_ledger, harness
from benchmarks.bench_head import in_child
from benchmarks.ledger_scale import floor

PERS = 1_000_000
KEEP = 100_000  # about the newest tenth stays
RSS_LIMIT_MIB = 256


def _raw(path: Path, archive: Path, cut: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    t = time.perf_counter()
    conn.execute("ATTACH ? AS a", (str(archive),))
    conn.execute("CREATE TABLE a.per AS SELECT * FROM main.per WHERE seq < ?", (cut,))
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM per WHERE seq > 0 AND seq < ?", (cut,))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


def run() -> list[harness.Section]:
    made = gen_node_ledger.cached(PERS)
    with tempfile.TemporaryDirectory(prefix="bench-prune-", dir=made.path.parent) as tmp:
        work = Path(tmp)
        ours, raw = work / "ours.db", work / "raw.db"
        shutil.copy(made.path, ours)
        shutil.copy(made.path, raw)
        size = int(sqlite3.connect(ours).execute("SELECT max(seq) + 1 FROM per").fetchone()[0])
        pruned = in_child(
            "import json, time\n"
            "from spark_slurm.ledger.prune import prune_ledger\n"
            "t = time.perf_counter()\n"
            f"r = prune_ledger({str(ours)!r}, {str(work / 'archive.seg')!r}, "
            f"before_seq={size - KEEP})\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, **r.to_json()}))\n")
        cut = int(pruned.result["cut"])
        raw_s = _raw(raw, work / "raw-archive.db", cut)
        verify = in_child(
            "import json, time\n"
            "from spark_slurm.ledger.verify import verify_ledger\n"
            "from spark_slurm.ledger.keys import load_hmac_key\n"
            "t = time.perf_counter()\n"
            f"r = verify_ledger({str(ours)!r}, load_hmac_key({str(made.hmac_key)!r}))\n"
            "assert r.ok, r.reason\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'count': r.count}))\n")
        t = time.perf_counter()
        held = floor(ours)
        floor_s = time.perf_counter() - t
        archive_bytes = (work / "archive.seg").stat().st_size
    removed = int(pruned.result["removed"])
    sec = harness.Section("Node ledger retention: prune", ".venv/bin/python -m benchmarks "
                          "bench_prune")
    sec.figures += [
        harness.Figure(f"prune {removed:,} of {size:,} PER (archive, check, prove, remove)",
                       pruned.seconds, "s", "raw copy of the range to a new file + DELETE",
                       raw_s),
        harness.Figure("peak RSS of the prune process", pruned.rss_mib, "MiB",
                       target=f"≤ {RSS_LIMIT_MIB} MiB", met=pruned.rss_mib <= RSS_LIMIT_MIB),
        harness.Figure("archive segment size per record", archive_bytes / max(1, cut), "bytes"),
        harness.Figure(f"sparkctl verify --key of the pruned ledger ({held:,} rows held)",
                       held / verify.seconds, "PER/s", "read + SHA-256 floor of those rows, "
                       "one core", held / floor_s),
        harness.Figure("peak RSS of verify, pruned ledger", verify.rss_mib, "MiB",
                       target=f"≤ {RSS_LIMIT_MIB} MiB", met=verify.rss_mib <= RSS_LIMIT_MIB),
    ]
    sec.notes.append(
        f"The cut: seq {cut:,} (a multiple of 16,384 at or before {size - KEEP:,}); kept below "
        f"it: {pruned.result['kept']} records (genesis, key, policy, reconcile, newest ingest "
        "record), each with its inclusion proof. Ledger from benchmarks/gen_node_ledger.py, "
        f"copied twice; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the "
        "end (the machine is shared: ratios are the comparable part).")
    return [sec]
