"""The one way every Slurm command is run: argument lists, a timeout, typed errors.

Injected wherever Slurm is called (the job-context source, tools), so tests can
hand in a runner that replays recorded output instead of monkeypatching.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from spark_slurm.errors import SlurmCommandFailed

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a finished command produced."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def run(self, argv: Sequence[str], timeout_s: float | None = None) -> RunResult:
        """Run argv to completion; raise SlurmCommandFailed on timeout or a missing tool.

        A non-zero exit is returned, not raised, so callers can tell
        "job not found" from a broken controller by the stderr text.
        """
        ...


class SubprocessRunner:
    """Runs commands as real subprocesses, never through a shell."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.env = dict(os.environ if env is None else env)
        self.timeout_s = timeout_s

    def run(self, argv: Sequence[str], timeout_s: float | None = None) -> RunResult:
        args = [str(a) for a in argv]
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=self.env,
                                  timeout=limit, check=False, errors="replace")
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise SlurmCommandFailed(args, f"timed out after {limit:g}s", err) from exc
        except FileNotFoundError as exc:
            raise SlurmCommandFailed(args, "not found (is Slurm installed and on PATH?)") \
                from exc
        except OSError as exc:
            raise SlurmCommandFailed(args, f"could not start: {exc.strerror}") from exc
        return RunResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def check(result: RunResult) -> RunResult:
    """Raise SlurmCommandFailed for a non-zero exit, carrying the command's stderr."""
    if result.returncode != 0:
        raise SlurmCommandFailed(list(result.argv), f"exited {result.returncode}",
                                 result.stderr)
    return result
