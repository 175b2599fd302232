"""Wall time and peak RSS of a command's whole process tree (workers included).

`getrusage` reports the largest single child, not the sum of a parent and the
workers it runs at the same time, so the tree is sampled from /proc every few
milliseconds instead: the peak of the sum of VmRSS over the process and all
its descendants. A sampler can miss a spike shorter than its period; the
processes measured here hold their memory for seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PERIOD_S = 0.01


@dataclass(frozen=True, slots=True)
class Run:
    returncode: int
    wall_s: float
    peak_rss_mib: float
    output: str


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            resident = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident * os.sysconf("SC_PAGE_SIZE") // 1024


def tree_rss_kib(root: int) -> int:
    """Sum of the resident set of `root` and every descendant, now."""
    kids = _children()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_kib(pid)
        todo += kids.get(pid, [])
    return total


def run(cmd: Sequence[str], *, timeout_s: float = 3600,
        env: dict[str, str] | None = None) -> Run:
    """Run `cmd` to completion, sampling its process tree's RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, tree_rss_kib(proc.pid))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                break
            time.sleep(PERIOD_S)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    return Run(proc.returncode, time.perf_counter() - t0, peak / 1024, out)
