"""Two node ledgers sharing job 100, witnessed and merged, and bundles made from them."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.evidence import make_evidence, witness_from_state
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.witness import witness_checkpoint
from tests.unit.head.builders import build_node

SCRIPT = Path(__file__).resolve().parents[3] / "contrib" / "verify-evidence.sh"


@dataclass
class World:
    root: Path
    trust: Path
    witness: Path
    n1: Path
    n2: Path
    merged: Path
    clock: ManualClock


def newest_checkpoint(ledger: Path) -> str:
    conn = sqlite3.connect(ledger)
    try:
        return str(conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()[0])
    finally:
        conn.close()


def make_world(root: Path) -> World:
    """n1 runs jobs 100 (with a thermal throttle) and 200, n2 runs job 100; the witness
    cosigns both nodes' newest checkpoints and the head node merges them."""
    clock = ManualClock()
    trust = root / "trust"
    n1 = build_node(root, "n1", trust, clock,
                    [("100", [0, 1], {0: 5_000, 1: 6_000}), ("200", [1], {1: 7})],
                    throttle=True)
    n2 = build_node(root, "n2", trust, clock, [("100", [0], {0: 9_000})])
    state = root / "witness"
    for ledger in (n1, n2):
        witness_checkpoint(state, newest_checkpoint(ledger), KeyRing.load(trust))
    merged = root / "cluster.db"
    assert merge_ledgers(merged, [str(n1), str(n2)], keys_dir=trust,
                         witness_state=state).ok
    return World(root, trust, state, n1, n2, merged, clock)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def bundle_of(world: World, db: Path, name: str, job: str = "100") -> Path:
    witness, signer = witness_from_state(world.witness)
    out = world.root / name
    make_evidence(db, job, out, witness=witness, signer=signer, keys_dir=world.trust,
                  clock=world.clock)
    return out


def copy(path: Path, dest: Path) -> Path:
    shutil.copy(path, dest)
    return dest


def shell_verify(bundle: Path, *args: str) -> tuple[int, str]:
    out = subprocess.run(["bash", str(SCRIPT), *args, str(bundle)], capture_output=True,
                         text=True, timeout=240, check=False)
    return out.returncode, (out.stdout + out.stderr).strip()

