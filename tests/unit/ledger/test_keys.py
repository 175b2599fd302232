"""Key files: keygen writes them safely; loose or malformed keys are refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger.keys import (
    keygen,
    load_hmac_key,
    load_public_key,
    load_signing_key,
    signing_key_id,
)


def test_keygen_writes_three_files_with_safe_modes(tmp_path: Path) -> None:
    files = keygen(tmp_path / "k")
    assert stat.S_IMODE(files.hmac_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.signing_key.stat().st_mode) == 0o600
    assert len(load_hmac_key(files.hmac_key)) == 32
    private = load_signing_key(files.signing_key)
    public = load_public_key(files.public_key)
    assert signing_key_id(private.public_key()) == signing_key_id(public)
    assert files.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    files = keygen(tmp_path / "k")
    before = files.hmac_key.read_bytes()
    with pytest.raises(LedgerKeyError, match="already exists"):
        keygen(tmp_path / "k")
    assert files.hmac_key.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_keys_readable_by_others_are_refused(tmp_path: Path, mode: int) -> None:
    files = keygen(tmp_path / "k")
    for path, load in ((files.hmac_key, load_hmac_key), (files.signing_key, load_signing_key)):
        path.chmod(mode)
        with pytest.raises(LedgerKeyError, match="group or others"):
            load(path)


def test_malformed_key_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not hex at all\n")
    bad.chmod(0o600)
    with pytest.raises(LedgerKeyError, match="not an HMAC key"):
        load_hmac_key(bad)
    bad.write_text("abcd\n")
    with pytest.raises(LedgerKeyError, match="32 bytes"):
        load_hmac_key(bad)
    with pytest.raises(LedgerKeyError, match="not a PEM private key"):
        load_signing_key(bad)
    with pytest.raises(LedgerKeyError, match="not a PEM public key"):
        load_public_key(bad)
    with pytest.raises(LedgerKeyError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub")
    files = keygen(tmp_path / "k")
    with pytest.raises(LedgerKeyError, match="not a PEM public key"):
        load_public_key(files.signing_key)
