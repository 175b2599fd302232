"""Evidence bundles: valid ones verify offline; tampering with any part is caught, named
the same way by `verify_bundle`, `sparkctl verify-evidence` and contrib/verify-evidence.sh."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.cli import run
from spark_slurm.evidence import Pins, verify_bundle
from spark_slurm.ledger.keys import load_public_key, public_b64, public_pem
from tests.unit.evidence.conftest import World, bundle_of, copy, make_world, shell_verify


def _sql(path: Path, sql: str, args: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def _one(path: Path, sql: str, args: tuple[object, ...] = ()) -> tuple[object, ...]:
    conn = sqlite3.connect(path)
    row = conn.execute(sql, args).fetchone()
    conn.close()
    assert row is not None, sql
    return tuple(row)


def _seq(path: Path, kind: str, node: str = "n1") -> int:
    return int(str(_one(path, "SELECT seq FROM record WHERE kind = ? AND node = ? "
                                "ORDER BY seq", (kind, node))[0]))


def _flip_signature(text: str, name: str) -> str:
    """Flip one bit of the signature (not the key hash) on `name`'s line."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(f"— {name} "):
            raw = bytearray(base64.b64decode(line.rsplit(" ", 1)[1]))
            raw[10] ^= 0x01
            lines[i] = f"— {name} {base64.b64encode(bytes(raw)).decode()}"
    return "\n".join(lines)


def per_body(p: Path) -> tuple[str, str]:
    seq = _seq(p, "cap")
    _sql(p, "UPDATE record SET body = CAST(replace(CAST(body AS TEXT), '\"granted_mw\":', "
            "'\"granted_mw\":9') AS BLOB) WHERE node = 'n1' AND seq = ?", (seq,))
    return f"record n1/{seq}", "PER body edited"


def proof_node(p: Path) -> tuple[str, str]:
    seq = _seq(p, "restore")
    _sql(p, "UPDATE proof SET hash = zeroblob(32) WHERE node = 'n1' AND seq = ? AND step = 1",
         (seq,))
    return f"record n1/{seq}", "proof edited"


def checkpoint_text(p: Path) -> tuple[str, str]:
    text = str(_one(p, "SELECT text FROM checkpoint WHERE node = 'n1'")[0])
    lines = text.split("\n")
    lines[1] = str(int(lines[1]) + 1)
    _sql(p, "UPDATE checkpoint SET text = ? WHERE node = 'n1'", ("\n".join(lines),))
    return "checkpoint n1", "checkpoint text edited"


def node_signature(p: Path) -> tuple[str, str]:
    text = str(_one(p, "SELECT text FROM checkpoint WHERE node = 'n2'")[0])
    _sql(p, "UPDATE checkpoint SET text = ? WHERE node = 'n2'",
         (_flip_signature(text, "spark/spark/n2"),))
    return "checkpoint n2", "node signature does not verify"


def witness_cosignature(p: Path) -> tuple[str, str]:
    text = str(_one(p, "SELECT text FROM checkpoint WHERE node = 'n1'")[0])
    witness = str(_one(p, "SELECT value FROM bundle WHERE key = 'witness'")[0])
    _sql(p, "UPDATE checkpoint SET text = ? WHERE node = 'n1'", (_flip_signature(text, witness),))
    return "checkpoint n1", "witness cosignature does not verify"


def public_key(p: Path) -> tuple[str, str]:
    other = public_b64(Ed25519PrivateKey.generate().public_key())
    _sql(p, "UPDATE key SET public_key = ? WHERE name = 'spark/spark/n1'", (other,))
    return "checkpoint n1", "wrong or replaced key"


def malformed_key(p: Path) -> tuple[str, str]:
    _sql(p, "UPDATE key SET public_key = 'AAAA' WHERE name = 'spark/spark/n2'")
    return "key spark/spark/n2", "not a base64 32-byte Ed25519 public key"


def policy_snapshot(p: Path) -> tuple[str, str]:
    sha = str(_one(p, "SELECT sha256 FROM policy")[0])
    _sql(p, "UPDATE policy SET text = replace(text, 'max_watts: 700', 'max_watts: 900')")
    return f"policy {sha[:16]}", "policy snapshot edited"


def dropped_record(p: Path) -> tuple[str, str]:
    seq = _seq(p, "restore", "n2")
    _sql(p, "DELETE FROM record WHERE node = 'n2' AND seq = ?", (seq,))
    return f"record n2/{seq}", "dropped"


def dropped_record_and_its_line(p: Path) -> tuple[str, str]:
    seq = _seq(p, "restore", "n2")
    text = str(_one(p, "SELECT text FROM statement")[0])
    kept = "\n".join(ln for ln in text.split("\n") if not ln.startswith(f"record n2 {seq} "))
    _sql(p, "DELETE FROM record WHERE node = 'n2' AND seq = ?", (seq,))
    _sql(p, "UPDATE statement SET text = ?", (kept,))
    return "statement", "does not verify (statement edited)"


