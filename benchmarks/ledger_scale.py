"""Ledger at scale: `sparkctl verify` and sparkd start-up on node ledgers of millions.

Sizes come from SPARK_BENCH_LEDGER_SIZES (comma-separated PER counts, default
1000000; e.g. `SPARK_BENCH_LEDGER_SIZES=1000000,10000000 make bench`; 0 skips the
section). Each
ledger is generated once by gen_node_ledger and reused from benchmarks/out/.
Every figure stands beside a baseline from the same run:

- verify: wall time and peak RSS of the whole process tree (the verifier and its
  workers), against a read + SHA-256 floor, a separate process that reads the
  same rows (prev_hash, body, in seq order) and hashes each once, on one core;
- sparkd start-up: from exec to the first answered `status`, and the tree's peak
  RSS, on a copy of the 1M ledger, against the same daemon on a new ledger.

    python -m benchmarks.ledger_scale floor LEDGER   # the floor, on its own
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import gen_node_ledger, harness, treerss
from spark_slurm.ledger import scan_worker

BIN = Path(sys.executable).parent
SIZES_ENV = "SPARK_BENCH_LEDGER_SIZES"
STARTUP_PERS = 1_000_000
STARTS = 3
POLICY = """\
version: 1
gpu: {default_watts: 500, min_watts: 200, max_watts: 1000, on_exceed: clamp}
thermal: {enabled: false}
facility: {before_s: 1, after_s: 1}
"""


def sizes() -> list[int]:
    raw = os.environ.get(SIZES_ENV, str(STARTUP_PERS))
    return [int(x.replace("_", "")) for x in raw.split(",") if x.strip()]


def floor(path: Path) -> int:
    """Read every row's prev_hash and body in seq order and SHA-256 them once, in
    pages of scan_worker.PAGE rows (the verifier's page: smaller pages stay in
    cache, which makes this floor faster too)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    sha = hashlib.sha256
    n = 0
    cur = conn.execute("SELECT prev_hash, body FROM per ORDER BY seq")
    while rows := cur.fetchmany(scan_worker.PAGE):
        for prev, body in rows:
            sha(prev + body).digest()
        n += len(rows)
    conn.close()
    return n


def _verify_figures(pers: int) -> tuple[list[harness.Figure], list[str]]:
    made = gen_node_ledger.cached(pers)
    count = _count(made.path)
    base = treerss.run([sys.executable, "-m", "benchmarks.ledger_scale", "floor",
                        str(made.path)])
    plain = treerss.run([str(BIN / "sparkctl"), "verify", str(made.path)])
    keyed = treerss.run([str(BIN / "sparkctl"), "verify", "--key", str(made.hmac_key),
                         str(made.path)])
    again = treerss.run([sys.executable, "-m", "benchmarks.ledger_scale", "floor",
                         str(made.path)])
    for r in (base, plain, keyed, again):
        if r.returncode != 0:
            raise RuntimeError(f"a measured command failed: {r.output[-500:]}")
    floor_s = min(base.wall_s, again.wall_s)
    floor_rss = max(base.peak_rss_mib, again.peak_rss_mib)
    label = f"{pers / 1e6:g}M"
    figures = [
        harness.Figure(f"sparkctl verify, {label} PER", count / plain.wall_s, "PER/s",
                       "read + SHA-256 floor, one core", count / floor_s,
                       "≥ 0.4 × floor", plain.wall_s <= floor_s / 0.4),
        harness.Figure(f"sparkctl verify --key (HMAC), {label} PER", count / keyed.wall_s,
                       "PER/s", "read + SHA-256 floor, one core", count / floor_s),
        harness.Figure(f"sparkctl verify peak RSS, whole process tree, {label} PER",
                       plain.peak_rss_mib, "MiB", "floor's peak RSS", floor_rss,
                       "≤ 256 MiB", plain.peak_rss_mib <= 256),
        harness.Figure(f"sparkctl verify --key peak RSS, whole tree, {label} PER",
                       keyed.peak_rss_mib, "MiB", "floor's peak RSS", floor_rss,
                       "≤ 256 MiB", keyed.peak_rss_mib <= 256),
    ]
    notes = [f"{label}: {count:,} records, {made.path.stat().st_size / 2**30:.1f} GiB; "
             f"verify {plain.wall_s:.1f} s, with key {keyed.wall_s:.1f} s, floor "
             f"{floor_s:.1f} s (best of the floor run before and after)."]
    return figures, notes


def _count(path: Path) -> int:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT max(seq) + 1 FROM per").fetchone()[0])
    finally:
        conn.close()


