"""Slurm GPU indices -> backend devices, by device minor number, never by position.

Slurm's GPU index k is the k-th device file of the node's gres.conf `File=`
list; the file `/dev/nvidiaN` names minor number N. Backends enumerate in their
own order (NVML's is PCI order), so position would silently pick the wrong GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from spark_slurm.errors import GpuNotFound, InputError
from spark_slurm.gpu.backend import GpuBackend

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
