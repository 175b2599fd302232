"""`make mutation`: mutation testing with mutmut, by module group, outside `make test`.

mutmut copies spark_slurm/ and tests/ into mutants/, runs the mapped tests once
to learn which tests execute which function, then runs each mutant only against
those tests in forked workers. A group names its modules and the test
directories that cover them; mutmut runs in this process with its
`only_mutate` and `pytest_add_cli_args_test_selection` narrowed to the group, so
it mutates only those files and its one stats pass runs only those tests
(pyproject.toml's [tool.mutmut] lists every module of issue 21 for a bare
`mutmut run`, and is never edited). A group is then affordable on two cores:
policy is 644 mutants in about 17 minutes.

    python scripts/mutation.py GROUP...   (policy nvml facility automations pipeline
                                           ledger merge, or `all`)
    python scripts/mutation.py --rerun GROUP...   re-run only the mutants listed in
                                                  mutants/survivors-GROUP.txt (after
                                                  adding tests), and rewrite that list
    python scripts/mutation.py --survivors   the issue's hand-made survivors, each
                                             applied and shown killed

Two options narrow a run of a big group, for a first pass on two cores:

    --only PATTERN   run only the group's mutants whose name matches PATTERN
                     (fnmatch, repeatable), as `mutmut run PATTERN...` takes them.
                     Names are `spark_slurm.head.scan.x__check__mutmut_7` and, for
                     a method, `spark_slurm.head.scan.xǁChainScanǁaccept__mutmut_3`;
                     end a pattern on a function's name and `*`
                     ('spark_slurm.head.scan.x?ChainScan?*') so that mutmut's clean-test
                     run finds that function's tests (`x__check*` would also take
                     `_check_mac`: there, 'spark_slurm.head.scan.x__check__mutmut_*').
    --tests ARGS     the pytest arguments that replace the group's test selection
                     (one string, split as a shell would: 'tests/unit/head/test_scan.py
                     -k "not postgresql"'). Only the tests it selects are mapped, so a
                     mutant only another test kills survives: re-run the survivors
                     against the group's own tests (`--rerun GROUP`) before triage.

Any change of test selection resets every verdict mutmut has cached, so a
`--rerun` after a `--tests` pass checks only the listed mutants; the script
prints the status counts of the mutants each run checked.

Results stay in mutants/ (gitignored); `mutmut results` and `mutmut show NAME`
explain each one. docs/testing.md lists the survivors and why each is equivalent
or which test kills it. Running another group (or set of groups) changes the test
selection, which makes mutmut reset every cached verdict and collect stats again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Group:
    """Files mutmut mutates (globs, as `only_mutate` takes them) and the tests that cover them."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]

    def mutant_globs(self) -> list[str]:
        """mutmut names a mutant by dotted module: spark_slurm/ledger/* -> spark_slurm.ledger.*"""
        return [m.removesuffix(".py").removesuffix("/*").replace("/", ".") + ".*"
                for m in self.modules]


DAEMON_TESTS = ("tests/unit/daemon",)
GROUPS: dict[str, Group] = {
    "policy": Group(("spark_slurm/policy/evaluate.py", "spark_slurm/policy/lua.py",
                     "spark_slurm/policy/model.py"), ("tests/unit/policy", "tests/unit/lua")),
    "nvml": Group(("spark_slurm/gpu/nvml.py", "spark_slurm/gpu/mapping.py"),
                  ("tests/unit/gpu",)),
    "facility": Group(("spark_slurm/daemon/facility.py",), DAEMON_TESTS),
    # Only these files build a Monitor; the rest of tests/unit/daemon would make
    # the stats pass and every mutant's run slower without covering it.
    "automations": Group(("spark_slurm/daemon/automations.py",),
                         tuple(f"tests/unit/daemon/test_{name}.py" for name in (
                             "monitor_causes", "monitor_drift", "monitor_pass",
                             "monitor_period", "monitor_thermal", "nvml_actuation"))),
    # The files that build a Pipeline or an Actuator (test_state: energy_between);
    # the monitor's other files reach the actuator only as test_monitor_causes does.
    "pipeline": Group(("spark_slurm/daemon/pipeline.py", "spark_slurm/daemon/actuation.py"),
                      tuple(f"tests/unit/daemon/test_{name}.py" for name in (
                          "pipeline", "pipeline_record", "pipeline_restore", "pipeline_undo",
                          "actuation", "executors", "nvml_actuation", "state",
                          "monitor_causes"))),
    "ledger": Group(("spark_slurm/ledger/*",), ("tests/unit/ledger",)),
    # node_merge.py decides a source's fate (ROLLBACK, FORK, GAP, what is stored,
    # where the head moves); merge.py only runs it per source.
    "merge": Group(("spark_slurm/head/merge.py", "spark_slurm/head/node_merge.py",
                    "spark_slurm/head/scan.py"), ("tests/unit/head",)),
}


def _union(names: list[str]) -> Group:
    modules = [m for n in names for m in GROUPS[n].modules]
    tests = [t for n in names for t in GROUPS[n].tests]
    return Group(tuple(dict.fromkeys(modules)), tuple(dict.fromkeys(tests)))