def _daemon_dir(root: Path, ledger: Path | None, made: gen_node_ledger.NodeLedger) -> Path:
    """A sparkd config over 8 sim GPUs, with the node ledger's keys."""
    from spark_slurm.gpu.sim import SimFleet  # noqa: PLC0415

    root.mkdir()
    SimFleet.init(root / "sim", 8, "b200")
    (root / "policy.yaml").write_text(POLICY)
    if ledger is not None:
        shutil.copy(ledger, root / "ledger.db")
    (root / "sparkd.yaml").write_text(
        f"node: {gen_node_ledger.NODE}\ncluster: {gen_node_ledger.CLUSTER}\n"
        f"state_dir: {root / 'state'}\nledger: {root / 'ledger.db'}\n"
        f"keys: {{hmac: {made.hmac_key}, signing: {made.signing_key}}}\n"
        f"socket: {{path: {root / 'sparkd.sock'}}}\n"
        f"gpu: {{backend: sim, state_dir: {root / 'sim'}}}\npolicy: {root / 'policy.yaml'}\n"
        f"journal_path: {root / 'journal.jsonl'}\nmetrics: {{port: 0}}\n")
    return root


def _start(root: Path) -> tuple[float, float]:
    """Seconds from exec to the first answered status, and the tree's peak RSS then."""
    import subprocess  # noqa: PLC0415

    from spark_slurm.daemon import client  # noqa: PLC0415
    from spark_slurm.errors import DaemonUnavailable  # noqa: PLC0415

    sock = root / "sparkd.sock"
    log = (root / "sparkd.log").open("ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "sparkd"), "--config", str(root / "sparkd.yaml")],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    peak = 0
    try:
        while True:
            peak = max(peak, treerss.tree_rss_kib(proc.pid))
            try:
                if client.request({"op": "status"}, sock, timeout_s=10).get("ok"):
                    break
            except DaemonUnavailable:
                time.sleep(0.005)
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError("sparkd did not start: "
                                   + (root / "sparkd.log").read_text()[-2000:])
        ready = time.perf_counter() - t0
        peak = max(peak, treerss.tree_rss_kib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return ready, peak / 1024


def _startup_figures() -> tuple[list[harness.Figure], list[str]]:
    made = gen_node_ledger.cached(STARTUP_PERS)
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=gen_node_ledger.OUT))
    try:
        big = _daemon_dir(tmp / "big", made.path, made)
        small = _daemon_dir(tmp / "small", None, made)
        runs: dict[str, list[tuple[float, float]]] = {"big": [], "small": []}
        for _ in range(STARTS):
            for name, root in (("big", big), ("small", small)):
                runs[name].append(_start(root))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ready = statistics.median(r for r, _ in runs["big"])
    base = statistics.median(r for r, _ in runs["small"])
    rss = max(m for _, m in runs["big"])
    base_rss = max(m for _, m in runs["small"])
    figures = [
        harness.Figure(f"sparkd start-up to ready, {STARTUP_PERS / 1e6:g}M-PER ledger (p50)",
                       ready, "s", "same, new ledger", base, "≤ 1 s", ready <= 1.0),
        harness.Figure(f"sparkd start-up peak RSS, {STARTUP_PERS / 1e6:g}M-PER ledger",
                       rss, "MiB", "same, new ledger", base_rss, "≤ 256 MiB", rss <= 256),
    ]
    notes = [f"sparkd start-up: median of {STARTS} starts (alternating with the baseline) "
             "from exec until `status` answers, HMAC and signing keys on, 8 sim GPUs; each "
             "start reads the policy, the signing key, each GPU's last limit and the "
             "ingest cursors through the ledger's indexes and appends its `reconcile`."]
    return figures, notes


def section() -> harness.Section:
    sec = harness.Section(
        "Ledger at scale: verify and sparkd start-up",
        f"{SIZES_ENV}=1000000,10000000 .venv/bin/python -m benchmarks bench_ledger")
    for pers in sizes():
        figures, notes = _verify_figures(pers)
        sec.figures += figures
        sec.notes += notes
    figures, notes = _startup_figures()
    sec.figures += figures
    sec.notes += notes
    sec.notes.append(
        f"Node ledgers from benchmarks/gen_node_ledger.py (real appends: HMAC epochs, seals, "
        f"checkpoints every 900 s of ledger time; jobs of cap → facility → restore → "
        f"facility). Machine: {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end (other work shares this machine).")
    return sec


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "floor":
        print(floor(Path(argv[1])))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
