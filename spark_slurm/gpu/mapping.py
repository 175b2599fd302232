"""Slurm GPU indices -> backend devices, by device minor number, never by position.

Slurm's GPU index k is the k-th device of the node's gres.conf gpu lines: a
`File=/dev/nvidiaN` names the whole GPU with minor number N, a
`MultipleFiles=/dev/nvidiaN,/dev/nvidia-caps/...` a MIG slice on it (the j-th
such line for N is N's j-th slice in NVML order). Backends enumerate in their
own order (NVML's is PCI order), so position would silently pick the wrong GPU.
Without a gres.conf the Slurm index of a whole GPU is its minor number (the usual
`File=/dev/nvidia[0-N]`), and MIG slices are numbered after the highest minor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spark_slurm.errors import GpuNotFound, InputError
from spark_slurm.gpu.backend import DeviceInfo, GpuBackend

_MINOR = re.compile(r"nvidia(\d+)$")
_BRACKET = re.compile(r"^(.*)\[([^\]]+)\](.*)$")


def parse_index_list(text: str) -> list[int]:
    """Parse SLURM_JOB_GPUS / IDX lists like "0,2-3" into [0, 2, 3]."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise InputError(f"bad GPU index list {text!r}: {part!r} is not N or N-M")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise InputError(f"bad GPU index list {text!r}: range {part!r} runs backwards")
        out.extend(range(first, last + 1))
    return out


def expand_device_files(pattern: str) -> list[str]:
    """Expand a gres.conf File= value such as /dev/nvidia[0-3,5] into paths."""
    m = _BRACKET.match(pattern.strip())
    if m is None:
        return [pattern.strip()]
    head, body, tail = m.groups()
    return [f"{head}{i}{tail}" for i in parse_index_list(body)]


def gres_conf_device_files(text: str, node: str | None = None) -> list[str]:
    """The gpu device files in gres.conf order (Slurm's index order) for one node."""
    files: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if fields.get("Name") != "gpu" or "File" not in fields:
            continue
        nodes = fields.get("NodeName")
        if node is not None and nodes is not None and node not in expand_device_files(nodes):
            continue
        files.extend(expand_device_files(fields["File"]))
    return files


@dataclass(frozen=True, slots=True)
class GresDevice:
    """One gres.conf gpu device: the GPU's minor number, and whether it is a MIG slice."""

    minor: int
    mig: bool = False


def _fields(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def gres_conf_devices(text: str, node: str | None = None) -> list[GresDevice]:
    """The node's gpu devices in gres.conf order (Slurm's index order), MIG slices too."""
    out: list[GresDevice] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        fields = _fields(line) if line else {}
        if fields.get("Name") != "gpu":
            continue
        nodes = fields.get("NodeName")
        if node is not None and nodes is not None and node not in expand_device_files(nodes):
            continue
        if "MultipleFiles" in fields:
            files = fields["MultipleFiles"].split(",")
            whole = [f for f in files if _MINOR.search(f)]
            if len(whole) != 1:
                raise InputError(f"gres.conf line {line!r}: MultipleFiles= must name exactly "
                                 "one /dev/nvidiaN")
            out.append(GresDevice(minor_of(whole[0]), mig=len(files) > 1))
        elif "File" in fields:
            out.extend(GresDevice(minor_of(f)) for f in expand_device_files(fields["File"]))
    return out


def slurm_device_map(devices: Sequence[DeviceInfo], gres: Sequence[GresDevice] | None = None
                     ) -> tuple[dict[int, int], list[str]]:
    """Slurm GPU index -> backend index for every device the daemon governs, and the
    gres.conf entries it could not find (a lost GPU: left out, never a wrong one).

    A MIG-enabled parent GPU that Slurm does not list itself still gets an index,
    after all of Slurm's, so its shared power limit can be governed and recorded.
    """
    whole = {d.minor: d for d in devices if d.mig_parent is None}
    slices: dict[str, list[DeviceInfo]] = {}
    for d in devices:
        if d.mig_parent is not None:
            slices.setdefault(d.mig_parent, []).append(d)
    out: dict[int, int] = {}
    missing: list[str] = []
    if gres is None:
        out = {d.minor: d.index for d in whole.values()}
        key = max(out, default=-1) + 1
        for gpu in sorted(whole.values(), key=lambda d: d.minor):
            for d in slices.get(gpu.uuid, []):
                out[key] = d.index
                key += 1
    else:
        taken: dict[int, int] = {}
        for k, entry in enumerate(gres):
            parent = whole.get(entry.minor)
            if not entry.mig:
                if parent is None:
                    missing.append(f"Slurm GPU {k} (/dev/nvidia{entry.minor}): no such device")
                else:
                    out[k] = parent.index
                continue
            j = taken.get(entry.minor, 0)
            taken[entry.minor] = j + 1
            pool = slices.get(parent.uuid, []) if parent is not None else []
            if j >= len(pool):
                missing.append(f"Slurm GPU {k} (MIG slice {j} of /dev/nvidia{entry.minor}): "
                               "no such MIG device")
            else:
                out[k] = pool[j].index
        # Never an index gres.conf names (a GPU missing now must not alias its parent).
        key = len(gres)
        for gpu in sorted(whole.values(), key=lambda d: d.minor):
            if gpu.uuid in slices and gpu.index not in out.values():
                out[key] = gpu.index
                key += 1
    return out, missing


def minor_of(device_file: str) -> int:
    m = _MINOR.search(device_file)
    if m is None:
        raise InputError(f"device file {device_file!r} is not /dev/nvidiaN")
    return int(m.group(1))


def map_slurm_indices(gpu: GpuBackend, slurm_indices: Iterable[int],
                      device_files: Sequence[str] | None = None) -> list[int]:
    """Backend indices for Slurm GPU indices, matched through device minor numbers.

    Without `device_files` the Slurm index is taken as the minor number itself
    (gres.conf `File=/dev/nvidia[0-N]`, the usual layout). MIG slices are never
    chosen: Slurm's whole-GPU index names the physical device.
    """
    by_minor = {d.minor: d.index for d in reversed(gpu.devices()) if d.mig_parent is None}
    out = []
    for k in slurm_indices:
        if device_files is not None:
            if not 0 <= k < len(device_files):
                raise GpuNotFound(f"Slurm GPU index {k} is beyond gres.conf's "
                                  f"{len(device_files)} device files")
            minor = minor_of(device_files[k])
        else:
            minor = k
        if minor not in by_minor:
            raise GpuNotFound(f"no device with minor number {minor} (/dev/nvidia{minor}) "
                              f"for Slurm GPU index {k}")
        out.append(by_minor[minor])
    return out