def _mutmut(group: Group, args: list[str]) -> tuple[int, str]:
    """Run one mutmut command in this process, configured for `group`; (exit code, stdout).

    mutmut 3.8.1 (pinned by the `mutation` extra) reads [tool.mutmut] once into
    `mutmut.configuration._config`; setting that before the command narrows it
    without editing pyproject.toml, a file make (the venv stamp) and mutmut (its
    watched files) both react to. The forked workers inherit the narrowed config.
    """
    # The `mutation` extra; --survivors needs only pytest.
    import click  # noqa: PLC0415
    from mutmut import configuration  # noqa: PLC0415
    from mutmut.__main__ import cli  # noqa: PLC0415

    os.chdir(REPO)  # mutmut reads ./pyproject.toml and works in ./mutants
    base = configuration._load_config()
    configuration._config = dataclasses.replace(
        base, only_mutate=list(group.modules),
        pytest_add_cli_args_test_selection=list(group.tests))
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out) if args[0] == "results" else contextlib.nullcontext():
        try:
            cli.main(args, prog_name="mutmut", standalone_mode=False)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except (KeyboardInterrupt, click.exceptions.Abort):
            # stopped (Ctrl-C, `timeout -s INT`): the verdicts so far are saved
            code = 130
    return code, out.getvalue()


def _stale(group: Group) -> list[str]:
    return [m for m in group.modules if not list(REPO.glob(m))] + \
           [t for t in group.tests if not (REPO / t).exists()]


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
    # the journal cursor: since schema 2 the ledger keeps a pointer to the newest
    # ingested record, so "the oldest instead of the newest" is now a pointer that
    # keeps the first line of a batch
    ("spark_slurm/ledger/batch.py", "            latest[source] = seq",
     "            latest.setdefault(source, seq)", "tests/unit/daemon/test_ingest.py"),
    ("spark_slurm/daemon/automations.py",
     "if reset and limits.enforced_mw == limits.default_mw:",
     "if reset or limits.enforced_mw == limits.default_mw:",
     "tests/unit/daemon/test_monitor_causes.py"),
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


def _survivor_list(names: list[str]) -> Path:
    return REPO / "mutants" / f"survivors-{'-'.join(names)}.txt"


def _write_survivors(names: list[str], group: Group, only: list[str]) -> int:
    code, text = _mutmut(group, ["results", "--all", "true"])
    if code:
        return code
    prefixes = tuple(g.rstrip("*") for g in group.mutant_globs())
    ours = [line.strip() for line in text.splitlines() if line.strip().startswith(prefixes)]
    # A --rerun after a change of test selection (another group ran in between)
    # makes mutmut reset every verdict and run only the listed mutants: the rest
    # are `not checked`, which is no verdict, so they are neither listed nor counted.
    unchecked = [s for s in ours if s.endswith(": not checked")]
    survivors = [s for s in ours if not s.endswith(("killed", ": not checked"))]
    out = _survivor_list(names)
    out.write_text("".join(f"{s}\n" for s in survivors))
    print(f"{len(survivors)} mutants not killed in {', '.join(names)}; listed in {out}")
    checked = [s for s in ours if not s.endswith(": not checked")]
    if only:
        checked = [s for s in checked
                   if any(fnmatch.fnmatchcase(s.split(":", 1)[0], p) for p in only)]
    counts: dict[str, int] = {}
    for s in checked:
        status = s.rsplit(": ", 1)[1]
        counts[status] = counts.get(status, 0) + 1
    print(f"{len(checked)} mutants checked{' (--only)' if only else ''}: "
          + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if unchecked:
        print(f"{len(unchecked)} mutants of {', '.join(names)} not checked in this run; "
              f"run `scripts/mutation.py {' '.join(names)}` for the group's figures")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mutation.py", description="mutmut by module group")
    p.add_argument("--survivors", action="store_true",
                   help="apply the issue's hand-made survivors, each shown killed")
    p.add_argument("--rerun", action="store_true",
                   help="re-run only mutants/survivors-GROUP.txt's mutants")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only the mutants whose name matches (fnmatch; repeatable)")
    p.add_argument("--tests", metavar="ARGS",
                   help="pytest arguments replacing the group's test selection")
    p.add_argument("groups", nargs="*", metavar="GROUP")
    return p


def main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    if opts.survivors:
        return check_survivors()
    names = list(GROUPS) if opts.groups in ([], ["all"]) else opts.groups
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        print(f"mutation: unknown group {unknown[0]!r} (choose from {', '.join(GROUPS)}, all)",
              file=sys.stderr)
        return 2
    group = _union(names)
    stale = _stale(group)
    if stale:
        print(f"mutation: {stale[0]} in scripts/mutation.py GROUPS matches no file",
              file=sys.stderr)
        return 2
    if opts.tests is not None:
        group = dataclasses.replace(group, tests=tuple(shlex.split(opts.tests)))
    prefixes = tuple(g.rstrip("*") for g in group.mutant_globs())
    outside = [p for p in opts.only if not p.startswith(prefixes)]
    if outside:
        print(f"mutation: --only {outside[0]!r} names no mutant of {', '.join(names)} "
              f"(their names start with {', '.join(prefixes)})", file=sys.stderr)
        return 2
    if opts.rerun:
        listed = _survivor_list(names)
        if not listed.exists():
            print(f"mutation: {listed} does not exist; run `scripts/mutation.py "
                  f"{' '.join(names)}` first", file=sys.stderr)
            return 2
        targets = [line.split(":", 1)[0] for line in listed.read_text().splitlines() if line]
        if opts.only:
            targets = [t for t in targets if any(fnmatch.fnmatchcase(t, p) for p in opts.only)]
        if not targets:
            print(f"mutation: {listed} lists no survivors")
            return 0
    else:
        targets = opts.only or group.mutant_globs()
    code, _ = _mutmut(group, ["run", "--max-children", "2", *targets])
    if code == 130:  # interrupted: list what has a verdict, then say so
        _write_survivors(names, group, opts.only)
        return code
    return code or _write_survivors(names, group, opts.only)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
