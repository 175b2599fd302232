"""TelemetrySampler keeps recent readings per GPU and survives failing GPUs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock, SystemClock
from spark_slurm.errors import GpuNotFound, InputError
from spark_slurm.gpu import TelemetrySampler, open_backend
from spark_slurm.gpu.sim import SimFleet


def _fleet(tmp_path: Path, clock: ManualClock | SystemClock, n: int = 2) -> SimFleet:
    fleet = SimFleet.init(tmp_path / "f", n, "h100", clock=clock)
    fleet.set_load(0.8)
    return fleet


def test_ring_keeps_only_the_last_seconds(tmp_path: Path) -> None:
    clock = ManualClock()
    fleet = _fleet(tmp_path, clock)
    gpu = open_backend("sim", state_dir=fleet.root, clock=clock)
    sampler = TelemetrySampler(gpu, rate_hz=10, seconds=2, clock=clock)
    assert sampler.latest(0) is None
    for _ in range(50):
        clock.advance(0.1)
        sampler.sample_once()
    newest = sampler.latest(0)
    assert newest is not None and newest.time_ns == clock.now_ns()
    everything = sampler.window(0, 0, clock.now_ns())
    assert len(everything) == 20  # 2 s at 10 Hz
    t1 = clock.now_ns()
    last_second = sampler.window(0, t1 - 1_000_000_000, t1)
    assert len(last_second) == 11  # both ends inclusive
    assert [s.time_ns for s in last_second] == sorted(s.time_ns for s in last_second)
    assert sampler.stats(1).samples == 50


def test_pre_change_window_shows_the_old_power(tmp_path: Path) -> None:
    clock = ManualClock()
    fleet = _fleet(tmp_path, clock)
    gpu = open_backend("sim", state_dir=fleet.root, clock=clock)
    sampler = TelemetrySampler(gpu, clock=clock)
    clock.advance(10)
    for _ in range(10):
        clock.advance(0.1)
        sampler.sample_once()
    change_ns = clock.now_ns()
    gpu.set_power_limit(0, 250_000)
    for _ in range(20):
        clock.advance(0.1)
        sampler.sample_once()
    before = sampler.window(0, change_ns - 1_000_000_000, change_ns)
    after = sampler.window(0, change_ns + 1_000_000_000, clock.now_ns())
    assert min(s.power_mw for s in before) > 500_000
    assert max(s.power_mw for s in after) < 250_000


def test_a_lost_gpu_is_counted_and_sampling_goes_on(tmp_path: Path) -> None:
    clock = ManualClock()
    fleet = _fleet(tmp_path, clock)
    gpu = open_backend("sim", state_dir=fleet.root, clock=clock)
    sampler = TelemetrySampler(gpu, clock=clock)
    fleet.inject_fault(1, "driver-crash", seconds=1)
    for _ in range(15):
        clock.advance(0.1)
        sampler.sample_once()
    lost = sampler.stats(1)
    assert lost.failures == 9  # 0.1 .. 0.9 s inside the crash window
    assert lost.samples == 6
    assert lost.last_error is None  # recovered
    assert sampler.stats(0).samples == 15
    fleet.inject_fault(1, "driver-crash")
    sampler.sample_once()
    err = sampler.stats(1).last_error
    assert err is not None and err.startswith("GpuLost: GPU 1")


def test_the_thread_samples_in_the_background(tmp_path: Path) -> None:
    clock = SystemClock()
    fleet = _fleet(tmp_path, clock)
    gpu = open_backend("sim", state_dir=fleet.root, clock=clock)
    with TelemetrySampler(gpu, rate_hz=50, seconds=5, clock=clock) as sampler:
        deadline = time.monotonic() + 20
        while sampler.stats(0).samples < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sampler.stats(0).samples >= 5
    count = sampler.stats(0).samples
    time.sleep(0.1)
    assert sampler.stats(0).samples == count  # stopped means stopped


def test_bad_settings_and_unknown_gpus(tmp_path: Path) -> None:
    clock = ManualClock()
    gpu = open_backend("sim", state_dir=_fleet(tmp_path, clock).root, clock=clock)
    with pytest.raises(InputError, match="must be > 0"):
        TelemetrySampler(gpu, rate_hz=0)
    sampler = TelemetrySampler(gpu, clock=clock)
    with pytest.raises(GpuNotFound):
        sampler.latest(7)
    with pytest.raises(GpuNotFound):
        sampler.window(7, 0, 1)