def added_record(p: Path) -> tuple[str, str]:
    _sql(p, "INSERT INTO record SELECT node, seq + 1000, time_ns, kind, job_id, body, "
            "prev_hash, hash, mac, key_id FROM record WHERE node = 'n1' ORDER BY seq LIMIT 1")
    seq = int(str(_one(p, "SELECT max(seq) FROM record WHERE node = 'n1'")[0]))
    return f"record n1/{seq}", "not named by the statement"


def statement_job(p: Path) -> tuple[str, str]:
    _sql(p, "UPDATE statement SET text = replace(text, 'job 100', 'job 101')")
    _sql(p, "UPDATE bundle SET value = '101' WHERE key = 'job_id'")
    return "statement", "does not verify (statement edited)"


def policy_dropped(p: Path) -> tuple[str, str]:
    sha = str(_one(p, "SELECT sha256 FROM policy")[0])
    _sql(p, "DELETE FROM policy")
    return f"policy {sha[:16]}", "named by the statement but missing"


CASES: dict[str, Callable[[Path], tuple[str, str]]] = {f.__name__: f for f in (
    per_body, proof_node, checkpoint_text, node_signature, witness_cosignature, public_key,
    malformed_key, policy_snapshot, dropped_record, dropped_record_and_its_line, added_record,
    statement_job, policy_dropped)}


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One bundle from the merged ledger (both nodes), shared by the tamper cases."""
    world = make_world(tmp_path_factory.mktemp("evidence"))
    return bundle_of(world, world.merged, "job100.evidence"), world.witness / "witness.pub"


def test_a_bundle_from_a_node_ledger_verifies_with_every_verifier(world: World) -> None:
    bundle = bundle_of(world, world.n1, "n1.evidence")
    pins = Pins(witness=load_public_key(world.witness / "witness.pub"))
    report = verify_bundle(bundle, pins)
    assert report.ok, report
    assert report.nodes == ["n1"] and report.pinned == ["witness"]
    conn = sqlite3.connect(bundle)
    kinds = sorted(k for (k,) in conn.execute("SELECT kind FROM record"))
    conn.close()
    # the job's story as audit tells it, with the policy its decision cites
    assert kinds == sorted(["admission", "cap", "facility", "facility", "facility", "policy",
                            "release", "restore", "throttle"])
    code, out = shell_verify(bundle, "--witness-pub", str(world.witness / "witness.pub"))
    assert code == 0, out
    assert "ok, job 100, 9 records from n1" in out and "pinned witness" in out
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert run(["verify-evidence", str(bundle), "--json"]) == 0
    assert json.loads(stdout.getvalue())["ok"] is True


def test_a_bundle_from_the_merged_ledger_covers_every_node(
        merged_bundle: tuple[Path, Path]) -> None:
    bundle, witness_pub = merged_bundle
    report = verify_bundle(bundle, Pins(witness=load_public_key(witness_pub)))
    assert report.ok, report
    assert report.nodes == ["n1", "n2"]
    code, out = shell_verify(bundle, "--witness-pub", str(witness_pub))
    assert code == 0, out
    # the same summary line from both verifiers
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert run(["verify-evidence", str(bundle), "--witness-pub", str(witness_pub)]) == 0
    assert stdout.getvalue().strip() == out


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampering_is_caught_and_named_by_both_verifiers(
        merged_bundle: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    bundle = copy(merged_bundle[0], tmp_path / f"tampered-{case}.evidence")
    part, words = CASES[case](bundle)
    report = verify_bundle(bundle)
    assert not report.ok, case
    assert report.failed_part == part and report.reason is not None and words in report.reason
    code, out = shell_verify(bundle)
    assert code == 1, out
    assert out == f"{bundle}: {report.failed_part}: {report.reason}"
    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert run(["verify-evidence", str(bundle)]) == 1
    assert stderr.getvalue().strip() == f"sparkctl: {bundle}: {part}: {report.reason}"


def test_a_pinned_key_that_differs_is_refused(merged_bundle: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    bundle, _ = merged_bundle
    other = tmp_path / "other.pub"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate()))
    report = verify_bundle(bundle, Pins(witness=load_public_key(other)))
    assert report.failed_part is not None and report.failed_part.startswith("key witness/")
    code, out = shell_verify(bundle, "--witness-pub", str(other))
    assert code == 1 and out == f"{bundle}: {report.failed_part}: {report.reason}"


def test_junk_is_unusable_input_not_a_failed_check(tmp_path: Path) -> None:
    junk = tmp_path / "junk.evidence"
    junk.write_bytes(b"not a bundle at all")
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        assert run(["verify-evidence", str(junk)]) == 2
    assert "not an evidence bundle" in stderr.getvalue()
    code, out = shell_verify(junk)
    assert code == 2 and "not an evidence bundle" in out
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE x (y)").connection.close()
    code, out = shell_verify(empty)
    assert code == 2 and "not an evidence bundle" in out
