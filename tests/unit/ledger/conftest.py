"""Fixtures for ledger tests: real key files, real SQLite ledgers, a manual clock."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Checkpoint, Ledger, VerifyReport, verify_ledger, verify_par
from spark_slurm.ledger.checkpoint import sign_checkpoint
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_public_key, load_signing_key

SCRIPT = Path(__file__).resolve().parents[3] / "contrib" / "verify-ledger.sh"

if "MUTANT_UNDER_TEST" in os.environ:
    # Under mutmut (make mutation) every mutated module imports mutmut's
    # trampoline from site-packages, which the parallel verifier's worker does not
    # load (-S): without it every worker fails and the parallel path is never taken.
    # And the trampoline picks the mutant by module name, so the worker imports the
    # mutated package by its own name (a sibling import never runs a mutant).
    _ROOT = str(Path(verify_par.__file__).resolve().parents[2])
    verify_par.WORKER_ARGS = ("-E", "-s", "-c", f"import sys; sys.path.insert(0, {_ROOT!r}); "
                              "from spark_slurm.ledger.scan_worker import main; main()")


@dataclass
class Keys:
    dir: Path
    hmac: bytes
    signing: Ed25519PrivateKey
    public: Ed25519PublicKey


@dataclass
class Built:
    """A ledger written by the library, closed, plus what an auditor would keep."""

    path: Path
    keys: Keys
    clock: ManualClock
    kept: list[Checkpoint]
    rotated: Ed25519PrivateKey | None = None
    """The signing key rotated to half way (it signs the kept checkpoint)."""


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    files = keygen(tmp_path / "keys")
    return Keys(tmp_path / "keys", load_hmac_key(files.hmac_key),
                load_signing_key(files.signing_key), load_public_key(files.public_key))


def write_records(led: Ledger, clock: ManualClock, n: int, *, step_s: float = 7,
                  start: int = 0) -> None:
    for i in range(start, start + n):
        body = {"v": 1, "node": led.node, "job_id": str(100 + i % 4), "power_mw": 1000 * i,
                "decision": {"action": "allow", "granted_mw": 400_000}}
        led.append("cap" if i % 3 else "restore", body)
        clock.advance(step_s)


def small_ledger(path: Path, hmac: bytes | None, signing: Ed25519PrivateKey | None,
                 n: int = 6) -> Path:
    """A closed ledger of `n` records with only the keys given (None: written without
    HMAC, or without a signing key)."""
    clock = ManualClock()
    with Ledger.open(path, hmac, signing, node="n1", cluster="c1", clock=clock,
                     epoch_seconds=3600) as led:
        write_records(led, clock, n)
    return path


def damaged(built: Built, tmp_path: Path, statement: str, *args: object
            ) -> tuple[Path, VerifyReport]:
    """A copy of the built ledger with one SQL statement applied, and its verdict
    under the built ledger's keys."""
    path = tmp_path / "damaged.db"
    shutil.copy(built.path, path)
    with sqlite3.connect(path) as conn:
        conn.execute(statement, args)
    conn.close()
    return path, verify_ledger(path, built.keys.hmac, built.keys.public)


def resign(built: Built, *, origin: str | None = None, size: int | None = None,
           root: bytes | None = None, head: str | None = None) -> Checkpoint:
    """The built ledger's kept checkpoint with some fields replaced, signed by the
    node's current (rotated) key: a note the node could have signed."""
    cp = built.kept[0]
    assert built.rotated is not None
    return sign_checkpoint(cp.origin if origin is None else origin,
                           cp.size if size is None else size, cp.root if root is None else root,
                           cp.head_hash if head is None else head, built.rotated)


@pytest.fixture
def build(tmp_path: Path, keys: Keys) -> Callable[..., Built]:
    """build(n=..., name=...) -> a closed ledger with HMAC epochs of 60 s, a key
    rotation half way, and one checkpoint kept by the auditor near the end."""

    def make(n: int = 40, name: str = "node.db", rotate: bool = True,
             hmac: bool = True) -> Built:
        clock = ManualClock()
        path = tmp_path / name
        kept: list[Checkpoint] = []
        led = Ledger.open(path, keys.hmac if hmac else None, keys.signing, node="n1",
                          cluster="c1", clock=clock, epoch_seconds=60)
        write_records(led, clock, n // 2)
        rotated = Ed25519PrivateKey.generate() if rotate else None
        if rotated is not None:
            led.rotate_signing_key(rotated)
        led.maintain()
        write_records(led, clock, n - n // 2, start=n // 2)
        kept.append(led.checkpoint())
        led.close()
        return Built(path, keys, clock, kept, rotated)

    return make


def shell_verify(path: Path, *args: str) -> tuple[int, str]:
    """Run contrib/verify-ledger.sh; returns (exit code, stdout + stderr)."""
    out = subprocess.run(["bash", str(SCRIPT), *args, str(path)], capture_output=True,
                         text=True, timeout=240, check=False)
    return out.returncode, out.stdout + out.stderr


needs_shell_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("sqlite3", "sha256sum", "openssl")),
    reason="contrib/verify-ledger.sh needs sqlite3, sha256sum and openssl")
