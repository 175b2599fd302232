"""`sparkctl backup` / `sparkctl restore`: the head node's state, to one directory and back.

Three things make the head node: the cluster store, the witness state (its key
and the checkpoints it cosigned) and the trust directory of node keys. A backup
copies each consistently while merges and the witness go on: the SQLite store
through SQLite's online backup (a snapshot of one instant), a PostgreSQL store
with `pg_dump` (one transaction), the witness state under the witness's own lock
(so no cosign lands half way), and the keys with their modes (0600 secrets stay
0600). `manifest.json`, written last, lists every file's SHA-256, so a restore
refuses a backup that was damaged or is incomplete, and it never overwrites a
store, witness state or key directory that holds anything unless told to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.durable import replace_file
from spark_slurm.errors import HeadDbError
from spark_slurm.head.store import display_url, open_store, parse_url
from spark_slurm.head.witness import locked_state

MANIFEST = "manifest.json"
FORMAT = "spark-head-backup"
SQLITE_FILE = "cluster.db"
PG_FILE = "cluster.pgdump"


@dataclass
class BackupReport:
    path: str
    store: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "store": self.store, "files": self.files,
                "nodes": self.nodes}


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for version in ("17", "16", "15"):
        candidate = Path(f"/usr/lib/postgresql/{version}/bin/{name}")
        if candidate.exists():
            return str(candidate)
    raise HeadDbError(f"{name} not found: install the PostgreSQL client (postgresql-client)")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def backup(db: str | Path, out: Path, *, witness_state: Path | None = None,
           keys: Path | None = None, clock: Clock = SYSTEM_CLOCK) -> BackupReport:
    """Write the head node's state into `out` (a new, or empty, directory)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HeadDbError(f"{out}: exists and is not empty; a backup goes to a new directory")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    scheme, target = parse_url(db)
    with closing(open_store(db)) as store:  # refuses what is not a cluster store
        nodes = {n.name: n.head_seq for n in store.nodes()}
    if scheme == "sqlite":
        _sqlite_backup(Path(target), out / SQLITE_FILE)
    else:
        _run([_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file",
              str(out / PG_FILE), target], "pg_dump")
    if witness_state is not None:
        with locked_state(witness_state):
            _copy_tree(witness_state, out / "witness", skip={".lock"})
    if keys is not None:
        _copy_tree(keys, out / "keys")
    report = BackupReport(str(out), scheme, nodes=nodes)
    for path in _files(out):
        rel = str(path.relative_to(out))
        report.files[rel] = {"sha256": _digest(path), "bytes": path.stat().st_size,
                             "mode": oct(path.stat().st_mode & 0o777)}
    manifest = {"format": FORMAT, "version": 1, "created_ns": clock.now_ns(),
                "db": display_url(str(db)), **report.to_json()}
    replace_file(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                 .encode(), 0o600)
    return report


def _sqlite_backup(source: Path, dest: Path) -> None:
    try:
        with closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)) as src, \
                closing(sqlite3.connect(dest)) as out:
            src.backup(out)
    except sqlite3.Error as exc:
        raise HeadDbError(f"{source}: cannot back up: {exc}") from None
    dest.chmod(0o600)


def _copy_tree(source: Path, dest: Path, skip: set[str] | None = None) -> None:
    """Copy a directory's files with their modes (secrets stay 0600)."""
    if not source.is_dir():
        raise HeadDbError(f"{source}: no such directory")
    for path in sorted(source.rglob("*")):
        if path.name in (skip or set()) or not path.is_file():
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copy2(path, target)
        os.chmod(target, path.stat().st_mode & 0o777)


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=3600, check=False)
    except OSError as exc:
        raise HeadDbError(f"{what}: cannot run: {exc.strerror or exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise HeadDbError(f"{what} failed: {last}")


def check_backup(path: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists is there and unchanged."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise HeadDbError(f"{path}: not a complete backup (no readable {MANIFEST}: "
                          f"{exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HeadDbError(f"{path}: {MANIFEST} is not a spark-slurm head backup")
    for rel, info in manifest.get("files", {}).items():
        file = path / rel
        if not file.is_file() or _digest(file) != info.get("sha256"):
            raise HeadDbError(f"{path}: backup damaged: {rel} is missing or changed")
    return manifest


def restore(path: Path, db: str | Path, *, witness_state: Path | None = None,
            keys: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Put a checked backup back: the store at `db`, and the witness state and keys
    where given. Returns the manifest."""
    manifest = check_backup(path)
    scheme, target = parse_url(db)
    if scheme != manifest.get("store"):
        raise HeadDbError(f"{path}: holds a {manifest.get('store')} store, not {scheme}")
    for dest in (d for d in (witness_state, keys) if d is not None):
        if dest.exists() and any(dest.iterdir()) and not force:
            raise HeadDbError(f"{dest}: not empty (restore --force replaces it)")
    if scheme == "sqlite":
        dest = Path(target)
        if dest.exists() and not force:
            raise HeadDbError(f"{dest}: exists (restore --force replaces it)")
        for suffix in ("-wal", "-shm"):
            Path(f"{dest}{suffix}").unlink(missing_ok=True)
        tmp = dest.with_name(f".{dest.name}.restore")
        shutil.copyfile(path / SQLITE_FILE, tmp)
        tmp.chmod(0o600)
        tmp.replace(dest)
    else:
        from spark_slurm.head.pg_store import PgStore  # noqa: PLC0415 (psycopg is optional)

        held = None
        try:
            held = PgStore.open(target)
        except HeadDbError as exc:
            if "not a cluster store" not in exc.message:
                raise
        if held is not None:
            try:
                if not force:
                    raise HeadDbError(f"{display_url(target)}: already holds a cluster store "
                                      "(restore --force replaces it)")
                held.drop_tables()  # pg_restore --clean trips over partition constraints
            finally:
                held.close()
        _run([_pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--dbname", target,
              str(path / PG_FILE)], "pg_restore")
    with closing(open_store(db)):  # it opens as a store (an older one is upgraded)
        pass
    if witness_state is not None and (path / "witness").is_dir():
        if witness_state.exists():
            shutil.rmtree(witness_state)
        _copy_tree(path / "witness", witness_state)
        witness_state.chmod(0o700)
    if keys is not None and (path / "keys").is_dir():
        if keys.exists():
            shutil.rmtree(keys)
        _copy_tree(path / "keys", keys)
    return manifest
