"""C2SP signed-note checkpoints: format, signatures, and every edit refused."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.errors import CheckpointError, CheckpointInvalid
from spark_slurm.ledger import (
    Ledger,
    export_checkpoint,
    load_checkpoint,
    parse_checkpoint,
    verify_checkpoint,
    verify_ledger,
)
from spark_slurm.ledger.checkpoint import note_key_hash, origin_for, sign_checkpoint
from spark_slurm.ledger.keys import public_raw
from spark_slurm.ledger.merkle import leaf_hash, root
from tests.unit.ledger.conftest import Keys


def test_text_is_a_c2sp_signed_note(tmp_path: Path, keys: Keys) -> None:
    with Ledger.open(tmp_path / "l.db", signing_key=keys.signing, node="n7",
                     cluster="west") as led:
        led.append("cap", {"a": 1})
        cp = led.checkpoint()
        leaves = [leaf_hash(r.body_bytes) for r in led.records()]
        head = led.head()
    assert head is not None
    lines = cp.text.split("\n")
    assert lines[:4] == ["spark/west/n7", "2", base64.b64encode(root(leaves)).decode(),
                         f"head {head.hash}"]
    assert lines[4] == "" and lines[5].startswith("— spark/west/n7 ") and lines[6] == ""
    blob = base64.b64decode(lines[5].split(" ")[2])
    name = b"spark/west/n7"
    expected_hash = hashlib.sha256(name + b"\n\x01" + public_raw(keys.public)).digest()[:4]
    assert blob[:4] == expected_hash == note_key_hash("spark/west/n7", keys.public)
    keys.public.verify(blob[4:], "\n".join(lines[:4]).encode() + b"\n")
    assert (cp.size, cp.root, cp.head_hash, cp.origin) == (2, root(leaves), head.hash,
                                                           "spark/west/n7")
    assert parse_checkpoint(cp.text) == cp
    assert verify_checkpoint(cp.text, keys.public, origin="spark/west/n7") == cp


def _cp(keys: Keys) -> str:
    return sign_checkpoint("spark/c/n1", 5, bytes(range(32)), "ab" * 32, keys.signing).text


@pytest.mark.parametrize(("old", "new"), [
    ("\n5\n", "\n6\n"),                 # size
    ("AAECAwQF", "AAECAwQG"),           # root
    ("spark/c/n1\n", "spark/c/n2\n"),   # origin
    ("head abab", "head abac"),          # chain head
])
def test_edited_checkpoint_fails_verification(keys: Keys, old: str, new: str) -> None:
    text = _cp(keys)
    assert old in text
    with pytest.raises(CheckpointInvalid):
        verify_checkpoint(text.replace(old, new, 1), keys.public)


def test_unknown_key_fails_verification(keys: Keys) -> None:
    with pytest.raises(CheckpointInvalid, match="not signed by the given key"):
        verify_checkpoint(_cp(keys), Ed25519PrivateKey.generate().public_key())


def test_flipped_signature_fails_verification(keys: Keys) -> None:
    text = _cp(keys)
    sig_line = text.split("\n")[5]
    blob = bytearray(base64.b64decode(sig_line.split(" ")[2]))
    blob[10] ^= 1
    forged = text.replace(sig_line.split(" ")[2], base64.b64encode(bytes(blob)).decode())
    with pytest.raises(CheckpointInvalid, match="bad signature"):
        verify_checkpoint(forged, keys.public)


def test_origin_must_match_when_asked(keys: Keys) -> None:
    with pytest.raises(CheckpointInvalid, match="origin"):
        verify_checkpoint(_cp(keys), keys.public, origin="spark/c/other")


@pytest.mark.parametrize("text", [
    "", "no blank line\n", "spark/c/n1\n5\nAAAA\nhead " + "ab" * 32 + "\n\n— n x\n",
    "spark/c/n1\nfive\n" + base64.b64encode(bytes(32)).decode() + "\nhead " + "ab" * 32
    + "\n\n— n AAAAAAAA\n",
    "spark/c/n1\n05\n" + base64.b64encode(bytes(32)).decode() + "\nhead " + "ab" * 32
    + "\n\n— n AAAAAAAA\n",
    "spark/c/n1\n5\n" + base64.b64encode(bytes(32)).decode() + "\n\n— n AAAAAAAA\n",
    "spark/c/n1\n5\n" + base64.b64encode(bytes(32)).decode() + "\nhead " + "ab" * 32 + "\n\n",
    "spark/c/n1\n5\n" + base64.b64encode(bytes(32)).decode() + "\nhead " + "ab" * 32
    + "\n\nno dash\n",
])
def test_malformed_checkpoints_get_a_clear_error(text: str) -> None:
    with pytest.raises(CheckpointError, match="checkpoint"):
        parse_checkpoint(text)


def test_export_and_load_round_trip(tmp_path: Path, keys: Keys) -> None:
    cp = parse_checkpoint(_cp(keys))
    path = export_checkpoint(cp, tmp_path / "kept.cp")
    assert path.read_text() == cp.text
    assert load_checkpoint(path) == cp
    (tmp_path / "junk.cp").write_text("junk\n")
    with pytest.raises(CheckpointError, match=r"junk\.cp: checkpoint"):
        load_checkpoint(tmp_path / "junk.cp")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.cp")


def test_origin_names_cluster_and_node() -> None:
    assert origin_for("west", "gpu01") == "spark/west/gpu01"
    with pytest.raises(CheckpointError, match="spaces"):
        origin_for("west", "gpu 01")


def test_checkpoints_kept_in_the_ledger_are_verified(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=keys.signing, node="n1") as led:
        led.append("cap", {"a": 1})
        led.checkpoint()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE checkpoint SET text = replace(text, 'spark/spark/n1', 'spark/spark/n9')")
    conn.commit()
    conn.close()
    report = verify_ledger(path)
    assert not report.ok and "stored checkpoint" in report.reason
