"""What the demo shows at the end: each job's audit, the ledger verified twice, the plots.

The audit comes from the same library call as `sparkctl audit`; the ledger is
checked by the Python verifier and, independently, by contrib/verify-ledger.sh
(sqlite3, sha256sum and openssl only), on an online snapshot so both read the
same bytes while the daemon keeps running.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from spark_slurm.demo.scenarios import Check
from spark_slurm.errors import SparkError
from spark_slurm.head.audit import PATH_NAMES, AuditReport, audit_job, kwh_text
from spark_slurm.ledger.snapshot import snapshot
from spark_slurm.ledger.verify import verify_files

Say = Callable[[str], None]


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def render_audit(report: AuditReport) -> list[str]:
    """A compact text form of `sparkctl audit JOBID` for the demo's output."""
    h = report.header
    lines = [f"audit job {report.job_id}: user {h.get('user')}  partition "
             f"{h.get('partition')}  class {h.get('workload_class')}  GPUs "
             + "; ".join(f"{n}: {','.join(map(str, g)) or '-'}" for n, g in h["gpus"].items())]
    several = len({e.node for e in report.timeline}) > 1
    for e in report.timeline:
        mark = "✓" if e.verification.ok else "✗"
        where = f"{e.node:<4} " if several else ""
        line = f"  {_when(e.time_ns)} {where}seq {e.seq:>4} {mark} {e.kind:<9} {e.summary}"
        if e.authority:
            line += f" [{e.authority}]"
        if e.paths is not None:
            line += "  paths " + " ".join(f"{p[:4]}={e.paths.get(p, '-')}" for p in PATH_NAMES)
            line += "  VALID" if e.validated else "  NOT VALIDATED"
        lines.append(line)
    macs = all(e.verification.mac == "ok" for e in report.timeline)
    verified = ("all records verified (" + ("chain, proof, MAC" if macs else "chain, proof")
                + ")" if all(e.verification.ok for e in report.timeline)
                else "NOT every record verified")
    lines.append(f"  energy {kwh_text(report.energy_mj)} kWh; verdict: {verified}"
                 + (", every action validated" if report.ok
                    else f"; {len(report.problems)} problem(s): " + "; ".join(report.problems)))
    return lines


def audit_jobs(ledger: Path, jobs: list[str], plots: Path, say: Say,
               keys_dir: Path | None = None, *,
               expected: Mapping[str, list[str]] | None = None) -> tuple[list[Check], list[Path]]:
    """Print each job's audit (MACs re-checked against `keys_dir`), write its plot,
    and check its verdict: no problem, or for a job whose story causes one on purpose
    (`expected`, the incident), exactly those problems and no other."""
    expected = expected or {}
    checks: list[Check] = []
    written: list[Path] = []
    plots.mkdir(parents=True, exist_ok=True)
    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:
        say("  plots skipped: matplotlib is not installed (pip install 'spark-slurm[plot]')")
    for job in jobs:
        path = plots / f"job-{job}.png"
        try:
            report = audit_job(ledger, job, plot=path if can_plot else None, keys_dir=keys_dir)
        except SparkError as exc:
            checks.append(Check(f"audit of job {job}", False, exc.message))
            continue
        for line in render_audit(report):
            say(line)
        wanted = list(expected.get(job, []))
        detail = ("verified and validated" if report.ok else "; ".join(report.problems))
        if wanted and report.problems == wanted:
            detail = "verified; only the problem its story caused: " + detail
        checks.append(Check(f"audit of job {job}", report.problems == wanted, detail))
        if not can_plot:
            continue
        ok = path.is_file() and path.stat().st_size > 0
        checks.append(Check(f"plot of job {job}", ok, str(path)))
        if ok:
            written.append(path)
    return checks, written


def verify_both(ledger: Path, dest: Path, hmac_key: Path, public_key: Path,
                script: Path) -> list[Check]:
    """Snapshot the live ledger, then verify it with sparkctl's verifier and the shell script."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    snapshot(ledger, dest)
    [report] = verify_files([dest], str(hmac_key), str(public_key), [])
    checks = [Check("sparkctl verify (chain, hashes, HMAC, signed checkpoints)", report.ok,
                    report.summary())]
    res = subprocess.run(["bash", str(script), "--key", str(hmac_key), "--pubkey",
                          str(public_key), str(dest)], capture_output=True, text=True,
                         timeout=300, check=False)
    text = (res.stdout.strip() or res.stderr.strip()).splitlines()
    checks.append(Check("contrib/verify-ledger.sh agrees", res.returncode == 0 and report.ok,
                        f"exit {res.returncode}: {text[-1] if text else ''}"))
    return checks
