"""Each injected fault, as the daemon would observe it through the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import GpuInvalidArgument, GpuLost, GpuNoPermission, InputError
from spark_slurm.gpu import GpuBackend, open_backend
from spark_slurm.gpu.backend import REASON_SW_THERMAL
from spark_slurm.gpu.sim import SimFleet


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fleet(tmp_path: Path, clock: ManualClock) -> SimFleet:
    fleet = SimFleet.init(tmp_path / "f", 2, "b200", clock=clock)
    fleet.set_load(1.0)
    clock.advance(60)
    return fleet


@pytest.fixture
def gpu(fleet: SimFleet, clock: ManualClock) -> GpuBackend:
    return open_backend("sim", state_dir=fleet.root, clock=clock)


def test_driver_crash_fails_every_call_but_the_ceiling_holds(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    gpu.set_power_limit(0, 400_000)
    clock.advance(5)
    before = gpu.sample(0)
    fleet.inject_fault(0, "driver-crash", seconds=10)
    for call in (lambda: gpu.sample(0), lambda: gpu.limits(0),
                 lambda: gpu.set_power_limit(0, 900_000), lambda: gpu.persistence_mode(0)):
        with pytest.raises(GpuLost) as err:
            call()
        assert err.value.index == 0
    assert gpu.sample(1).power_mw > 900_000  # the other GPU is unaffected
    assert len(gpu.devices()) == 2
    clock.advance(9.9)
    with pytest.raises(GpuLost):
        gpu.sample(0)
    clock.advance(0.1)
    after = gpu.sample(0)
    assert gpu.limits(0).enforced_mw == 400_000  # the limit set before the crash
    # The GPU kept drawing under the old ceiling all through the crash.
    assert after.energy_mj - before.energy_mj <= 400_000 * 10
    assert after.energy_mj - before.energy_mj > 380_000 * 10


def test_a_fault_without_duration_lasts_until_cleared(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    fleet.inject_fault(1, "driver-crash")
    clock.advance(3600)
    with pytest.raises(GpuLost):
        gpu.limits(1)
    fleet.inject_fault(1, "clear")
    assert gpu.limits(1).enforced_mw == 1_000_000


def test_silent_mismatch_accepts_the_set_but_enforces_the_old_limit(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    fleet.inject_fault(0, "silent-mismatch", seconds=30)
    gpu.set_power_limit(0, 300_000)  # no error: that is the point
    lim = gpu.limits(0)
    assert lim.requested_mw == 300_000
    assert lim.enforced_mw == 1_000_000
    clock.advance(5)
    s = gpu.sample(0)
    assert s.enforced_mw == 1_000_000
    assert s.power_mw > 900_000  # the cap never bit
    clock.advance(30)
    assert gpu.limits(0).enforced_mw == 300_000  # the other limiter let go


def test_no_permission_refuses_sets_and_keeps_the_limit(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    fleet.inject_fault(0, "no-permission", seconds=5)
    with pytest.raises(GpuNoPermission) as err:
        gpu.set_power_limit(0, 500_000)
    assert err.value.index == 0
    assert gpu.limits(0).requested_mw == 1_000_000
    assert gpu.sample(0).power_mw > 0  # reads still work
    clock.advance(5)
    gpu.set_power_limit(0, 500_000)
    assert gpu.limits(0).enforced_mw == 500_000


def _peak_temp(gpu: GpuBackend, clock: ManualClock, index: int, seconds: int) -> int:
    peak = 0
    for _ in range(seconds):
        clock.advance(1)
        s = gpu.sample(index)
        peak = max(peak, s.temp_mc)
    return peak


def test_thermal_spike_climbs_past_the_threshold_then_cools(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    normal = gpu.sample(0)
    assert normal.temp_mc < fleet.model.slowdown_mc
    assert not normal.reasons & REASON_SW_THERMAL
    fleet.inject_fault(0, "thermal-spike", seconds=30)
    fleet.inject_fault(1, "thermal-spike", seconds=30)
    gpu.set_power_limit(1, 300_000)
    clock.advance(30)
    hot = gpu.sample(0)
    assert hot.temp_mc > fleet.model.slowdown_mc
    assert hot.reasons & REASON_SW_THERMAL
    assert gpu.sample(1).temp_mc < hot.temp_mc - 20_000  # a lower cap cuts the heat
    clock.advance(60)
    cooled = gpu.sample(0)
    assert cooled.temp_mc < fleet.model.slowdown_mc
    assert not cooled.reasons & REASON_SW_THERMAL


def test_driver_reload_resets_energy_and_limit(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    gpu.set_power_limit(0, 500_000)
    clock.advance(10)
    before = gpu.sample(0)
    assert before.energy_mj > 5_000_000
    fleet.inject_fault(0, "driver-reload")
    after = gpu.sample(0)
    assert after.energy_mj < before.energy_mj
    assert after.energy_epoch == before.energy_epoch + 1
    assert gpu.limits(0).enforced_mw == gpu.limits(0).default_mw == 1_000_000


def test_out_of_band_change_is_seen_by_the_backend(
        fleet: SimFleet, gpu: GpuBackend, clock: ManualClock) -> None:
    gpu.set_power_limit(0, 600_000)
    changes = fleet.oob_set_limit(0, 350_000)
    assert [(c.device.index, c.old_mw, c.new_mw) for c in changes] == [(0, 600_000, 350_000)]
    assert gpu.limits(0).enforced_mw == 350_000
    clock.advance(2)
    assert gpu.sample(0).power_mw < 350_000
    with pytest.raises(GpuInvalidArgument):
        fleet.oob_set_limit(None, 1_500_000)
    assert gpu.limits(1).enforced_mw == 1_000_000


@pytest.mark.parametrize(("kind", "seconds", "text"), [
    ("meltdown", None, "unknown fault 'meltdown'"),
    ("driver-crash", 0.0, "--for must be a positive"),
    ("thermal-spike", -3.0, "--for must be a positive"),
])
def test_bad_fault_requests_are_refused(fleet: SimFleet, kind: str, seconds: float | None,
                                        text: str) -> None:
    with pytest.raises(InputError, match=text):
        fleet.inject_fault(0, kind, seconds)
