"""The behaviour every GPU backend owes the daemon, run against each backend.

Only the GpuBackend protocol is used here, nothing a real NVML would not expose.
The `nvml` case runs on a machine with an NVIDIA GPU and NVML (marked `gpu`,
skipped elsewhere); it changes GPU 0's limit and always puts it back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import GpuError, GpuInvalidArgument, GpuNoPermission, GpuNotFound
from spark_slurm.gpu import GpuBackend, map_slurm_indices, open_backend
from spark_slurm.gpu.nvml import NvmlBackend
from spark_slurm.gpu.sim import SimFleet
from tests.unit.gpu.fake_nvml import h100_node


def _real_nvml() -> GpuBackend:
    try:
        backend = open_backend("nvml")
    except GpuError as exc:
        pytest.skip(f"no usable NVML here: {exc}")
    if not backend.devices():
        backend.close()
        pytest.skip("NVML sees no GPU")
    return backend


@pytest.fixture(params=["sim", "fake-nvml", pytest.param("nvml", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GpuBackend]:
    kind = request.param
    if kind == "sim":
        clock = ManualClock()
        SimFleet.init(tmp_path / "fleet", 4, "h100", clock=clock, minors=[3, 1, 0, 2])
        gpu: GpuBackend = open_backend("sim", state_dir=tmp_path / "fleet", clock=clock)
        SimFleet.open(tmp_path / "fleet", clock).set_load(0.5)
        clock.advance(2)
    elif kind == "fake-nvml":
        gpu = NvmlBackend(nvml=h100_node(4))
    else:
        gpu = _real_nvml()
    original = gpu.limits(0).requested_mw
    try:
        yield gpu
    finally:
        try:
            gpu.set_power_limit(0, original)
        finally:
            gpu.close()


def _settable(gpu: GpuBackend) -> int:
    lim = gpu.limits(0)
    return ((lim.min_mw + lim.max_mw) // 2) // 1000 * 1000  # whole watts, inside the range


def test_devices_have_unique_identities(backend: GpuBackend) -> None:
    devs = backend.devices()
    assert devs
    assert [d.index for d in devs] == list(range(len(devs)))
    assert len({d.uuid for d in devs}) == len(devs)
    whole = [d for d in devs if d.mig_parent is None]
    assert len({d.minor for d in whole}) == len(whole)
    for d in devs:
        assert d.uuid.startswith(("GPU-", "MIG-"))
        assert re.fullmatch(r"[0-9A-F]{4,8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-9A-F]", d.pci_bus_id), \
            d.pci_bus_id
        assert d.name


def test_limits_are_consistent(backend: GpuBackend) -> None:
    for d in backend.devices():
        lim = backend.limits(d.index)
        assert 0 < lim.min_mw <= lim.default_mw <= lim.max_mw
        assert lim.min_mw <= lim.requested_mw <= lim.max_mw
        assert 0 < lim.enforced_mw <= lim.max_mw


def test_sample_is_plausible_and_agrees_with_limits(backend: GpuBackend) -> None:
    first = backend.sample(0)
    second = backend.sample(0)
    assert second.time_ns >= first.time_ns
    assert second.energy_mj >= first.energy_mj or second.energy_epoch > first.energy_epoch
    assert 0 <= first.power_mw <= backend.limits(0).max_mw * 1.2
    assert 0 <= first.util_pct <= 100
    assert 0 < first.temp_mc < 130_000
    assert first.reasons >= 0
    assert second.enforced_mw == backend.limits(0).enforced_mw


def test_set_limit_reads_back_as_enforced(backend: GpuBackend) -> None:
    target = _settable(backend)
    backend.set_power_limit(0, target)
    lim = backend.limits(0)
    assert lim.requested_mw == target
    assert lim.enforced_mw == target
    assert backend.sample(0).enforced_mw == target


@pytest.mark.parametrize("where", ["below", "above"])
def test_out_of_range_limit_is_refused_and_nothing_changes(backend: GpuBackend,
                                                           where: str) -> None:
    before = backend.limits(0)
    bad = before.min_mw - 1000 if where == "below" else before.max_mw + 1000
    with pytest.raises(GpuInvalidArgument) as err:
        backend.set_power_limit(0, bad)
    assert err.value.index == 0
    assert "outside" in str(err.value)
    assert backend.limits(0) == before


def test_unknown_device_is_not_found(backend: GpuBackend) -> None:
    missing = len(backend.devices()) + 5
    with pytest.raises(GpuNotFound):
        backend.limits(missing)
    with pytest.raises(GpuNotFound):
        backend.sample(missing)
    with pytest.raises(GpuNotFound):
        backend.set_power_limit(missing, _settable(backend))


def test_persistence_mode_is_reported(backend: GpuBackend) -> None:
    assert backend.persistence_mode(0) in (True, False, None)


def test_slurm_minor_numbers_map_to_the_matching_devices(backend: GpuBackend) -> None:
    devs = [d for d in backend.devices() if d.mig_parent is None]
    by_minor = sorted(devs, key=lambda d: d.minor)
    assert map_slurm_indices(backend, [d.minor for d in by_minor]) == [d.index for d in by_minor]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may set limits")
@pytest.mark.gpu
def test_real_nvml_set_without_root_is_no_permission() -> None:
    gpu = _real_nvml()
    try:
        with pytest.raises(GpuNoPermission):
            gpu.set_power_limit(0, gpu.limits(0).requested_mw)
    finally:
        gpu.close()
