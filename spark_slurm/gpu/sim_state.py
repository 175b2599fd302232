"""On-disk state of a simulated fleet, shared safely between processes.

`DIR/fleet.json` holds what never changes after `sim init` (model, identities);
`DIR/gpuN.json` holds one GPU's evolving state. Writers hold an flock on
`DIR/gpuN.lock` for read-modify-write; every write goes to a temporary file that
is swapped in for the old one in one atomic rename (an exchange where the kernel
offers it), so readers (who take no lock) never see a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import sys
import threading
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


@functools.lru_cache(maxsize=512)
def gpu_path(root: Path, index: int) -> Path:
    """Cached: the daemon asks for the same few paths thousands of times."""
    return root / f"gpu{index}.json"


@functools.lru_cache(maxsize=512)
def _lock_path(root: Path, index: int) -> str:
    return str(root / f"gpu{index}.lock")


def _read_bytes(path: Path) -> bytes:
    """The whole (small) file with raw os calls: no buffered-file object per read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _tmp_name(path: Path) -> str:
    """A temporary sibling unique to this process and thread (no random-name search)."""
    return f"{path.parent}/.{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"


class _Exchanger:
    """renameat2(RENAME_EXCHANGE) through libc, looked up on first use.

    Why not a plain rename over the state file: ext4 (auto_da_alloc) starts
    writeback of the new file on every rename over an existing one, which under
    I/O load blocks for milliseconds per write; an exchange is the same atomic
    switch for readers without that flush. The caller then unlinks the old state.
    """

    FLAG = 2  # RENAME_EXCHANGE
    AT_FDCWD = -100

    def __init__(self) -> None:
        self._fn: Any = None
        self._errno: Callable[[], int] = lambda: 0
        self.usable = sys.platform.startswith("linux")

    def _load(self) -> None:
        import ctypes  # noqa: PLC0415 (4 ms at import; only a sim write needs it)

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # no renameat2 in this libc (glibc < 2.28)
            self.usable = False
            return
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        fn.restype = ctypes.c_int
        self._fn, self._errno = fn, ctypes.get_errno

    def swap(self, tmp: str, path: Path) -> bool:
        """Atomically swap the two names; False where that cannot be done here."""
        if self._fn is None and self.usable:
            self._load()
        if not self.usable:
            return False
        if self._fn(self.AT_FDCWD, os.fsencode(tmp), self.AT_FDCWD, os.fsencode(path),
                    self.FLAG) == 0:
            return True
        err = self._errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            self.usable = False  # this kernel or file system cannot: plain renames from now
            return False
        if err == errno.ENOENT:  # no old state to swap with (the first write)
            return False
        raise OSError(err, os.strerror(err), tmp)


_EXCHANGE = _Exchanger()


def atomic_write_json(path: Path, value: Any) -> None:
    """Write to a temporary sibling, then rename: readers see old or new, never half.

    No fsync: a simulated GPU's state needs atomicity for concurrent readers, not
    power-loss durability (a killed process does not lose page-cache writes). One
    encode and one write() keep the per-call CPU low; the daemon does this per GPU.
    """
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if _EXCHANGE.swap(tmp, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # the old state, swapped out (open readers keep reading it)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = _read_bytes(path).decode("utf-8")
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
    """The stored form (what `asdict` gave, built directly: asdict deep-copies)."""
    return {"t_ns": s.t_ns, "power_mw": s.power_mw, "temp_mc": s.temp_mc,
            "energy_mj": s.energy_mj, "requested_mw": s.requested_mw, "util": s.util,
            "energy_epoch": s.energy_epoch, "persistence": s.persistence,
            "faults": [{"kind": f.kind, "start_ns": f.start_ns, "end_ns": f.end_ns,
                        "held_mw": f.held_mw} for f in s.faults]}


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


def _fast_state(data: dict[str, Any]) -> GpuState | None:
    """The common case (well-formed, no faults) without per-field checks; None otherwise.

    JSON yields only int/float/bool/str/None/list/dict, so exact `type` tests accept
    exactly what the checked path accepts; anything else takes that path and its errors.
    """
    try:
        t_ns, power, temp = data["t_ns"], data["power_mw"], data["temp_mc"]
        energy, requested, util = data["energy_mj"], data["requested_mw"], data["util"]
        epoch, persistence, faults = data["energy_epoch"], data["persistence"], data["faults"]
    except KeyError:
        return None
    num = (int, float)
    if (type(t_ns) is not int or type(requested) is not int or type(epoch) is not int
            or type(persistence) is not bool or type(faults) is not list or faults
            or type(power) not in num or type(temp) not in num or type(energy) not in num
            or type(util) not in num):
        return None
    return GpuState(t_ns=t_ns, power_mw=float(power), temp_mc=float(temp),
                    energy_mj=float(energy), requested_mw=requested, util=float(util),
                    energy_epoch=epoch, persistence=persistence, faults=())


def read_gpu(root: Path, index: int) -> GpuState:
    """Load one GPU's state without locking (rename makes every read whole)."""
    path = gpu_path(root, index)
    what = "GPU state file"
    data = _load_json(path, what)
    fast = _fast_state(data)
    if fast is not None:
        return fast
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
    fd = os.open(_lock_path(root, index), os.O_RDWR | os.O_CREAT, 0o644)
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
