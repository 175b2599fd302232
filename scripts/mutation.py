"""`make mutation`: mutation testing with mutmut, by module group, outside `make test`.

mutmut copies spark_slurm/ and tests/ into mutants/, runs the mapped tests once
to learn which tests execute which function, then runs each mutant only against
those tests in forked workers, so a group is affordable on two cores. Groups map
the modules of issue 21 to the test directories that cover them; mutmut narrows
that further per function.

    python scripts/mutation.py GROUP...   (policy nvml facility automations pipeline
                                           ledger merge, or `all`)
    python scripts/mutation.py --survivors   the issue's hand-made survivors, each
                                             applied and shown killed

Results stay in mutants/ (gitignored); `mutmut results` and `mutmut show NAME`
explain each one. docs/testing.md lists the survivors and why each is equivalent
or which test kills it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]

# group -> mutant name globs (module paths as mutmut names them)
GROUPS: dict[str, list[str]] = {
    "policy": ["spark_slurm.policy.evaluate.*", "spark_slurm.policy.lua.*",
               "spark_slurm.policy.model.*"],
    "nvml": ["spark_slurm.gpu.nvml.*", "spark_slurm.gpu.mapping.*"],
    "facility": ["spark_slurm.daemon.facility.*"],
    "automations": ["spark_slurm.daemon.automations.*"],
    "pipeline": ["spark_slurm.daemon.pipeline.*", "spark_slurm.daemon.actuation.*"],
    "ledger": ["spark_slurm.ledger.*"],
    "merge": ["spark_slurm.head.merge.*", "spark_slurm.head.scan.*",
              "spark_slurm.head.scan_worker.*"],
}

# The single-line changes issue 21 found surviving, each with the tests that must
# now fail under it: (file, original, mutant, test).
SURVIVORS = [
    ("spark_slurm/policy/evaluate.py", "        if requested > hi:",
     "        if requested >= hi:", "tests/unit/policy/test_evaluate.py"),
    ("slurm/job_submit.lua", "  if watts > hi then", "  if watts > hi + 1 then",
     "tests/unit/lua/test_boundaries.py"),
    ("slurm/job_submit.lua", "  if watts > hi then", "  if watts > hi + 1 then",
     "tests/unit/lua/test_agrees_with_python.py"),
    ("spark_slurm/policy/evaluate.py", "if asked > req.current_mw:",
     "if asked > req.current_mw + 1000:", "tests/unit/policy/test_evaluate.py"),
    ("spark_slurm/daemon/facility.py", "abs(delta - expected) <= tolerance",
     "abs(delta - expected) < tolerance", "tests/unit/daemon/test_facility.py"),
    ("spark_slurm/daemon/ingest.py",
     '            best = Cursor(int(where["inode"]), int(where["end"]))',
     '            best = best or Cursor(int(where["inode"]), int(where["end"]))',
     "tests/unit/daemon/test_ingest.py"),
    ("spark_slurm/daemon/automations.py", "if reset and observed == limits.default_mw:",
     "if reset or observed == limits.default_mw:", "tests/unit/daemon/test_monitor_causes.py"),
    ("spark_slurm/daemon/automations.py", "held = held and avg <= expected + slack",
     "held = held and avg <= 2 * expected", "tests/unit/daemon/test_monitor_causes.py"),
    ("spark_slurm/gpu/nvml.py", "temp_c * 1000", "temp_c",
     "tests/unit/gpu/test_backend_contract.py"),
    ("spark_slurm/gpu/nvml.py", "temp_c * 1000", "temp_c", "tests/unit/gpu/test_nvml_driver.py"),
]


def check_survivors() -> int:
    """Apply each listed mutation by hand, run its tests, put the file back."""
    failed = 0
    for rel, old, new, test in SURVIVORS:
        path = REPO / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(f"STALE   {rel}: {old.strip()!r} is no longer in the file once")
            failed += 1
            continue
        path.write_text(text.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                  "no:cacheprovider", test], cwd=REPO, capture_output=True,
                                 text=True, check=False)
        finally:
            path.write_text(text)
        killed = run.returncode == 1
        failed += not killed
        print(f"{'KILLED ' if killed else 'SURVIVED'} {rel}: {old.strip()!r} -> "
              f"{new.strip()!r} ({test})")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv == ["--survivors"]:
        return check_survivors()
    names = list(GROUPS) if argv in ([], ["all"]) else argv
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        print(f"mutation: unknown group {unknown[0]!r} (choose from {', '.join(GROUPS)}, all)",
              file=sys.stderr)
        return 2
    globs = [g for n in names for g in GROUPS[n]]
    run = subprocess.run([*MUTMUT, "run", "--max-children", "2", *globs], cwd=REPO,
                         check=False)
    if run.returncode:
        return run.returncode
    results = subprocess.run([*MUTMUT, "results"], cwd=REPO, capture_output=True, text=True,
                             check=False)
    prefixes = tuple(g.rstrip("*") for g in globs)
    survivors = [line.strip() for line in results.stdout.splitlines()
                 if line.strip().startswith(prefixes) and not line.strip().endswith("killed")]
    out = REPO / "mutants" / f"survivors-{'-'.join(names)}.txt"
    out.write_text("\n".join(survivors) + "\n")
    print(f"{len(survivors)} mutants not killed in {', '.join(names)}; listed in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
