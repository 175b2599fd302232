"""A fake libnvidia-ml.so.1 built from C, and the test side of its state file.

The real pynvml loads the library with `CDLL("libnvidia-ml.so.1")` at nvmlInit,
and the dynamic loader reads LD_LIBRARY_PATH only when a process starts, so the
NVML backend runs in a child process (`worker.py`) started with the fake's
directory on LD_LIBRARY_PATH; `RemoteNvml` is the GpuBackend the test holds, each
call forwarded to a real `NvmlBackend` over real pynvml ctypes calls in the child.
Tests drive the hardware through `FakeNode` (limits, temperatures, lost GPUs,
MIG, injected NVML return codes), which edits the state file under the same
flock(2) the library takes on every call.

Under mutmut's stats pass the worker also reports, with each answer, the mutated
functions it ran since its last answer (`worker_hits`), and `RemoteNvml` adds them
to this process's hits (`record_worker_hits`), so mutmut maps the test that asked
to the NVML code the worker executed for it (docs/testing.md, "#### nvml").
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from spark_slurm import errors
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample

SOURCE = Path(__file__).with_name("fakenvml.c")
LIBRARY = "libnvidia-ml.so.1"
REPO = Path(__file__).resolve().parents[4]

# NVML return codes the fake is asked to return (nvml.h values).
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NO_PERMISSION = 4
NOT_FOUND = 6
DRIVER_NOT_LOADED = 9
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
UNKNOWN = 999


def build(out_dir: Path) -> Path:
    """Compile the fake with gcc into out_dir/libnvidia-ml.so.1 (SONAME as the real one)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found: the fake NVML library is built from C "
                           "(make system-deps installs gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIBRARY
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror",
                    f"-Wl,-soname,{LIBRARY}", "-o", str(lib), str(SOURCE), "-lpthread"],
                   check=True, capture_output=True, text=True)
    return lib


@dataclass
class FakeGpu:
    """One physical GPU's starting state (an H100 SXM by default)."""

    minor: int
    bus: int
    min_mw: int = 200_000
    max_mw: int = 700_000
    default_mw: int = 700_000
    requested_mw: int = 700_000
    demand_mw: int = 450_000
    temp_c: int = 45
    util: int = 60
    reasons: int = 0x4
    persistence: int = 1
    mig: int = -1  # -1 not MIG-capable, 0 disabled, 1 enabled
    mig_slices: int = 0
    extra: dict[str, int | str] = field(default_factory=dict)


def h100s(*minors: int) -> list[FakeGpu]:
    """GPUs in PCI (NVML) order with the given minor numbers."""
    return [FakeGpu(minor=m, bus=0x18 + 0x10 * i) for i, m in enumerate(minors)]


