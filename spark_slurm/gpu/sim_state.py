"""On-disk state of a simulated fleet, shared safely between processes.

`DIR/fleet.json` holds what never changes after `sim init` (model, identities);
`DIR/gpuN.json` holds one GPU's evolving state. Writers hold an flock on
`DIR/gpuN.lock` for read-modify-write; every write goes to a temporary file that
is renamed over the old one, so readers (who take no lock) never see a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from spark_slurm.errors import InputError, SimStateError
from spark_slurm.gpu.backend import DeviceInfo
from spark_slurm.gpu.sim_physics import FAULT_KINDS, Fault, GpuState, SimModel

FORMAT = "spark-sim-fleet/1"
CONFIG_NAME = "fleet.json"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The fixed part of a fleet: its model and each device's identity."""

    model_key: str
    model: SimModel
    devices: tuple[DeviceInfo, ...]


def config_path(root: Path) -> Path:
    return root / CONFIG_NAME


def gpu_path(root: Path, index: int) -> Path:
    return root / f"gpu{index}.json"


def atomic_write_json(path: Path, value: Any) -> None:
    """Write to a temporary sibling, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(value, fh, sort_keys=True, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SimStateError(f"missing {what} (run `sparkctl sim init` first)", str(path)) from None
    except OSError as exc:
        raise SimStateError(f"cannot read {what}: {exc.strerror}", str(path)) from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SimStateError(f"corrupt {what}: {exc}", str(path)) from None
    if not isinstance(value, dict):
        raise SimStateError(f"corrupt {what}: not a JSON object", str(path))
    return value


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path,
           what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SimStateError(f"corrupt {what}: field {key!r} missing or of the wrong type",
                            str(path))
    return value


def write_config(root: Path, config: FleetConfig) -> None:
    atomic_write_json(config_path(root), {
        "format": FORMAT,
        "model_key": config.model_key,
        "model": asdict(config.model),
        "devices": [asdict(d) for d in config.devices],
    })


def read_config(root: Path) -> FleetConfig:
    """Load and check fleet.json; any problem is a SimStateError naming the file."""
    if not root.is_dir():
        raise SimStateError("state directory does not exist (run `sparkctl sim init` first)",
                            str(root))
    path = config_path(root)
    data = _load_json(path, "fleet config")
    what = "fleet config"
    if data.get("format") != FORMAT:
        raise SimStateError(f"corrupt {what}: format is not {FORMAT!r}", str(path))
    raw_model = _typed(data, "model", dict, path, what)
    try:
        model = SimModel(**{f.name: raw_model[f.name] for f in fields(SimModel)})
        model.check()
    except (KeyError, TypeError, ValueError, InputError) as exc:
        raise SimStateError(f"corrupt {what}: bad model ({exc})", str(path)) from None
    devices = []
    for i, raw in enumerate(_typed(data, "devices", list, path, what)):
        try:
            dev = DeviceInfo(**raw)
        except TypeError:
            raise SimStateError(f"corrupt {what}: device entry {i} is malformed",
                                str(path)) from None
        if dev.index != i:
            raise SimStateError(f"corrupt {what}: device entry {i} has index {dev.index}",
                                str(path))
        devices.append(dev)
    return FleetConfig(str(data.get("model_key", "")), model, tuple(devices))


def _state_to_json(s: GpuState) -> dict[str, Any]:
    out = asdict(s)
    out["faults"] = [asdict(f) for f in s.faults]
    return out


def _fault(raw: Any, path: Path, what: str) -> Fault:
    try:
        fault = Fault(**raw)
    except TypeError:
        fault = None
    ok = fault is not None and fault.kind in FAULT_KINDS and all(
        isinstance(v, int) and not isinstance(v, bool)
        for v in (fault.start_ns, fault.held_mw)) and (
        fault.end_ns is None or isinstance(fault.end_ns, int))
    if not ok or fault is None:
        raise SimStateError(f"corrupt {what}: malformed fault entry {raw!r}", str(path))
    return fault


def read_gpu(root: Path, index: int) -> GpuState:
    """Load one GPU's state without locking (rename makes every read whole)."""
    path = gpu_path(root, index)
    what = "GPU state file"
    data = _load_json(path, what)
    num = (int, float)
    faults = tuple(_fault(f, path, what) for f in _typed(data, "faults", list, path, what))
    return GpuState(
        t_ns=_typed(data, "t_ns", int, path, what),
        power_mw=float(_typed(data, "power_mw", num, path, what)),
        temp_mc=float(_typed(data, "temp_mc", num, path, what)),
        energy_mj=float(_typed(data, "energy_mj", num, path, what)),
        requested_mw=_typed(data, "requested_mw", int, path, what),
        util=float(_typed(data, "util", num, path, what)),
        energy_epoch=_typed(data, "energy_epoch", int, path, what),
        persistence=_typed(data, "persistence", bool, path, what),
        faults=faults,
    )


def write_gpu(root: Path, index: int, state: GpuState) -> None:
    atomic_write_json(gpu_path(root, index), _state_to_json(state))


@contextlib.contextmanager
def gpu_lock(root: Path, index: int) -> Iterator[None]:
    """Exclusive lock for one GPU's read-modify-write, across processes."""
    fd = os.open(root / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def update_gpu(root: Path, index: int, change: Callable[[GpuState], GpuState]) -> GpuState:
    """Atomically apply `change` to one GPU's stored state; returns the new state."""
    with gpu_lock(root, index):
        new = change(read_gpu(root, index))
        write_gpu(root, index, new)
    return new
