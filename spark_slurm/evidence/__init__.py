"""Evidence bundles: one job's PERs with everything needed to check them offline."""

from __future__ import annotations

from spark_slurm.evidence.build import (
    EvidenceSummary,
    Signer,
    Witnessed,
    make_evidence,
    witness_from_files,
    witness_from_state,
)
from spark_slurm.evidence.verify import EvidenceReport, Pins, check_bundle, verify_bundle

__all__ = ["EvidenceReport", "EvidenceSummary", "Pins", "Signer", "Witnessed", "check_bundle",
           "make_evidence", "verify_bundle", "witness_from_files", "witness_from_state"]
