"""Per-node tamper-evident Power Event Record ledger (see docs/ledger-format.md)."""

from __future__ import annotations

from spark_slurm.ledger.checkpoint import (
    Checkpoint,
    export_checkpoint,
    load_checkpoint,
    parse_checkpoint,
    verify_checkpoint,
)
from spark_slurm.ledger.records import Receipt, Record
from spark_slurm.ledger.store import Ledger
from spark_slurm.ledger.verify import VerifyReport, verify_ledger

__all__ = [
    "Checkpoint",
    "Ledger",
    "Receipt",
    "Record",
    "VerifyReport",
    "export_checkpoint",
    "load_checkpoint",
    "parse_checkpoint",
    "verify_checkpoint",
    "verify_ledger",
]
