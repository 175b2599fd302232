"""Explicit modes for every file sparkd keeps, whatever the umask it was started with.

The ledger and its -wal/-shm, the hook's journal and reserve, the denial spool,
restore intents and cursors hold one tenant's jobs next to another's, so they
are 0600 (directories 0700) owned by root; with `files.group` set they are 0640
(0750) and belong to that group, for an admin group that audits without root.
The denial spool is appended to by slurmctld, so it belongs to the SlurmUser.
Modes are set with fchmod/chmod after creation, never left to the umask, and
re-applied at each start and ingest in case a file was recreated by a tool.
SQLite creates -wal and -shm with the database file's mode and owner, so
creating the database file first (empty, with its mode) covers them too; they
are still checked after opening.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spark_slurm.errors import ConfigError

if TYPE_CHECKING:
    from spark_slurm.daemon.config import DaemonConfig
    from spark_slurm.daemon.reserve import Reserve

log = logging.getLogger("sparkd.files")


@dataclass(frozen=True, slots=True)
class FileModes:
    """The mode and group every data file of this daemon gets."""

    gid: int | None = None

    @classmethod
    def for_group(cls, group: str | None) -> FileModes:
        if not group:
            return cls()
        try:
            return cls(grp.getgrnam(group).gr_gid)
        except KeyError:
            if group.isdigit():
                return cls(int(group))
            raise ConfigError(f"files.group: no such group {group!r}") from None

    @property
    def file_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def dir_mode(self) -> int:
        return 0o700 if self.gid is None else 0o750

    def apply_fd(self, fd: int, owner: int | None = None) -> None:
        if owner is not None or self.gid is not None:
            os.fchown(fd, -1 if owner is None else owner, -1 if self.gid is None else self.gid)
        os.fchmod(fd, self.file_mode)

    def apply(self, path: Path, owner: int | None = None) -> None:
        """Set the mode (and group, owner) of an existing file; a missing one is fine."""
        try:
            if owner is not None or self.gid is not None:
                os.chown(path, -1 if owner is None else owner, -1 if self.gid is None else self.gid)
            os.chmod(path, self.file_mode)
        except FileNotFoundError:
            return

    def directory(self, path: Path, owner: int | None = None) -> None:
        """Create a private directory (or tighten one sparkd made)."""
        path.mkdir(parents=True, exist_ok=True)
        if owner is not None or self.gid is not None:
            os.chown(path, -1 if owner is None else owner, -1 if self.gid is None else self.gid)
        os.chmod(path, self.dir_mode)

    def create(self, path: Path, owner: int | None = None) -> None:
        """Make sure `path` exists with the right mode: created empty when missing."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.apply_fd(fd, owner)
        finally:
            os.close(fd)

    def ledger(self, path: Path) -> None:
        """Before opening: the database file exists with its mode, so SQLite gives its
        -wal and -shm the same one; after opening, call again to check all three."""
        if not path.exists():
            self.create(path)
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                self.apply(p)


def secure_files(cfg: DaemonConfig, modes: FileModes, reserve: Reserve,
                 slurm_uid: int | None) -> None:
    """At start: the state directory, the journal (made here, so the hook only ever
    appends), the reserve, intents and cursors, and the spool, with their modes."""
    modes.directory(cfg.state_dir)
    cfg.journal_path.parent.mkdir(parents=True, exist_ok=True)
    modes.create(cfg.journal_path)
    for name in ("intents.jsonl", "journal.cursor", "spool.cursor", "reserve.cursor"):
        modes.apply(cfg.state_dir / name)
    try:
        reserve.ensure()
    except OSError as exc:
        log.error("cannot set aside the hook's reserve journal %s: %s", reserve.path, exc)
    if cfg.spool_path is not None:
        secure_spool(cfg.spool_path, modes, slurm_uid)


def secure_spool(path: Path, modes: FileModes, slurm_uid: int | None) -> None:
    """The denial spool: slurmctld (the SlurmUser) appends, sparkd reads, nobody else.
    Checked at each ingest, since Lua recreates a rotated spool with the umask's mode."""
    owner = slurm_uid or None
    try:
        if not path.parent.exists():
            modes.directory(path.parent, owner)
        if path.exists():
            modes.apply(path, owner)
        else:
            modes.create(path, owner)
    except OSError as exc:
        log.error("cannot set the mode of the denial spool %s: %s", path, exc)
