"""The simulated GPU reacts to caps and load like hardware does, observed through the backend."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_slurm.clock import ManualClock
from spark_slurm.gpu import GpuBackend, open_backend
from spark_slurm.gpu.backend import REASON_GPU_IDLE, REASON_SW_POWER_CAP
from spark_slurm.gpu.sim import SimFleet


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def _busy_b200(tmp_path: Path, clock: ManualClock) -> tuple[SimFleet, GpuBackend]:
    fleet = SimFleet.init(tmp_path / "f", 2, "b200", clock=clock)
    fleet.set_load(1.0)
    clock.advance(60)  # long enough for power and temperature to settle
    return fleet, open_backend("sim", state_dir=tmp_path / "f", clock=clock)


def test_cap_cut_settles_power_within_a_second_and_temperature_later(
        tmp_path: Path, clock: ManualClock) -> None:
    _, gpu = _busy_b200(tmp_path, clock)
    busy = gpu.sample(0)
    assert busy.power_mw >= 990_000
    assert not busy.reasons & REASON_SW_POWER_CAP
    gpu.set_power_limit(0, 300_000)
    trace = []
    for _ in range(10):
        clock.advance(0.1)
        trace.append(gpu.sample(0))
    one_second = trace[-1]
    assert one_second.power_mw < 300_000
    assert all(b.power_mw <= a.power_mw for a, b in itertools.pairwise(trace))
    assert trace[0].power_mw > 300_000  # a lag, not a jump
    assert one_second.reasons & REASON_SW_POWER_CAP
    assert one_second.enforced_mw == 300_000
    clock.advance(60)
    settled = gpu.sample(0)
    assert 280_000 <= settled.power_mw < 300_000
    drop = busy.temp_mc - settled.temp_mc
    assert drop > 20_000  # 700 W less heat is a big change in temperature...
    assert busy.temp_mc - one_second.temp_mc < 0.3 * drop  # ...that arrives much later


def test_energy_is_the_integral_of_power(tmp_path: Path, clock: ManualClock) -> None:
    _, gpu = _busy_b200(tmp_path, clock)
    gpu.set_power_limit(0, 400_000)
    start = gpu.sample(0)
    integral = 0.0
    prev = start
    for _ in range(400):  # 40 s in 100 ms steps, trapezoid rule
        clock.advance(0.1)
        cur = gpu.sample(0)
        integral += (prev.power_mw + cur.power_mw) / 2 * 0.1
        prev = cur
    measured = prev.energy_mj - start.energy_mj
    assert measured == pytest.approx(integral, rel=0.002)


def test_idle_gpu_draws_idle_power_and_reports_idle(tmp_path: Path, clock: ManualClock) -> None:
    fleet = SimFleet.init(tmp_path / "f", 1, "a100", clock=clock)
    gpu = open_backend("sim", state_dir=tmp_path / "f", clock=clock)
    clock.advance(10)
    s = gpu.sample(0)
    assert s.util_pct == 0
    assert s.reasons & REASON_GPU_IDLE
    assert s.power_mw == fleet.model.idle_mw


def test_load_raises_power_up_to_the_cap_only(tmp_path: Path, clock: ManualClock) -> None:
    fleet = SimFleet.init(tmp_path / "f", 2, "h100", clock=clock)
    gpu = open_backend("sim", state_dir=tmp_path / "f", clock=clock)
    gpu.set_power_limit(1, 400_000)
    fleet.set_load(0.5)
    clock.advance(10)
    half = gpu.sample(0)
    assert 350_000 < half.power_mw < 450_000
    assert half.util_pct == 50
    fleet.set_load(1.0, index=1)
    clock.advance(10)
    assert gpu.sample(1).power_mw <= 400_000
    assert gpu.sample(0).util_pct == 50  # only GPU 1 changed


def test_every_process_sees_the_same_state(tmp_path: Path, clock: ManualClock) -> None:
    SimFleet.init(tmp_path / "f", 2, "b200", clock=clock)
    one = open_backend("sim", state_dir=tmp_path / "f", clock=clock)
    two = open_backend("sim", state_dir=tmp_path / "f", clock=clock)
    one.set_power_limit(1, 450_000)
    assert two.limits(1).enforced_mw == 450_000
    assert two.sample(1) == one.sample(1)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.floats(min_value=0.001, max_value=3.0), min_size=1, max_size=12),
       cap_w=st.integers(min_value=200, max_value=1000))
def test_stored_updates_do_not_change_the_physics(tmp_path_factory: pytest.TempPathFactory,
                                                  steps: list[float], cap_w: int) -> None:
    """A fleet written at many instants evolves exactly like one left alone."""
    clock = ManualClock()
    root = tmp_path_factory.mktemp("p")
    busy = SimFleet.init(root / "a", 1, "b200", clock=clock)
    quiet = SimFleet.init(root / "b", 1, "b200", clock=clock)
    for fleet in (busy, quiet):
        fleet.set_load(0.9)
        fleet.set_limit(0, cap_w * 1000)
        fleet.inject_fault(0, "thermal-spike", seconds=sum(steps) / 2)
    for step in steps:
        clock.advance(step)
        busy.set_load(0.9)  # same input, but the state is evolved and stored again
    clock.advance(1)
    a, b = busy.sample(0), quiet.sample(0)
    assert a.power_mw == pytest.approx(b.power_mw, abs=2)
    assert a.temp_mc == pytest.approx(b.temp_mc, abs=2)
    assert a.energy_mj == pytest.approx(b.energy_mj, abs=len(steps) + 2)
