"""The hook's reserve journal: space set aside before the disk fills, used when it has.

`<journal>.reserve` is a file of NUL bytes whose blocks are allocated up front
(posix_fallocate, or written zeros), so writing into it needs no new space.
When spark-hook cannot append to the journal (ENOSPC, EDQUOT), it takes an
exclusive flock on the reserve, writes its line over the first NUL bytes and
fsyncs. sparkd reads the reserve like the journal (lines up to the first NUL)
under the same lock and, once everything in it is recorded and there is room,
swaps in a fresh reserve (a new inode, so the ingest cursor starts over)
before letting go of the lock, so no line lands in a file already emptied.
The swap is atomic and the old file is only unlinked, so a crash at any point
leaves a reserve whose recorded lines the ledger's cursor skips.

In-place writes need a filesystem that overwrites allocated blocks in place
(ext4, xfs, tmpfs); on copy-on-write filesystems (btrfs, ZFS) keep the journal
on another filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from spark_slurm.daemon.filemodes import FileModes

log = logging.getLogger("sparkd.reserve")

DEFAULT_SIZE = 1 << 20


def reserve_path(journal: Path) -> Path:
    """Where the hook looks for the reserve of `journal` (same rule in hook.py)."""
    return journal.with_name(journal.name + ".reserve")


def _allocate(path: Path, size: int, modes: FileModes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        modes.apply_fd(fd)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP/EINVAL: write the zeros instead
                raise
            block = b"\0" * 65536
            for offset in range(0, size, len(block)):
                os.pwrite(fd, block[: size - offset], offset)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


class Reserve:
    """sparkd's side of the reserve journal."""

    def __init__(self, journal: Path, size: int, modes: FileModes) -> None:
        self.path = reserve_path(journal)
        self.size = size
        self.modes = modes

    def ensure(self) -> bool:
        """Create the reserve when it is missing (True when it had to be made)."""
        if self.path.exists():
            self.modes.apply(self.path)
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        _allocate(tmp, self.size, self.modes)
        os.replace(tmp, self.path)
        log.info("reserve journal of %d KiB at %s", self.size >> 10, self.path)
        return True

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the reserve's lock (hooks wait); yields whether the reserve exists."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    def used(self) -> bool:
        """Whether anything was written into the reserve (its first byte is not NUL)."""
        try:
            with self.path.open("rb") as fh:
                return fh.read(1) not in (b"", b"\0")
        except FileNotFoundError:
            return False

    def recycle(self) -> bool:
        """Swap in a fresh reserve (call with the lock held, once all lines are
        recorded); False when there is no room for it yet (the old one stays)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            _allocate(tmp, self.size, self.modes)
        except OSError as exc:
            log.warning("cannot make a fresh reserve yet: %s", exc)
            return False
        os.replace(tmp, self.path)
        return True


def content_end(data: bytes) -> int:
    """Length of the written part of a reserve: up to its first NUL byte."""
    end = data.find(b"\0")
    return len(data) if end < 0 else end
