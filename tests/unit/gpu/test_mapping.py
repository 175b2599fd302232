"""Slurm GPU indices reach the right device through minor numbers, not positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import GpuNotFound, InputError
from spark_slurm.gpu import map_slurm_indices, open_backend
from spark_slurm.gpu.mapping import (
    expand_device_files,
    gres_conf_device_files,
    minor_of,
    parse_index_list,
)
from spark_slurm.gpu.sim import SimFleet

GRES_CONF = """\
# GPUs on every node, listed out of order on n2
NodeName=n1 Name=gpu File=/dev/nvidia[0-3]
Name=gpupower Count=5600 Flags=CountOnly

NodeName=n2 Name=gpu File=/dev/nvidia[2-3]  # was File=/dev/nvidia[6-7] # moved
NodeName=n2 Name=mps Count=100 File=/dev/nvidia4
NodeName=n2 Name=gpu Type=any Count=1
NodeName=n2 Name=gpu File=/dev/nvidia[0,1]
"""


@pytest.fixture
def fleet(tmp_path: Path) -> SimFleet:
    # Backend order differs from minor order: device 0 is /dev/nvidia3.
    return SimFleet.init(tmp_path / "f", 4, "h100", clock=ManualClock(), minors=[3, 1, 0, 2])


def test_slurm_index_is_the_minor_number_by_default(fleet: SimFleet) -> None:
    gpu = open_backend("sim", state_dir=fleet.root, clock=fleet.clock)
    assert map_slurm_indices(gpu, [0, 1, 2, 3]) == [2, 1, 3, 0]
    assert map_slurm_indices(gpu, parse_index_list("3")) == [0]


def test_gres_conf_file_order_decides_the_index(fleet: SimFleet) -> None:
    gpu = open_backend("sim", state_dir=fleet.root, clock=fleet.clock)
    files = gres_conf_device_files(GRES_CONF, node="n2")
    assert files == ["/dev/nvidia2", "/dev/nvidia3", "/dev/nvidia0", "/dev/nvidia1"]
    assert gres_conf_device_files(GRES_CONF, node="n1") == [f"/dev/nvidia{i}" for i in range(4)]
    assert len(gres_conf_device_files(GRES_CONF)) == 8  # no node: every gpu line
    # Slurm index 0 on n2 is /dev/nvidia2, which is backend device 3.
    assert map_slurm_indices(gpu, [0, 2], device_files=files) == [3, 2]
    with pytest.raises(GpuNotFound, match=r"beyond gres\.conf's 4 device files"):
        map_slurm_indices(gpu, [4], device_files=files)


def test_minor_numbers_with_an_offset(tmp_path: Path) -> None:
    fleet = SimFleet.init(tmp_path / "g", 2, "a100", clock=ManualClock(), minor_base=4)
    gpu = open_backend("sim", state_dir=fleet.root, clock=fleet.clock)
    assert map_slurm_indices(gpu, [5, 4]) == [1, 0]
    with pytest.raises(GpuNotFound, match=r"minor number 0 \(/dev/nvidia0\)"):
        map_slurm_indices(gpu, [0])


@pytest.mark.parametrize(("text", "expected"), [
    ("0,1", [0, 1]), ("0-2,5", [0, 1, 2, 5]), ("", []), ("7", [7]),
])
def test_parse_index_list(text: str, expected: list[int]) -> None:
    assert parse_index_list(text) == expected


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "1,,x"])
def test_bad_index_lists_are_named(text: str) -> None:
    with pytest.raises(InputError, match="bad GPU index list"):
        parse_index_list(text)


def test_device_file_helpers() -> None:
    assert expand_device_files("/dev/nvidia[0-1,3]") == [
        "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia3"]
    assert expand_device_files("/dev/nvidia5") == ["/dev/nvidia5"]
    assert minor_of("/tmp/x/dev/nvidia12") == 12
    with pytest.raises(InputError, match="not /dev/nvidiaN"):
        minor_of("/dev/nvidiactl")
