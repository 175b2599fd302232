"""gres.conf lines (MIG slices too) and the Slurm index -> device map sparkd governs by.

`slurm_device_map` is a pure function of the backend's device list, so these
tests hand it lists shaped as NVML enumerates them: whole GPUs in PCI order
(minors out of order), then MIG slices in their parents' order.
"""

from __future__ import annotations

import pytest

from spark_slurm.errors import InputError
from spark_slurm.gpu.backend import DeviceInfo
from spark_slurm.gpu.mapping import GresDevice, gres_conf_devices, slurm_device_map


def _whole(index: int, minor: int) -> DeviceInfo:
    return DeviceInfo(index, minor, f"00000000:{0x18 + index:02X}:00.0", f"GPU-{minor}", "H100")


def _slice(index: int, minor: int, j: int) -> DeviceInfo:
    return DeviceInfo(index, minor, "", f"MIG-{minor}-{j}", "H100 MIG 1g.10gb",
                      mig_parent=f"GPU-{minor}")


# NVML order: minor 2 (MIG, two slices), minor 0 (MIG, one slice), minor 1 (whole);
# the slices follow, parent by parent in NVML order.
MIXED = [_whole(0, 2), _whole(1, 0), _whole(2, 1), _slice(3, 2, 0), _slice(4, 2, 1),
         _slice(5, 0, 0)]


def test_without_gres_conf_whole_gpus_are_their_minor_and_slices_follow_by_minor() -> None:
    mapping, missing = slurm_device_map(MIXED)
    # 0-2 are the minors; the slices come after the highest, minor 0's first.
    assert mapping == {2: 0, 0: 1, 1: 2, 3: 5, 4: 3, 5: 4}
    assert missing == []


def test_without_gres_conf_and_without_devices_nothing_is_mapped() -> None:
    assert slurm_device_map([]) == ({}, [])
    assert slurm_device_map([], []) == ({}, [])


def test_gres_conf_order_decides_and_slices_are_taken_in_order_per_gpu() -> None:
    gres = [GresDevice(1), GresDevice(0, mig=True), GresDevice(2, mig=True),
            GresDevice(2, mig=True), GresDevice(2)]
    mapping, missing = slurm_device_map(MIXED, gres)
    # minor 0 is MIG-enabled and not listed itself: it comes after every gres.conf index.
    assert mapping == {0: 2, 1: 5, 2: 3, 3: 4, 4: 0, 5: 1}
    assert missing == []


def test_a_listed_mig_parent_keeps_its_own_index_only() -> None:
    gres = [GresDevice(2), GresDevice(2, mig=True), GresDevice(0), GresDevice(0, mig=True),
            GresDevice(1)]
    mapping, _ = slurm_device_map(MIXED, gres)
    assert mapping == {0: 0, 1: 3, 2: 1, 3: 5, 4: 2}


def test_a_missing_device_is_named_and_never_aliased() -> None:
    devices = [_whole(0, 0), _whole(1, 3), _slice(2, 3, 0)]
    gres = [GresDevice(0), GresDevice(5), GresDevice(3, mig=True), GresDevice(3, mig=True),
            GresDevice(9, mig=True), GresDevice(0, mig=True), GresDevice(7)]
    mapping, missing = slurm_device_map(devices, gres)
    # The unlisted MIG parent (minor 3) takes the first index past gres.conf's seven,
    # although the highest index found is 2: a GPU missing now must not alias it.
    assert mapping == {0: 0, 2: 2, 7: 1}
    assert missing == [
        "Slurm GPU 1 (/dev/nvidia5): no such device",
        "Slurm GPU 3 (MIG slice 1 of /dev/nvidia3): no such MIG device",
        "Slurm GPU 4 (MIG slice 0 of /dev/nvidia9): no such MIG device",
        "Slurm GPU 5 (MIG slice 0 of /dev/nvidia0): no such MIG device",  # not MIG-enabled
        "Slurm GPU 6 (/dev/nvidia7): no such device",
    ]


def test_unlisted_mig_parents_follow_the_last_listed_index_in_minor_order() -> None:
    mapping, missing = slurm_device_map(MIXED, [GresDevice(1)])
    assert mapping == {0: 2, 1: 1, 2: 0}
    assert missing == []
    mapping, _ = slurm_device_map(MIXED, [])
    assert mapping == {0: 1, 1: 0}


GRES = """\
# n1: two whole GPUs; n2: GPU 0 whole, GPU 1 split into two slices
NodeName=n1 Name=gpu File=/dev/nvidia[0-1]
NodeName=n[2-3] Name=gpu File=/dev/nvidia0   # was File=/dev/nvidia5 # moved
NodeName=n[2-3] Name=gpu MultipleFiles=/dev/nvidia1,/dev/nvidia-caps/nvidia-cap21
NodeName=n[2-3] Name=gpu MultipleFiles=/dev/nvidia-caps/nvidia-cap30,/dev/nvidia1

Name=gpupower Count=5600 Flags=CountOnly
NodeName=n2 Name=mps Count=100 File=/dev/nvidia4
NodeName=n2 Name=gpu Count=1 Type=any
"""


def test_gres_conf_devices_of_one_node_in_order_with_mig_slices() -> None:
    assert gres_conf_devices(GRES, "n1") == [GresDevice(0), GresDevice(1)]
    assert gres_conf_devices(GRES, "n3") == [GresDevice(0), GresDevice(1, mig=True),
                                             GresDevice(1, mig=True)]
    assert gres_conf_devices(GRES, "n9") == []


def test_gres_conf_devices_without_a_node_are_every_gpu_line() -> None:
    assert gres_conf_devices(GRES) == [GresDevice(0), GresDevice(1), GresDevice(0),
                                       GresDevice(1, mig=True), GresDevice(1, mig=True)]


def test_a_line_without_node_name_applies_to_every_node() -> None:
    text = "Name=gpu File=/dev/nvidia[2,3]\n  Name=gpu   MultipleFiles=/dev/nvidia7  \n"
    # One device file in MultipleFiles= is the whole GPU, not a slice.
    assert gres_conf_devices(text, "any") == [GresDevice(2), GresDevice(3), GresDevice(7)]


@pytest.mark.parametrize("files", ["/dev/nvidia-caps/nvidia-cap21,/dev/nvidia-caps/x",
                                   "/dev/nvidia0,/dev/nvidia1"])
def test_a_mig_line_must_name_exactly_one_gpu(files: str) -> None:
    line = f"Name=gpu MultipleFiles={files}"
    with pytest.raises(InputError) as err:
        gres_conf_devices(f"# first\n{line}\n")
    assert str(err.value) == (f"gres.conf line {line!r}: MultipleFiles= must name exactly "
                              "one /dev/nvidiaN")


def test_a_gpu_line_whose_file_is_not_a_gpu_device_is_refused() -> None:
    with pytest.raises(InputError, match=r"'/dev/nvidiactl' is not /dev/nvidiaN"):
        gres_conf_devices("Name=gpu File=/dev/nvidiactl\n")
