"""The fake-NVML worker hands mutmut's function hits back to the test that asked.

mutmut's stats pass maps each test to the mutated functions it ran, but the NVML
backend of the fake-NVML tests runs in a worker process, whose hits the test
process never sees; without them every mutant of nvml.py that only those tests
reach would be reported as surviving. These tests fake mutmut's state module.
"""

from __future__ import annotations

import sys
import types

import pytest

from tests.unit.gpu.fakenvml import record_worker_hits, worker_hits


@pytest.fixture
def mutmut_stats(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """A stand-in for `mutmut.state.state()._stats` (mutmut 3.8.1)."""
    hits: set[str] = set()
    holder = types.SimpleNamespace(_stats=hits)
    module = types.ModuleType("mutmut.state")
    module.state = lambda: holder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mutmut.state", module)
    return hits


def test_in_the_stats_pass_the_worker_sends_each_hit_once(
        mutmut_stats: set[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    mutmut_stats.update({"spark_slurm.gpu.nvml.xǁNvmlBackendǁsample", "spark_slurm.gpu.nvml._int"})
    assert worker_hits() == ["spark_slurm.gpu.nvml._int",
                             "spark_slurm.gpu.nvml.xǁNvmlBackendǁsample"]
    assert mutmut_stats == set()  # the next answer carries only what ran after this one
    assert worker_hits() == []


def test_the_test_process_files_the_workers_hits_as_its_own(
        mutmut_stats: set[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    mutmut_stats.add("tests.already")
    record_worker_hits(["spark_slurm.gpu.nvml.xǁNvmlBackendǁlimits"])
    assert mutmut_stats == {"tests.already", "spark_slurm.gpu.nvml.xǁNvmlBackendǁlimits"}


@pytest.mark.parametrize("mutant", [None, "", "spark_slurm.gpu.nvml.x_int__mutmut_1", "fail"])
def test_outside_the_stats_pass_nothing_is_sent_or_recorded(
        mutmut_stats: set[str], monkeypatch: pytest.MonkeyPatch, mutant: str | None) -> None:
    if mutant is None:
        monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    else:
        monkeypatch.setenv("MUTANT_UNDER_TEST", mutant)
    mutmut_stats.add("spark_slurm.gpu.nvml._text")
    assert worker_hits() == []
    record_worker_hits(["spark_slurm.gpu.nvml._int"])
    assert mutmut_stats == {"spark_slurm.gpu.nvml._text"}


def test_a_plain_test_run_never_imports_mutmut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    monkeypatch.setitem(sys.modules, "mutmut.state", None)  # any import would raise
    assert worker_hits() == []
    record_worker_hits([])
    record_worker_hits(["spark_slurm.gpu.nvml._int"])
