"""Small files that must survive a crash whole: keys, witness state, restore intents.

`create_new` never overwrites and sets the mode exactly (umask or not), so key
material is never briefly readable by others; `replace_file` writes such a file
aside, renames it over the old one and fsyncs the directory, so after a crash the
path holds the old bytes or the new ones, never a mix and never nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def create_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (failing if it exists) with exactly `mode`, contents fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or create in it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically and durably give `path` the contents `data` and the mode `mode`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a process of ours that died mid-write
    create_new(tmp, data, mode)
    os.replace(tmp, path)
    sync_dir(path.parent)
