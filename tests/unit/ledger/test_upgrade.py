"""Schema 1 ledgers (written by the code before schema 2) stay readable and
verifiable read-only, and their writer upgrades them in place at open without
changing anything hashed, so checkpoints kept before the upgrade still verify."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import LedgerError
from spark_slurm.ledger import Ledger, load_checkpoint, verify_ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.merkle import leaf_hash, verify_inclusion
from spark_slurm.ledger.reader import LedgerReader
from tests.unit.ledger.conftest import needs_shell_tools, shell_verify

V1 = Path(__file__).resolve().parents[2] / "data" / "ledger" / "v1"
WRITTEN_NS = 1_700_000_000_000_000_000 + 900 * 1_000_000_000  # the fixture's last record


def clock() -> ManualClock:
    """Where the fixture's writer stopped, plus a little (its epochs are 60 s)."""
    return ManualClock(WRITTEN_NS + 30 * 1_000_000_000)


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A private copy of the schema-1 ledger and its keys (0600, as keygen makes them)."""
    for name in ("node.db", "hmac.key", "node.key", "node.pub", "kept.cp"):
        shutil.copy(V1 / name, tmp_path / name)
    for name in ("hmac.key", "node.key"):
        (tmp_path / name).chmod(0o600)
    return tmp_path


def _version(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                   .fetchone()[0])
    finally:
        conn.close()


def test_a_schema_1_ledger_verifies_read_only(old: Path) -> None:
    before = (old / "node.db").read_bytes()
    report = verify_ledger(old / "node.db", load_hmac_key(old / "hmac.key"),
                           checkpoints=[load_checkpoint(old / "kept.cp")])
    assert report.ok, report.summary()
    assert (report.count, report.checkpoints_checked) == (316, 3 + 1)  # stored + kept
    assert (old / "node.db").read_bytes() == before  # readers never upgrade


def test_reads_of_a_schema_1_ledger_fall_back_to_scans(old: Path) -> None:
    with LedgerReader(old / "node.db") as reader:
        assert reader.version == 1
        caps = list(reader.records(kinds=["cap"]))
        assert len(caps) == 75 and all(r.kind == "cap" for r in caps)
        cap = caps[3]
        follow = reader.followups(cap.seq)
        assert [r.kind for r in follow] == ["facility"] and follow[0].body["ref"]["seq"] == cap.seq
        newest = next(reader.newest_first(["restore"]))
        assert newest.seq == max(r.seq for r in reader.records(kinds=["restore"]))
        cp = reader.latest_checkpoint()
        assert cp is not None
        proof = reader.inclusion_proof(cap.seq, cp.size)
        assert verify_inclusion(leaf_hash(cap.body_bytes), cap.seq, cp.size, proof, cp.root)


def test_the_writer_upgrades_in_place_and_keeps_every_proof(old: Path) -> None:
    path = old / "node.db"
    k0 = load_hmac_key(old / "hmac.key")
    kept = load_checkpoint(old / "kept.cp")
    led = Ledger.open(path, None, load_signing_key(old / "node.key"), node="n1", cluster="c1",
                      clock=clock(), epoch_seconds=60)
    led.close()
    assert _version(path) == "2"
    report = verify_ledger(path, k0, checkpoints=[kept])
    assert report.ok, report.summary()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM tree").fetchone()[0] == 1  # 316 leaves: one 2^8
    conn.close()
    with LedgerReader(path) as reader:
        assert reader.version == 2
        cap = next(reader.records(kinds=["cap"]))
        assert [r.seq for r in reader.followups(cap.seq)] == [cap.seq + 1]
        proof = reader.inclusion_proof(cap.seq, kept.size)
        assert verify_inclusion(leaf_hash(cap.body_bytes), cap.seq, kept.size, proof, kept.root)


def test_an_upgraded_ledger_takes_appends_and_reopens_without_upgrading(old: Path) -> None:
    path = old / "node.db"
    key = load_signing_key(old / "node.key")
    later = clock()
    with Ledger.open(path, None, key, node="n1", cluster="c1", clock=later,
                     epoch_seconds=60) as led:
        before = led.size
        later.advance(120)  # two epochs on: two seals, then the record
        led.append("cap", {"v": 1, "node": "n1", "job_id": "9", "gpus": []})
        assert led.size == before + 3
    conn = sqlite3.connect(path)
    tree = conn.execute("SELECT count(*) FROM tree").fetchone()[0]
    conn.close()
    with Ledger.open(path, None, key, node="n1", cluster="c1", clock=later,
                     epoch_seconds=60) as led:
        assert next(led.records_newest_first(["cap"])).body["job_id"] == "9"
    report = verify_ledger(path, load_hmac_key(old / "hmac.key"))
    assert report.ok, report.summary()
    assert tree == 1  # 316+ leaves: one perfect subtree of 2^8


def _content(path: Path) -> list[object]:
    conn = sqlite3.connect(path)
    try:
        return [conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("sqlite_master", "meta", "per", "state", "checkpoint")]
    finally:
        conn.close()


def test_an_open_refused_for_another_node_leaves_the_ledger_alone(old: Path) -> None:
    before = _content(old / "node.db")
    with pytest.raises(LedgerError, match="belongs to node 'n1'"):
        Ledger.open(old / "node.db", node="other", cluster="c1")
    with pytest.raises(LedgerError, match="belongs to cluster 'c1'"):
        Ledger.open(old / "node.db", node="n1", cluster="other")
    assert _content(old / "node.db") == before  # (journal_mode=WAL is only the header)
    assert _version(old / "node.db") == "1"


@needs_shell_tools
@pytest.mark.parametrize("upgraded", [False, True])
def test_the_shell_verifier_reads_both_versions(old: Path, upgraded: bool) -> None:
    if upgraded:
        Ledger.open(old / "node.db", None, load_signing_key(old / "node.key"), node="n1",
                    cluster="c1", clock=clock(), epoch_seconds=60).close()
    assert _version(old / "node.db") == ("2" if upgraded else "1")
    code, text = shell_verify(old / "node.db", "--key", str(old / "hmac.key"),
                              "--checkpoint", str(old / "kept.cp"))
    assert code == 0, text
