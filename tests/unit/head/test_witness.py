"""Witness: verify, refuse rollbacks and forks, persist atomically, cosign."""

from __future__ import annotations

import base64
import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.errors import WitnessError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.witness import latest, witness_checkpoint, witness_file
from spark_slurm.ledger import Ledger, verify_checkpoint
from spark_slurm.ledger.checkpoint import signatures
from spark_slurm.ledger.keys import load_public_key, load_signing_key
from spark_slurm.ledger.merkle import consistency_proof, leaf_hash
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster


def checkpoints(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    out = [r[0] for r in conn.execute("SELECT text FROM checkpoint ORDER BY id")]
    conn.close()
    return out


def grow(c: Cluster, path: Path, job: str) -> str:
    """Append a job to n1 and return a fresh checkpoint."""
    with Ledger.open(path, None, load_signing_key(c.root / "keys-n1" / "node.key"), node="n1",
                     clock=c.clock) as led:
        write_job(led, c.clock, "n1", job, [0], {0: 5})
        return led.checkpoint().text


def leaves(path: Path) -> list[bytes]:
    conn = sqlite3.connect(path)
    out = [leaf_hash(bytes(r[0])) for r in conn.execute("SELECT body FROM per ORDER BY seq")]
    conn.close()
    return out


def test_first_then_consistent_checkpoint_is_cosigned(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    first = checkpoints(cluster.n1)[-1]
    r1 = witness_checkpoint(state, first, keys)
    assert r1.status == "accepted" and r1.previous_size is None
    # the cosigned note still verifies with the node key and now carries the witness's line
    verify_checkpoint(r1.text, load_public_key(cluster.trust / "n1.pub"))
    assert len(signatures(r1.text)) == 2
    second = grow(cluster, cluster.n1, "300")
    proof = consistency_proof(leaves(cluster.n1), r1.size)
    r2 = witness_checkpoint(state, second, keys, proof)
    assert r2.status == "accepted" and r2.previous_size == r1.size and r2.size > r1.size
    stored = latest(state, "spark/spark/n1")
    assert stored is not None and stored.size == r2.size
    again = witness_checkpoint(state, second, keys, proof)
    assert again.status == "unchanged"


def test_rollback_and_fork_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    old = checkpoints(cluster.n1)[-1]
    fork_copy = tmp_path / "fork.db"
    shutil.copy(cluster.n1, fork_copy)
    newer = grow(cluster, cluster.n1, "300")
    witness_checkpoint(state, newer, keys, None)
    with pytest.raises(WitnessError, match="ROLLBACK"):
        witness_checkpoint(state, old, keys)
    forked = grow(cluster, fork_copy, "666")  # same size, different history
    with pytest.raises(WitnessError, match="FORK"):
        witness_checkpoint(state, forked, keys, [])
    stored = latest(state, "spark/spark/n1")
    assert stored is not None and stored.text.startswith(newer.split("\n\n")[0])


def test_inconsistent_proof_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    witness_checkpoint(state, checkpoints(cluster.n1)[-1], keys)
    newer = grow(cluster, cluster.n1, "300")
    with pytest.raises(WitnessError, match=r"FORK|proof"):
        witness_checkpoint(state, newer, keys, [bytes(32)] * 3)
    with pytest.raises(WitnessError, match="proof"):
        witness_checkpoint(state, newer, keys, None)


def test_bad_signature_and_unknown_key(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    text = checkpoints(cluster.n1)[-1]
    body, _, sig = text.partition("\n\n")
    lines = body.split("\n")
    lines[1] = str(int(lines[1]) + 1)
    with pytest.raises(WitnessError):
        witness_checkpoint(state, "\n".join(lines) + "\n\n" + sig, keys)
    (cluster.trust / "n1.pub").unlink()
    with pytest.raises(WitnessError, match="UNKNOWN_KEY"):
        witness_checkpoint(state, text, KeyRing.load(cluster.trust))


def _add(args: tuple[str, str, str]) -> str:
    state, cp, keys = args
    try:
        return witness_file(Path(state), Path(cp), Path(keys), None, Path(cp).with_suffix(".db"))\
            .status
    except WitnessError as exc:
        return f"refused: {exc.message}"


def test_concurrent_adds_cannot_roll_back(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "w"
    witness_checkpoint(state, checkpoints(cluster.n1)[0], KeyRing.load(cluster.trust))
    small = checkpoints(cluster.n1)[-1]
    big = grow(cluster, cluster.n1, "300")
    files = []
    for i, text in enumerate([small, big] * 4):
        f = tmp_path / f"cp{i}.txt"
        f.write_text(text)
        shutil.copy(cluster.n1, f.with_suffix(".db"))
        files.append((str(state), str(f), str(cluster.trust)))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_add, files)
    stored = latest(state, "spark/spark/n1")
    assert stored is not None and stored.text.split("\n\n")[0] == big.split("\n\n")[0]


def test_cli_prints_cosigned_note_and_refuses_with_exit_1(cluster: Cluster, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from spark_slurm.cli import run  # noqa: PLC0415

    state = tmp_path / "w"
    cp = tmp_path / "n1.cp"
    cp.write_text(checkpoints(cluster.n1)[-1])
    assert run(["witness", "--state", str(state), "--keys", str(cluster.trust), str(cp)]) == 0
    out = capsys.readouterr().out
    assert out.count("— ") == 2
    (cluster.trust / "n1.pub").unlink()
    assert run(["witness", "--state", str(state), "--keys", str(cluster.trust), str(cp)]) == 1
    assert "UNKNOWN_KEY" in capsys.readouterr().err


def test_an_endorsed_key_rotation_is_followed_through_the_ledger(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    """After `ledger rotate-key` the node signs with a key the head node has not seen;
    given the ledger, the witness follows the endorsement recorded in it."""
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    first = witness_checkpoint(state, checkpoints(cluster.n1)[-1], keys)
    with Ledger.open(cluster.n1, None, load_signing_key(cluster.root / "keys-n1" / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        led.rotate_signing_key(Ed25519PrivateKey.generate())
        write_job(led, cluster.clock, "n1", "301", [0], {0: 5})
        rotated = led.checkpoint().text
    forged = tmp_path / "forged.db"
    conn = sqlite3.connect(forged)
    with sqlite3.connect(cluster.n1) as src:  # online backup: the WAL's frames too
        src.backup(conn)
    body = next(b for (b,) in conn.execute("SELECT body FROM per WHERE kind = 'key'")
                if b'"event":"rotate"' in b)
    good_sig = body.split(b'"endorsement":"')[1].split(b'"')[0]
    bad_sig = Ed25519PrivateKey.generate().sign(b"x")  # right length, wrong signer
    conn.execute("UPDATE per SET body = ? WHERE body = ?",
                 (body.replace(good_sig, base64.b64encode(bad_sig)), body))
    conn.commit()
    conn.close()
    proof = consistency_proof(leaves(cluster.n1), first.size)
    with pytest.raises(WitnessError, match="n1"):  # no ledger: only the trusted key
        witness_checkpoint(state, rotated, keys, proof)
    with pytest.raises(WitnessError, match="n1"):  # an endorsement the old key never made
        witness_checkpoint(state, rotated, keys, proof, ledger=forged)
    result = witness_checkpoint(state, rotated, keys, ledger=cluster.n1)
    assert result.status == "accepted" and result.previous_size == first.size
    stored = latest(state, "spark/spark/n1")
    assert stored is not None and stored.size == result.size


def test_a_proof_from_another_size_is_stale_not_a_fork(cluster: Cluster, tmp_path: Path) -> None:
    """A segment's proof starts at the size the witness held when it was exported; if a
    15-minute run cosigned a newer one since, the proof is refused as stale."""
    state = tmp_path / "w"
    keys = KeyRing.load(cluster.trust)
    witness_checkpoint(state, checkpoints(cluster.n1)[-1], keys)
    mid = witness_checkpoint(state, grow(cluster, cluster.n1, "301"), keys, ledger=cluster.n1)
    newer = grow(cluster, cluster.n1, "302")
    old_size = mid.previous_size
    assert old_size is not None
    stale = consistency_proof(leaves(cluster.n1), old_size)
    with pytest.raises(WitnessError, match="collect again") as err:
        witness_checkpoint(state, newer, keys, stale, proof_from=old_size)
    assert "FORK" not in err.value.message
    fresh = consistency_proof(leaves(cluster.n1), mid.size)
    assert witness_checkpoint(state, newer, keys, fresh, proof_from=mid.size).status == \
        "accepted"


def test_a_segment_alone_is_witnessed(cluster: Cluster, tmp_path: Path) -> None:
    """No ledger on the head node: the segment's checkpoint, proof and key records."""
    from spark_slurm.head.witness import witness_segment  # noqa: PLC0415
    from spark_slurm.ledger.segment import export_segment  # noqa: PLC0415

    state = tmp_path / "w"
    first = witness_checkpoint(state, checkpoints(cluster.n1)[-1], KeyRing.load(cluster.trust))
    with Ledger.open(cluster.n1, None, load_signing_key(cluster.root / "keys-n1" / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        led.rotate_signing_key(Ed25519PrivateKey.generate())
        write_job(led, cluster.clock, "n1", "301", [0], {0: 5})
        rotated = led.checkpoint()
        size = led.size
    seg = tmp_path / "n1.seg"
    export_segment(cluster.n1, seg, size - 3, proof_from=first.size)
    result = witness_segment(state, seg, cluster.trust)
    assert result is not None and result.status == "accepted"
    assert (result.previous_size, result.size) == (first.size, rotated.size)
    empty = tmp_path / "none.seg"
    export_segment(cluster.n1, empty, size - 1, proof_from=rotated.size)
    again = witness_segment(state, empty, cluster.trust)
    assert again is not None and again.status == "unchanged"
