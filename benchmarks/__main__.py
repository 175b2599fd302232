"""Run every `bench_*.py` module (or those named) and rebuild REPORT.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from benchmarks import harness


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(p.stem for p in here.glob("bench_*.py"))
    failed = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        try:
            sections = module.run()
        except Exception as exc:  # a broken bench must not hide the others
            print(f"bench {name} failed: {exc!r}", file=sys.stderr)
            failed.append(name)
            continue
        harness.save(name, sections)
    path = harness.write_report()
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
