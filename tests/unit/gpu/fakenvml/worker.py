"""The child process of RemoteNvml: one NvmlBackend over the real pynvml.

Started with LD_LIBRARY_PATH naming the fake library's directory (or without,
on a machine with a real driver). `open(as_uid=N)` switches to uid N before NVML
is initialised, for the tests that must see what a non-root caller gets. Reads
(method, args, kwargs) frames on stdin, answers ("ok", value, hits), ("error",
(class name, message, index), hits) for a typed GpuError, or ("crash", text,
hits) for anything else, which fails the test. `hits` is [] except under
mutmut's stats pass: the mutated functions this answer ran (`worker_hits`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any

from spark_slurm.errors import GpuError
from spark_slurm.gpu.nvml import NvmlBackend
from tests.unit.gpu.fakenvml import _receive, _send, worker_hits


def main() -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    backend: NvmlBackend | None = None
    while True:
        try:
            method, args, kwargs = _receive(inp)
        except EOFError:
            break
        if method == "exit":
            break
        try:
            value: Any
            if method == "open":
                uid = kwargs.pop("as_uid", None)
                if uid is not None:  # the interpreter is root's: drop to the uid only now
                    # What is imported after the switch must be readable by the uid:
                    # pynvml's ctypes, and tomllib for mutmut's trampolines.
                    import tomllib  # noqa: F401, PLC0415

                    import pynvml  # noqa: F401, PLC0415

                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                backend = NvmlBackend(**kwargs)
                value = None
            elif backend is None:
                raise RuntimeError(f"{method} before open")
            elif method == "attr":
                value = getattr(backend, args[0])
            else:
                value = getattr(backend, method)(*args, **kwargs)
            _send(out, ("ok", value, worker_hits()))
        except GpuError as exc:
            _send(out, ("error", (type(exc).__name__, exc.message, exc.index), worker_hits()))
        except Exception:
            _send(out, ("crash", traceback.format_exc(), worker_hits()))
    if backend is not None:
        with contextlib.suppress(GpuError):
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
