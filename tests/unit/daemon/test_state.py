"""Governed state: replay of the ledger, restore intents, throttle-aware targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from spark_slurm.daemon.actuation import Energy, energy_between
from spark_slurm.daemon.state import (
    IntentStore,
    JobState,
    NodeState,
    Throttle,
    governed_from_records,
    governed_latest,
)
from spark_slurm.gpu.backend import Sample


class Rec(NamedTuple):
    kind: str
    body: dict[str, Any]


def test_replay_follows_every_governing_kind_in_order() -> None:
    records = [
        Rec("reconcile", {"gpus": [{"index": 0, "intended_mw": 1_000_000},
                                   {"index": 1, "intended_mw": 1_000_000},
                                   {"index": 2, "error": "GpuLost: gone"}]}),
        Rec("cap", {"gpus": [{"index": 0, "intended_mw": 500_000},
                             {"index": 1, "intended_mw": 500_000, "error": "GpuNoPermission"}]}),
        Rec("drift", {"gpu": 0, "action": "record", "expected_mw": 500_000,
                      "observed_mw": 900_000}),
        Rec("drift", {"gpu": 1, "action": "reconcile", "expected_mw": 1_000_000,
                      "observed_mw": 700_000}),
        Rec("throttle", {"gpu": 1, "from_mw": 1_000_000, "to_mw": 300_000}),
        Rec("fault", {"gpu": 1}),
        Rec("facility", {"gpus": [0]}),
    ]
    assert governed_from_records(records) == {0: 900_000, 1: 300_000}
    records.append(Rec("release", {"gpu": 1, "to_mw": 1_000_000}))
    records.append(Rec("restore", {"gpus": [{"index": 0, "intended_mw": 1_000_000}]}))
    assert governed_from_records(records) == {0: 1_000_000, 1: 1_000_000}


_GPU = st.integers(0, 3)
_MW = st.integers(100_000, 1_000_000)
_ENTRY = st.one_of(
    st.builds(lambda g, mw: {"index": g, "intended_mw": mw}, _GPU, _MW),
    st.builds(lambda g: {"index": g, "error": "GpuLost: gone"}, _GPU))
_RECORD = st.one_of(
    st.builds(Rec, st.sampled_from(["cap", "restore", "reconcile"]),
              st.builds(lambda es: {"gpus": es}, st.lists(_ENTRY, max_size=4))),
    st.builds(lambda g, a, e, o: Rec("drift", {"gpu": g, "action": a, "expected_mw": e,
                                               "observed_mw": o}),
              _GPU, st.sampled_from(["record", "reconcile"]), _MW, _MW),
    st.builds(lambda k, g, mw, err: Rec(k, {"gpu": g, "to_mw": mw} | (
        {"error": "GpuNoPermission"} if err else {})),
        st.sampled_from(["throttle", "release"]), _GPU, _MW, st.booleans()),
    st.builds(lambda g: Rec("fault", {"gpu": g}), _GPU))


@settings(max_examples=300, deadline=None)
@given(records=st.lists(_RECORD, max_size=30), gpus=st.sets(_GPU))
def test_newest_first_with_early_stop_agrees_with_the_full_replay(
        records: list[Rec], gpus: set[int]) -> None:
    """Start-up reads the ledger backwards and stops early; every GPU it was asked for
    (and any other it settled on the way) gets the full replay's value."""
    full = governed_from_records(records)
    latest = governed_latest(reversed(records), gpus)
    assert {g: latest.get(g) for g in gpus} == {g: full.get(g) for g in gpus}
    assert all(full[g] == mw for g, mw in latest.items())


def test_newest_first_stops_at_the_latest_start_up() -> None:
    read: list[Rec] = []
    history = [Rec("cap", {"gpus": [{"index": 0, "intended_mw": 1}]})] * 1000 + [
        Rec("reconcile", {"gpus": [{"index": 0, "intended_mw": 500_000},
                                   {"index": 1, "intended_mw": 700_000}]}),
        Rec("cap", {"gpus": [{"index": 1, "intended_mw": 300_000}]})]

    def newest_first() -> Any:
        for rec in reversed(history):
            read.append(rec)
            yield rec

    assert governed_latest(newest_first(), [0, 1]) == {0: 500_000, 1: 300_000}
    assert len(read) == 2


def test_intents_begin_end_compact_and_a_torn_tail(tmp_path: Path) -> None:
    store = IntentStore(tmp_path)
    assert store.load() == {}
    job = JobState(job_id="9", uid=5, user="u", gpus=[1, 2], previous_mw={1: 700_000, 2: 1},
                   start_energy_mj={1: 10, 2: 20}, start_energy_epoch={1: 0, 2: 3},
                   granted_mw=400_000, account="physics")
    other = JobState(job_id="10", uid=5, user="u", gpus=[3], previous_mw={3: 1},
                     start_energy_mj={}, start_energy_epoch={}, granted_mw=1)
    store.begin(job)
    store.begin(other)
    store.end("10")
    assert IntentStore(tmp_path).load() == {"9": job}  # what a restarted daemon reads
    with (tmp_path / "intents.jsonl").open("ab") as fh:
        fh.write(b'{"op": "begin", "job": {"job_id": "11", "ui')  # killed mid-write
    assert IntentStore(tmp_path).load() == {"9": job}
    store.compact({"9": job})
    lines = (tmp_path / "intents.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["job"]["job_id"] == "9"
    store.end("9")
    assert IntentStore(tmp_path).load() == {}
    store.close()


def test_target_respects_a_throttle_and_remembers_the_new_base() -> None:
    state = NodeState()
    assert state.target(0, 600_000) == 600_000
    state.throttled[0] = Throttle(base_mw=600_000, to_mw=300_000, ref=None)
    assert state.target(0, 500_000) == 300_000
    assert state.throttled[0].base_mw == 500_000
    assert state.target(0, 200_000) == 200_000


def _sample(energy: int, epoch: int) -> Sample:
    return Sample(time_ns=1, power_mw=1, energy_mj=energy, temp_mc=1, util_pct=0, reasons=0,
                  enforced_mw=1, energy_epoch=epoch)


def test_energy_survives_counter_resets() -> None:
    assert energy_between(1_000, 0, _sample(5_000, 0)) == Energy(4_000, False)
    reloaded = energy_between(1_000, 0, _sample(300, 1))
    assert reloaded.reset and reloaded.energy_mj == 300
    assert energy_between(1_000, 0, _sample(500, 0)).reset  # went backwards
