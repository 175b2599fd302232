"""Signing-key rotation of a ledger and its key files, and recovery after a crash."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.checkpoint import verify_checkpoint
from spark_slurm.ledger.keys import (
    keygen,
    load_hmac_key,
    load_public_key,
    load_signing_key,
    signing_key_id,
)
from spark_slurm.ledger.rotation import next_path, open_rotating, rotate, stage_key


def _ledger(tmp_path: Path) -> tuple[Path, Path, bytes]:
    files = keygen(tmp_path / "keys")
    k0 = load_hmac_key(files.hmac_key)
    path = tmp_path / "node.db"
    with open_rotating(path, k0, files.signing_key, node="n1") as led:
        led.append("cap", {"job_id": "1", "a": 1})
    return path, files.signing_key, k0


def test_rotate_replaces_the_key_files_and_the_ledger_follows(tmp_path: Path) -> None:
    path, key_file, k0 = _ledger(tmp_path)
    old_pub = load_public_key(key_file.with_suffix(".pub"))
    with open_rotating(path, k0, key_file, node="n1") as led:
        done = rotate(led, key_file)
        assert led.signing_key_id == done.key_id != done.prev_key_id
        led.append("cap", {"job_id": "2", "a": 2})
    assert done.prev_key_id == signing_key_id(old_pub)
    new_key = load_signing_key(key_file)  # the file now holds the new key, still 0600
    assert signing_key_id(new_key.public_key()) == done.key_id
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_public_key(done.public_key).public_bytes_raw() == \
        new_key.public_key().public_bytes_raw()
    assert not next_path(key_file).exists()
    # a verifier holding only the original public key follows the endorsed rotation
    report = verify_ledger(path, k0, public_key=old_pub)
    assert report.ok, report.reason
    assert report.signing_keys == (done.prev_key_id, done.key_id)
    with Ledger.open(path, k0, node="n1") as led:
        newest = led.checkpoints()[-1]
    verify_checkpoint(newest.text, new_key.public_key())
    # the daemon restarts with the key file as it is now
    with open_rotating(path, k0, key_file, node="n1") as led:
        led.append("cap", {"job_id": "3", "a": 3})


def test_a_crash_after_the_rotation_record_is_finished_at_the_next_open(
        tmp_path: Path) -> None:
    path, key_file, k0 = _ledger(tmp_path)
    old_text = key_file.read_bytes()
    with open_rotating(path, k0, key_file, node="n1") as led:
        new = stage_key(key_file)
        led.rotate_signing_key(new)  # committed; the process dies before installing
    assert key_file.read_bytes() == old_text and next_path(key_file).exists()
    with pytest.raises(LedgerKeyError, match="current key"):
        Ledger.open(path, k0, load_signing_key(key_file), node="n1")
    with open_rotating(path, k0, key_file, node="n1") as led:
        assert led.signing_key_id == signing_key_id(new.public_key())
    assert not next_path(key_file).exists()
    assert signing_key_id(load_signing_key(key_file).public_key()) == \
        signing_key_id(new.public_key())
    assert verify_ledger(path, k0).ok


def test_a_crash_before_the_rotation_record_drops_the_staged_key(tmp_path: Path) -> None:
    path, key_file, k0 = _ledger(tmp_path)
    old_id = signing_key_id(load_signing_key(key_file).public_key())
    stage_key(key_file)  # the process dies before the ledger names the key
    with open_rotating(path, k0, key_file, node="n1") as led:
        assert led.signing_key_id == old_id
    assert not next_path(key_file).exists()


def test_a_ledger_without_a_signing_key_cannot_rotate(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "plain.db", node="n1") as led, \
            pytest.raises(LedgerKeyError, match="no signing key to rotate"):
        rotate(led, tmp_path / "node.key")
    assert not next_path(tmp_path / "node.key").exists()


def test_a_key_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    path, key_file, k0 = _ledger(tmp_path)
    before = key_file.read_bytes()
    # where the staged key's temp file must go, a directory stands in the way
    (key_file.parent / f".{key_file.name}.next.{os.getpid()}.tmp").mkdir()
    with open_rotating(path, k0, key_file, node="n1") as led:
        old_id = led.signing_key_id
        size = led.size
        with pytest.raises(LedgerKeyError, match="cannot write the new key"):
            rotate(led, key_file)
        assert led.signing_key_id == old_id and led.size == size
    assert key_file.read_bytes() == before and not next_path(key_file).exists()