class FakeNode:
    """The fake driver's state file: what the C library reads on every call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, gpus: list[FakeGpu]) -> FakeNode:
        values: dict[str, str] = {"driver": "1", "gpus": str(len(gpus))}
        for i, g in enumerate(gpus):
            for key, value in {
                    "minor": g.minor, "bus": g.bus, "uuid": f"GPU-{i:08x}-fake-{g.minor:04x}",
                    "name": "NVIDIA H100 80GB HBM3", "min_mw": g.min_mw, "max_mw": g.max_mw,
                    "default_mw": g.default_mw, "requested_mw": g.requested_mw,
                    "other_limit_mw": 0, "round_mw": 0, "demand_mw": g.demand_mw,
                    "energy_mj": 1_000_000 * (i + 1), "energy_ns": 0, "temp_c": g.temp_c,
                    "util": g.util, "reasons": g.reasons, "persistence": g.persistence,
                    "mig": g.mig, "mig_slices": g.mig_slices, "lost": 0, "epoch": 0,
                    **g.extra}.items():
                values[f"gpu{i}.{key}"] = str(value)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return cls(path)

    @contextmanager
    def edit(self) -> Iterator[dict[str, str]]:
        """The whole state under the library's lock; changes are written back."""
        with open(self.path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            values = dict(line.split("=", 1) for line in fh.read().splitlines() if "=" in line)
            yield values
            fh.seek(0)
            fh.truncate()
            fh.write("".join(f"{k}={v}\n" for k, v in values.items()))

    def get(self, key: str) -> str | None:
        with self.edit() as values:
            return values.get(key)

    def gpu(self, i: int, key: str) -> int:
        value = self.get(f"gpu{i}.{key}")
        assert value is not None, f"gpu{i}.{key} is not in the fake's state"
        return int(value, 0)

    def set(self, **values: int | str) -> None:
        """Top-level keys; `fail__nvmlFoo=4` sets `fail.nvmlFoo=4` (0 clears it)."""
        with self.edit() as state:
            for key, value in values.items():
                state[key.replace("__", ".")] = str(value)

    def set_gpu(self, i: int, **values: int | str) -> None:
        """Per-GPU keys, e.g. set_gpu(0, lost=1) or set_gpu(1, fail__nvmlDeviceGetPowerUsage=15)."""
        with self.edit() as state:
            for key, value in values.items():
                state[f"gpu{i}.{key.replace('__', '.')}"] = str(value)

    def calls(self, function: str) -> int:
        return int(self.get(f"calls.{function}") or 0)

    def env(self, lib_dir: Path) -> dict[str, str]:
        """The environment of a process that should load this fake as its NVML."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(lib_dir), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        env["FAKE_NVML_STATE"] = str(self.path)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env


# --- the child process running NvmlBackend ---------------------------------------

def _send(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError("the NVML worker went away")
    (size,) = struct.unpack("!I", head)
    return pickle.loads(stream.read(size))


# mutmut's stats pass sets this in the environment, which the worker inherits.
STATS_PASS = ("MUTANT_UNDER_TEST", "stats")


def _stats_pass() -> bool:
    return os.environ.get(STATS_PASS[0]) == STATS_PASS[1]


def worker_hits() -> list[str]:
    """The worker's side: the functions mutmut recorded here since the last call (then
    forgotten), or [] outside mutmut's stats pass (mutmut is not even imported).

    mutmut's trampolines record each mutated function they run in this process's
    `mutmut.state.state()._stats` (mutmut 3.8.1, pinned by the `mutation` extra);
    its stats plugin reads that set only in the test process, at each test's end.
    """
    if not _stats_pass():
        return []
    from mutmut.state import state  # noqa: PLC0415 (only under mutmut)

    hits = sorted(state()._stats)
    state()._stats.clear()
    return hits


def record_worker_hits(hits: list[str]) -> None:
    """The test side: file the worker's hits as if this process had run them, so
    mutmut's stats plugin assigns them to the running test at its teardown."""
    if not hits or not _stats_pass():
        return
    from mutmut.state import state  # noqa: PLC0415 (only under mutmut)

    state()._stats.update(hits)


def rebuild_error(name: str, message: str, index: int | None) -> errors.GpuError:
    """The typed error the worker raised, as the same class with the same index."""
    cls = getattr(errors, name, errors.GpuError)
    exc: errors.GpuError = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.message = message
    exc.index = index
    return exc


class RemoteNvml:
    """A GpuBackend whose calls run in a worker process on the fake (or real) NVML.

    `env` None runs against whatever libnvidia-ml.so.1 the system has (a real GPU);
    `as_uid=N` runs the backend as uid N (the worker drops root before nvmlInit).
    """

    def __init__(self, env: dict[str, str] | None, **options: Any) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.gpu.fakenvml.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        self._lock = threading.Lock()  # the Actuator calls from several threads
        self.call("open", **options)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            _send(self._in, (method, args, kwargs))
            status, value, hits = _receive(self._out)
        record_worker_hits(hits)
        if status == "error":
            raise rebuild_error(*value)
        if status == "crash":
            raise AssertionError(f"NVML worker: {value}")
        return value

    def devices(self) -> list[DeviceInfo]:
        return list(self.call("devices"))

    def limits(self, index: int) -> PowerLimits:
        return self.call("limits", index)  # type: ignore[no-any-return]

    def sample(self, index: int) -> Sample:
        return self.call("sample", index)  # type: ignore[no-any-return]

    def set_power_limit(self, index: int, mw: int) -> None:
        self.call("set_power_limit", index, mw)

    def persistence_mode(self, index: int) -> bool | None:
        return self.call("persistence_mode", index)  # type: ignore[no-any-return]

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        self.call("set_persistence_mode", index, enabled)

    def attr(self, name: str) -> Any:
        """An attribute of the NvmlBackend in the worker (`unavailable`, `reinits`)."""
        return self.call("attr", name)

    def close(self) -> None:
        """Close the backend and end the worker (idempotent)."""
        if self._proc.poll() is None:
            try:
                self.call("close")
                _send(self._in, ("exit", (), {}))
            except (EOFError, BrokenPipeError, errors.GpuError):
                pass
            finally:
                self._in.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        self._out.close()
