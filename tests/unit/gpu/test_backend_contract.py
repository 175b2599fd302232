"""The behaviour every GPU backend owes the daemon, run against each backend.

Backends: the simulated fleet, NvmlBackend over an in-process pynvml stand-in,
NvmlBackend over the real pynvml and a fake libnvidia-ml.so.1 built from C (in a
child process, see tests/unit/gpu/fakenvml), and NvmlBackend on a real GPU
(marked `gpu`, skipped where no driver answers; it changes GPU 0's limit and
always puts it back).

Expected values come from each rig's own "hardware" (the sim's state files, the
fake driver's state, `nvidia-smi` and /proc/driver/nvidia on a real node), never
from the `devices()` list the code under test builds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import GpuError, GpuInvalidArgument, GpuNoPermission, GpuNotFound
from spark_slurm.gpu import GpuBackend, map_slurm_indices, open_backend
from spark_slurm.gpu.backend import REASON_NAMES
from spark_slurm.gpu.nvml import NvmlBackend
from spark_slurm.gpu.sim import SimFleet, _pci_bus_id
from tests.conftest import FakeNvmlFactory
from tests.unit.gpu import fake_nvml as pyfake
from tests.unit.gpu.fakenvml import FakeGpu, RemoteNvml

NOBODY = 65534
KNOWN_REASONS = sum(REASON_NAMES)


@dataclass
class Truth:
    """What the hardware itself says, by PCI bus id (never via the backend)."""

    minor: Callable[[str], int]
    temp_c: Callable[[str], float]  # what the GPU's sensor reads now, in degrees C
    persistence: Callable[[str], bool | None]
    reasons: Callable[[str], int | None]  # None: cannot be known independently


@dataclass
class Rig:
    gpu: GpuBackend
    truth: Truth


def _sim(tmp_path: Path) -> Rig:
    clock = ManualClock()
    minors = [3, 1, 0, 2]
    fleet = SimFleet.init(tmp_path / "fleet", 4, "h100", clock=clock, minors=minors)
    gpu = open_backend("sim", state_dir=tmp_path / "fleet", clock=clock)
    fleet.set_load(0.5)
    clock.advance(2)
    by_bus = {_pci_bus_id(i): i for i in range(4)}
    return Rig(gpu, Truth(
        minor=lambda bus: minors[by_bus[bus]],
        temp_c=lambda bus: fleet.state(by_bus[bus]).temp_mc / 1000,
        persistence=lambda bus: fleet.state(by_bus[bus]).persistence,
        reasons=lambda bus: None))


def _pynvml_fake() -> Rig:
    fake = pyfake.h100_node(4)
    fake.devices[2].temp_c = 61
    fake.devices[1].persistence = 0
    fake.reasons_mask = 0x4 | 0x20
    by_bus = {f"00000000:{d.bus:02X}:00.0": d for d in fake.devices}
    return Rig(NvmlBackend(nvml=fake), Truth(
        minor=lambda bus: by_bus[bus].minor, temp_c=lambda bus: by_bus[bus].temp_c,
        persistence=lambda bus: bool(by_bus[bus].persistence),
        reasons=lambda bus: fake.reasons_mask))


def _fake_lib(fake_nvml: FakeNvmlFactory, tmp_path: Path) -> Rig:
    gpus = [FakeGpu(minor=m, bus=0x18 + 0x10 * i, temp_c=40 + 7 * i, reasons=[0, 4, 0x24, 1][i],
                    persistence=int(i != 1)) for i, m in enumerate([3, 1, 0, 2])]
    node, gpu = fake_nvml(gpus)
    by_bus = {f"00000000:{g.bus:02X}:00.0": i for i, g in enumerate(gpus)}
    return Rig(gpu, Truth(
        minor=lambda bus: node.gpu(by_bus[bus], "minor"),
        temp_c=lambda bus: node.gpu(by_bus[bus], "temp_c"),
        persistence=lambda bus: bool(node.gpu(by_bus[bus], "persistence")),
        reasons=lambda bus: node.gpu(by_bus[bus], "reasons")))


def _smi(bus: str, field: str) -> str:
    out = subprocess.run(["nvidia-smi", f"--id={bus}", f"--query-gpu={field}",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True, timeout=30)
    return out.stdout.strip()


def _proc_minor(bus: str) -> int:
    info = Path("/proc/driver/nvidia/gpus") / bus.lower()[4:] / "information"
    m = re.search(r"Device Minor:\s*(\d+)", info.read_text())
    assert m is not None, info
    return int(m.group(1))


def _real() -> Rig:
    try:
        gpu = open_backend("nvml")
    except GpuError as exc:
        pytest.skip(f"no usable NVML here: {exc}")
    if not gpu.devices():
        gpu.close()
        pytest.skip("NVML sees no GPU")
    if shutil.which("nvidia-smi") is None:
        gpu.close()
        pytest.fail("a real NVML without nvidia-smi: cannot check it independently")
    return Rig(gpu, Truth(
        minor=_proc_minor, temp_c=lambda bus: float(_smi(bus, "temperature.gpu")),
        persistence=lambda bus: _smi(bus, "persistence_mode") == "Enabled",
        reasons=lambda bus: None))


@pytest.fixture(params=["sim", "pynvml-fake", "libnvidia-ml-fake",
                        pytest.param("nvml", marks=pytest.mark.gpu)])
def rig(request: pytest.FixtureRequest, tmp_path: Path,
        fake_nvml: FakeNvmlFactory) -> Iterator[Rig]:
    kind = request.param
    if kind == "sim":
        made = _sim(tmp_path)
    elif kind == "pynvml-fake":
        made = _pynvml_fake()
    elif kind == "libnvidia-ml-fake":
        made = _fake_lib(fake_nvml, tmp_path)
    else:
        made = _real()
    original = made.gpu.limits(0).requested_mw
    try:
        yield made
    finally:
        try:
            made.gpu.set_power_limit(0, original)
        finally:
            made.gpu.close()


def _settable(gpu: GpuBackend) -> int:
    lim = gpu.limits(0)
    return ((lim.min_mw + lim.max_mw) // 2) // 1000 * 1000  # whole watts, inside the range


def test_devices_have_unique_identities(rig: Rig) -> None:
    devs = rig.gpu.devices()
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
        if d.mig_parent is None:
            assert d.minor == rig.truth.minor(d.pci_bus_id)


def test_limits_are_consistent(rig: Rig) -> None:
    for d in rig.gpu.devices():
        lim = rig.gpu.limits(d.index)
        assert 0 < lim.min_mw <= lim.default_mw <= lim.max_mw
        assert lim.min_mw <= lim.requested_mw <= lim.max_mw
        assert 0 < lim.enforced_mw <= lim.max_mw


def test_sample_is_plausible_and_agrees_with_the_hardware(rig: Rig) -> None:
    gpu = rig.gpu
    for d in gpu.devices():
        first = gpu.sample(d.index)
        second = gpu.sample(d.index)
        assert second.time_ns >= first.time_ns
        assert second.energy_mj >= first.energy_mj or second.energy_epoch > first.energy_epoch
        assert 0 <= first.power_mw <= gpu.limits(d.index).max_mw * 1.2
        assert first.util_pct is None or 0 <= first.util_pct <= 100
        # Millidegrees: a working GPU is between 15 and 110 °C, and the reading is the
        # sensor's (a missing ×1000 reads as 0.045 °C and would never trip the guard).
        assert 15_000 <= first.temp_mc <= 110_000
        assert first.temp_mc == pytest.approx(rig.truth.temp_c(d.pci_bus_id) * 1000, abs=3000)
        expected = rig.truth.reasons(d.pci_bus_id)
        if expected is not None:
            assert first.reasons == expected
        assert first.reasons & ~KNOWN_REASONS == 0 or expected is None
        assert second.enforced_mw == gpu.limits(d.index).enforced_mw


def test_set_limit_reads_back_as_enforced(rig: Rig) -> None:
    target = _settable(rig.gpu)
    rig.gpu.set_power_limit(0, target)
    lim = rig.gpu.limits(0)
    assert lim.requested_mw == target
    assert lim.enforced_mw == target
    assert rig.gpu.sample(0).enforced_mw == target


@pytest.mark.parametrize("where", ["below", "above"])
def test_out_of_range_limit_is_refused_and_nothing_changes(rig: Rig, where: str) -> None:
    before = rig.gpu.limits(0)
    bad = before.min_mw - 1000 if where == "below" else before.max_mw + 1000
    with pytest.raises(GpuInvalidArgument) as err:
        rig.gpu.set_power_limit(0, bad)
    assert err.value.index == 0
    assert "outside" in str(err.value)
    assert rig.gpu.limits(0) == before


def test_unknown_device_is_not_found(rig: Rig) -> None:
    missing = len(rig.gpu.devices()) + 5
    with pytest.raises(GpuNotFound):
        rig.gpu.limits(missing)
    with pytest.raises(GpuNotFound):
        rig.gpu.sample(missing)
    with pytest.raises(GpuNotFound):
        rig.gpu.set_power_limit(missing, _settable(rig.gpu))


def test_persistence_mode_is_what_the_hardware_says(rig: Rig) -> None:
    seen = {rig.gpu.persistence_mode(d.index) for d in rig.gpu.devices()}
    for d in rig.gpu.devices():
        assert rig.gpu.persistence_mode(d.index) is rig.truth.persistence(d.pci_bus_id)
    assert seen <= {True, False}


def test_slurm_minor_numbers_map_to_the_devices_with_those_minors(rig: Rig) -> None:
    devs = rig.gpu.devices()
    minors = sorted(rig.truth.minor(d.pci_bus_id) for d in devs if d.mig_parent is None)
    for minor, index in zip(minors, map_slurm_indices(rig.gpu, minors), strict=True):
        assert rig.truth.minor(devs[index].pci_bus_id) == minor


@pytest.mark.parametrize("kind", ["libnvidia-ml-fake", pytest.param("nvml",
                                                                     marks=pytest.mark.gpu)])
def test_another_uid_may_read_but_not_set(kind: str, fake_nvml: FakeNvmlFactory) -> None:
    """The suite runs as root, so the backend is opened by a process that switched to
    nobody: reads work, a set is NoPermission, and the limit is left as it was."""
    if kind == "nvml":
        root = _real().gpu
        other: GpuBackend = RemoteNvml(None, as_uid=NOBODY)
    else:
        node, root = fake_nvml([FakeGpu(minor=0, bus=0x18)])
        other = fake_nvml([], state=node.path, as_uid=NOBODY)[1]
    try:
        before = root.limits(0)
        assert other.limits(0) == before
        with pytest.raises(GpuNoPermission) as err:
            other.set_power_limit(0, _settable(other))
        assert err.value.index == 0
        assert root.limits(0) == before
    finally:
        other.close()
        root.close()
