"""A group of supervised background processes that always gets torn down.

The demo (and the integration tests that share its testbed) start munge,
slurmctld, slurmd, sparkd and a Karman publisher. Each writes its own log file;
start-up waits on a readiness check instead of sleeping; and stopping walks the
group in reverse order, TERM then KILL, so a failed scenario never leaves a
daemon behind on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from spark_slurm.errors import ServiceError


def _error(name: str, why: str, log: Path) -> ServiceError:
    tail = ""
    if log.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    return ServiceError(name, why, str(log), tail)


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    pidfile: Path | None = None

    def pid(self) -> int:
        """The service's pid: from its pidfile when it daemonises itself."""
        if self.pidfile is not None and self.pidfile.exists():
            text = self.pidfile.read_text().strip()
            if text.isdigit():
                return int(text)
        return self.process.pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid(), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.process.poll() is None or self.pidfile is not None


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `check` until it is true or the time is up; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


@dataclass
class ServiceGroup:
    """Starts services in order and stops them in reverse, whatever happened."""

    log_dir: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, ready: Callable[[], bool] | None = None,
              timeout_s: float = 30.0, env: Mapping[str, str] | None = None,
              pidfile: Path | None = None, cwd: Path | None = None) -> Service:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        merged = dict(self.env)
        if env:
            merged.update(env)
        with log.open("ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=merged, cwd=cwd,
                                    start_new_session=True)
        service = Service(name, proc, log, pidfile)
        self.services.append(service)
        if ready is not None:
            def up() -> bool:
                if pidfile is None and proc.poll() is not None:
                    raise _error(name, f"exited with status {proc.returncode}", log)
                return ready()
            if not wait_for(up, timeout_s):
                raise _error(name, f"not ready after {timeout_s:.0f}s", log)
        return service

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        for service in list(self.services):
            if service.name == name:
                _terminate(service, sig, timeout_s)
                self.services.remove(service)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            _terminate(service, signal.SIGTERM, 10.0)
        self.services.clear()

    def __enter__(self) -> ServiceGroup:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()


def _terminate(service: Service, sig: int, timeout_s: float) -> None:
    pids = {service.process.pid, service.pid()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline and _exists(pid):
            if pid == service.process.pid and service.process.poll() is not None:
                break
            time.sleep(0.05)
        if _exists(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.process.wait(timeout=5)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
