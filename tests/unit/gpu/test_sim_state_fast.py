"""The sim state store's fast paths give exactly what the checked paths give."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import SimStateError
from spark_slurm.gpu import sim_state
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.gpu.sim_physics import Fault, GpuState, SimModel, _segment, model_named


def _checked(root: Path, index: int) -> GpuState:
    """read_gpu with the fast path switched off: the reference."""
    saved = sim_state._fast_state
    sim_state._fast_state = lambda data: None
    try:
        return sim_state.read_gpu(root, index)
    finally:
        sim_state._fast_state = saved


def test_fast_read_equals_checked_read(tmp_path: Path) -> None:
    clock = ManualClock(1_000_000_000)
    fleet = SimFleet.init(tmp_path / "f", 3, "b200", clock=clock)
    fleet.set_load(0.7, index=0)
    fleet.set_limit(1, 450_000)
    fleet.inject_fault(2, "silent-mismatch", seconds=5)   # faults: the checked path
    clock.advance(1.5)
    fleet.set_limit(0, 300_000)
    for i in range(3):
        fast, ref = sim_state.read_gpu(tmp_path / "f", i), _checked(tmp_path / "f", i)
        assert fast == ref
        assert [type(getattr(fast, f)) for f in ("power_mw", "temp_mc", "energy_mj", "util")] \
            == [float] * 4


def test_stored_form_is_what_asdict_wrote(tmp_path: Path) -> None:
    state = GpuState(5, 1.5, 2.5, 3.5, 400_000, 0.25, 2, False,
                     (Fault("thermal-spike", 1, None, 0), Fault("silent-mismatch", 2, 9, 7)))
    expected = asdict(state)
    expected["faults"] = [asdict(f) for f in state.faults]
    assert sim_state._state_to_json(state) == expected
    sim_state.write_gpu(tmp_path, 0, state)
    assert json.loads((tmp_path / "gpu0.json").read_text()) == expected
    assert sim_state.read_gpu(tmp_path, 0) == state


@pytest.mark.parametrize(("field", "value"), [
    ("t_ns", True), ("t_ns", 1.0), ("requested_mw", 1.5), ("power_mw", "1"),
    ("persistence", 1), ("energy_epoch", None), ("faults", {}),
])
def test_odd_types_take_the_checked_path_and_its_error(tmp_path: Path, field: str,
                                                       value: object) -> None:
    SimFleet.init(tmp_path / "f", 1, "b200")
    path = tmp_path / "f" / "gpu0.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(SimStateError, match=f"'{field}' missing or of the wrong type"):
        sim_state.read_gpu(tmp_path / "f", 0)


def test_segment_keeps_every_other_field() -> None:
    model: SimModel = model_named("b200")
    s = GpuState(0, 100_000.0, 40_000.0, 0.0, 500_000, 0.5, 3, False,
                 (Fault("thermal-spike", 0, None, 0),))
    out = _segment(model, s, 2_000_000_000)
    assert (out.t_ns, out.requested_mw, out.util, out.energy_epoch, out.persistence,
            out.faults) == (2_000_000_000, 500_000, 0.5, 3, False, s.faults)
    assert out.energy_mj > 0


def test_threads_writing_at_once_leave_no_temp_files(tmp_path: Path) -> None:
    fleet = SimFleet.init(tmp_path / "f", 2, "b200")

    def writer(i: int) -> None:
        for k in range(30):
            fleet.set_limit(i % 2, 300_000 + 1000 * (i * 30 + k))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [p for p in (tmp_path / "f").iterdir() if p.name.endswith(".tmp")]
    assert {fleet.limits(0).requested_mw, fleet.limits(1).requested_mw} <= {
        300_000 + 1000 * n for n in range(120)}


def test_exchange_and_plain_rename_store_the_same_state(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = [ManualClock(5_000_000_000) for _ in range(2)]
    fleets = []
    for name, clock in zip(("swap", "plain"), clocks, strict=True):
        if name == "plain":  # a kernel or file system without RENAME_EXCHANGE
            monkeypatch.setattr(sim_state, "_EXCHANGE", sim_state._Exchanger())
            sim_state._EXCHANGE.usable = False
        fleet = SimFleet.init(tmp_path / name, 2, "b200", clock=clock, name="same")
        fleet.set_load(0.5)
        clock.advance(2.0)
        fleet.set_limit(1, 350_000)
        fleets.append(fleet)
    for i in range(2):
        assert (tmp_path / "swap" / f"gpu{i}.json").read_bytes() == \
            (tmp_path / "plain" / f"gpu{i}.json").read_bytes()
    for name in ("swap", "plain"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            "fleet.json", "gpu0.json", "gpu0.lock", "gpu1.json", "gpu1.lock"]


def test_first_write_falls_back_to_a_plain_rename(tmp_path: Path) -> None:
    sim_state.atomic_write_json(tmp_path / "new.json", {"a": 1})  # nothing to swap with yet
    sim_state.atomic_write_json(tmp_path / "new.json", {"a": 2})  # now swapped
    assert json.loads((tmp_path / "new.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["new.json"]


def test_exchange_reports_unexpected_errors(tmp_path: Path) -> None:
    ex = sim_state._Exchanger()
    (tmp_path / "f").write_text("")
    (tmp_path / "g").write_text("")
    if not ex.swap(str(tmp_path / "f"), tmp_path / "g"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    with pytest.raises(NotADirectoryError):  # not a case for the plain-rename fallback
        ex.swap(str(tmp_path / "f"), tmp_path / "g" / "y")
