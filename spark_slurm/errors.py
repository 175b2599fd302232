"""Every error a user can see, in one place.

Each error carries a one-line, user-facing message and the exit code the CLI
returns for it (0 ok, 1 a check failed, 2 usage or input error). Subclasses keep
the data that produced them so library callers can act on it without parsing
text. The root CLI group is the only place that turns these into output.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class SparkError(Exception):
    """Base of every expected failure; `str()` is the message shown to users."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(SparkError):
    """Bad input from a user or a file: names what is wrong and where."""


class ConfigError(InputError):
    """A configuration or policy file that cannot be used."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        where = ""
        if path is not None:
            where = path
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.column = column


class CheckFailed(SparkError):
    """A verification or assertion about recorded state did not hold (exit 1)."""

    exit_code = EXIT_CHECK_FAILED


class CanonicalError(InputError):
    """A record body that cannot be stored as canonical bytes (floats, NaN, bad keys)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(f"record body at {path}: {message}")
        self.path = path


# --- ledger ---------------------------------------------------------------


class LedgerError(InputError):
    """A ledger file that cannot be used: missing, empty, not SQLite, unknown schema."""


class LedgerKeyError(InputError):
    """A key file or key that cannot be used (bad format, loose permissions, wrong key)."""


class CheckpointError(InputError):
    """Checkpoint text that is not a well-formed C2SP signed note."""


class CheckpointInvalid(CheckFailed):
    """A well-formed checkpoint whose signature or contents do not hold (exit 1)."""


# --- gpu ------------------------------------------------------------------


class GpuError(SparkError):
    """A GPU backend call failed; `index` names the device (None: the backend itself)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        where = f"GPU {index}: " if index is not None else ""
        super().__init__(where + message)
        self.index = index


class GpuNotSupported(GpuError):
    """The device or driver does not support the operation (e.g. a MIG slice's limit)."""


class GpuNoPermission(GpuError):
    """The caller may not change the device (NVML NoPermission: not root)."""


class GpuInvalidArgument(GpuError):
    """A value outside the device's constraints (e.g. a limit below its minimum)."""

    def __init__(self, message: str, index: int | None = None, value: int | None = None,
                 min_mw: int | None = None, max_mw: int | None = None) -> None:
        super().__init__(message, index)
        self.value = value
        self.min_mw = min_mw
        self.max_mw = max_mw


class GpuLost(GpuError):
    """The GPU or its driver is unavailable (lost, driver not loaded, uninitialised)."""


class GpuNotFound(GpuError):
    """No device with that index, minor number or PCI bus id."""


class SimStateError(GpuError):
    """A simulated fleet's state directory that is missing, unreadable or corrupt."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path

# --- karman ---------------------------------------------------------------


class KarmanError(SparkError):
    """The Karman facility stream cannot be used (socket, bindings, sink)."""


class KarmanCsvError(InputError):
    """A Karman recording (CSV) that cannot be replayed; names the file and line."""

    def __init__(self, message: str, path: str, line: int | None = None) -> None:
        where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line

# --- policy ---------------------------------------------------------------


class PolicyError(ConfigError):
    """A policy file with problems; `problems` lists every one (line, column, message)."""

    def __init__(self, path: str, problems: list[tuple[int, int, str]]) -> None:
        line, column, first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more, path, line, column)
        self.problems = problems


# --- daemon ---------------------------------------------------------------


class BadRequest(InputError):
    """A daemon request that cannot be understood: malformed, oversized or unknown."""

    code = "bad-request"


class DiskFull(SparkError):
    """sparkd cannot record anything: the filesystem of its ledger or state is full."""

    code = "disk-full"
    exit_code = EXIT_CHECK_FAILED


class DaemonUnavailable(CheckFailed):
    """The daemon's socket cannot be reached (not running, wrong path, no permission)."""


class DaemonRefused(SparkError):
    """The daemon answered a request with an error; `code` is its machine-readable kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"daemon refused the request ({code}): {message}")
        self.code = code
        self.exit_code = 2 if code == "bad-request" else 1


# --- slurm ----------------------------------------------------------------


class SlurmError(SparkError):
    """Something about the scheduler side failed (a command, its output, a job)."""


class JobNotFound(SlurmError):
    """Slurm does not know the job (never existed, or purged after MinJobAge)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Slurm job {job_id}: not found")
        self.job_id = job_id


class SlurmCommandFailed(SlurmError):
    """A Slurm command exited non-zero, timed out or is missing; keeps argv and stderr."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, argv: list[str], why: str, stderr: str = "") -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"`{' '.join(argv)}` {why}" + (f": {detail}" if detail else ""))
        self.argv = argv
        self.stderr = stderr


class SlurmParseError(SlurmError):
    """Slurm output or a GRES/TRES string we cannot read; names the field and the text."""

    def __init__(self, field: str, text: str, why: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"cannot parse {field} {shown!r}: {why}")
        self.field = field
        self.text = text

# --- head node (merge, witness, audit, replay) ----------------------------


class HeadDbError(InputError):
    """A merged cluster ledger (or node ledger given to a head tool) that cannot be used."""


class MergeFailed(CheckFailed):
    """A merge finished but recorded serious findings (exit 1); the summary names them."""


class WitnessError(CheckFailed):
    """A checkpoint the witness refuses: bad signature, unknown key, or not consistent."""


class FetchError(SparkError):
    """One node's ledger could not be collected; `unreachable` when the transport never
    reached the node (ssh's own failure), as opposed to a failure on the node."""

    def __init__(self, node: str, reason: str, unreachable: bool = False) -> None:
        super().__init__(f"{node}: {reason}")
        self.node = node
        self.reason = reason
        self.unreachable = unreachable


class CollectFailed(CheckFailed):
    """A collection ran, but a node was not collected, witnessed or merged cleanly, or its
    clock is off (exit 1); the healthy nodes were collected and merged regardless."""


class UnknownJob(InputError):
    """The ledger holds no record of the job asked for."""


class TariffError(ConfigError):
    """A tariff file that cannot be used to price energy."""

# --- evidence bundles -----------------------------------------------------


class EvidenceError(InputError):
    """An evidence bundle that cannot be made or read (no cosigned checkpoint, not a
    bundle, a key file that cannot be used): names what and where (exit 2)."""


class EvidenceInvalid(CheckFailed):
    """A bundle that does not verify; `part` names what failed (a record, a proof,
    the checkpoint, a signature, a key, the policy snapshot, the statement)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part
        self.reason = message

# --- demo / testbed -------------------------------------------------------


class ServiceError(SparkError):
    """A demo/testbed service failed to start or died; names it and its log."""

    def __init__(self, name: str, why: str, log: str | None = None, tail: str = "") -> None:
        where = f" (log {log}: {tail})" if log else ""
        super().__init__(f"service {name}: {why}{where}")
        self.name = name
        self.log = log


class ScenarioFailed(CheckFailed):
    """A demo scenario's assertion did not hold."""

    def __init__(self, scenario: str, failed: list[str]) -> None:
        super().__init__(f"scenario {scenario}: " + "; ".join(failed))
        self.scenario = scenario
        self.failed = failed

