"""`verify_files` (what `sparkctl verify` runs) with several ledgers, keys and kept
checkpoints: each checkpoint goes to the ledger whose origin it names, the keys
apply to every ledger, and the one-line summary says exactly what was checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import LedgerError, LedgerKeyError
from spark_slurm.ledger import VerifyReport, export_checkpoint, verify_ledger
from spark_slurm.ledger.keys import keygen
from spark_slurm.ledger.store import Ledger
from spark_slurm.ledger.verify import verify_files
from tests.unit.ledger.conftest import Built, Keys, small_ledger, write_records


def _node(tmp_path: Path, keys: Keys, node: str, n: int) -> tuple[Path, Path]:
    """A ledger of `node` (the shared test keys) and a kept checkpoint file of it."""
    clock = ManualClock()
    path = tmp_path / f"{node}.db"
    with Ledger.open(path, keys.hmac, keys.signing, node=node, cluster="c1", clock=clock,
                     epoch_seconds=60) as led:
        write_records(led, clock, n)
        cp = led.checkpoint()
        write_records(led, clock, 3, start=n)  # the kept checkpoint is not the newest
    return path, export_checkpoint(cp, tmp_path / f"{node}.cp")


@pytest.fixture
def two(tmp_path: Path, keys: Keys) -> tuple[list[Path], list[Path]]:
    a, cp_a = _node(tmp_path, keys, "n1", 12)
    b, cp_b = _node(tmp_path, keys, "n2", 17)
    return [a, b], [cp_a, cp_b]


def test_each_kept_checkpoint_is_checked_against_its_own_ledger(
        two: tuple[list[Path], list[Path]], keys: Keys) -> None:
    ledgers, cps = two
    key, pub = str(keys.dir / "hmac.key"), str(keys.dir / "node.pub")
    reports = verify_files(ledgers, key, pub, [cps[1], cps[0]])  # order does not matter
    alone = [verify_files([p], key, pub, [cp])[0] for p, cp in zip(ledgers, cps, strict=True)]
    assert [r.ok for r in reports] == [True, True], reports
    assert [r.hmac_checked for r in reports] == [True, True]
    assert [r.checkpoints_checked for r in reports] == [r.checkpoints_checked for r in alone]
    # one kept checkpoint more than the ledger's own
    bare = [verify_ledger(p, keys.hmac).checkpoints_checked for p in ledgers]
    assert [r.checkpoints_checked for r in reports] == [n + 1 for n in bare]


def test_a_checkpoint_for_none_of_the_ledgers_is_refused(
        two: tuple[list[Path], list[Path]], keys: Keys, tmp_path: Path) -> None:
    ledgers, cps = two
    _, stray = _node(tmp_path, keys, "n3", 5)
    with pytest.raises(LedgerError) as err:
        verify_files(ledgers, checkpoint_files=[cps[0], stray])
    assert err.value.message == (f"{stray}: checkpoint is for spark/c1/n3, which none of the "
                                 "ledgers given is")


def test_a_public_key_that_signed_neither_ledger_is_refused(
        two: tuple[list[Path], list[Path]], tmp_path: Path) -> None:
    ledgers, _ = two
    other = keygen(tmp_path / "other")
    with pytest.raises(LedgerKeyError) as err:
        verify_files(ledgers, pubkey_file=str(other.public_key))
    assert "is not a signing key of this ledger" in err.value.message


def test_a_wrong_hmac_key_is_refused_for_every_ledger(two: tuple[list[Path], list[Path]],
                                                      tmp_path: Path) -> None:
    ledgers, _ = two
    other = keygen(tmp_path / "other")
    with pytest.raises(LedgerKeyError):
        verify_files(ledgers, key_file=str(other.hmac_key))


@pytest.mark.parametrize(("report", "line"), [
    (VerifyReport("a.db", True, 12, "ab", checkpoints_checked=2, hmac_checked=True),
     "a.db: ok, 12 records, head ab, 2 checkpoints, HMAC verified"),
    (VerifyReport("a.db", True, 12, "ab", checkpoints_checked=0, first_seq=768),
     "a.db: ok, 12 records (pruned before seq 768), head ab, 0 checkpoints"),
    (VerifyReport("a.db", False, 12, None, first_bad_seq=0, reason="seq 0 is not a genesis"),
     "a.db: first bad seq 0: seq 0 is not a genesis"),
    (VerifyReport("a.db", False, 12, None, reason="saved Merkle frontier does not match"),
     "a.db: saved Merkle frontier does not match"),
])
def test_the_summary_line_says_what_was_checked(report: VerifyReport, line: str) -> None:
    assert report.summary() == line


def test_signing_keys_of_a_rotated_ledger_are_reported(build: Callable[..., Built],
                                                       keys: Keys) -> None:
    assert len(verify_ledger(build(8).path, keys.hmac).signing_keys) == 2


def test_an_hmac_key_for_a_ledger_written_without_hmac_is_refused(keys: Keys,
                                                                  tmp_path: Path) -> None:
    path = small_ledger(tmp_path / "plain.db", None, keys.signing, 3)
    with pytest.raises(LedgerKeyError) as err:
        verify_ledger(path, keys.hmac)
    assert err.value.message == f"{path}: ledger was written without HMAC; no key applies"
