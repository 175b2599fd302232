"""A small real filesystem to fill: a tmpfs mounted on a fresh directory, for disk-full tests.

Filling it is exact (no reserved blocks, no delayed allocation), and it is gone
at unmount. Mounting needs root (CAP_SYS_ADMIN); without it the test is skipped,
except under CI, where that is a failure to fix, not hide.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kib: int) -> Iterator[Path]:
    """Mount a `size_kib` tmpfs on `where` (created, must be empty); unmount after."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755",
                          "tmpfs", str(where)], capture_output=True, text=True, check=False,
                         timeout=30)
    if res.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {res.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        for _ in range(20):  # a daemon that still has a file open keeps it busy briefly
            if subprocess.run(["umount", str(where)], capture_output=True,
                              check=False, timeout=30).returncode == 0:
                break
            subprocess.run(["sleep", "0.5"], check=False)
        else:
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(directory: Path, leave_kib: int = 0, name: str = "filler") -> Path:
    """Write a file until only about `leave_kib` KiB are free (0: completely full)."""
    path = directory / name
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    target = max(0, free - leave_kib * 1024)
    with path.open("ab", buffering=0) as fh:
        block = b"\0" * 65536
        written = 0
        try:
            while written < target:
                written += fh.write(block[: min(len(block), target - written)]) or 0
            while leave_kib == 0:  # top up the last pages
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return path


def free_kib(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize // 1024
