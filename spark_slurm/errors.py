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

# --- gpu ------------------------------------------------------------------

# --- karman ---------------------------------------------------------------

# --- policy ---------------------------------------------------------------

# --- daemon ---------------------------------------------------------------

# --- slurm ----------------------------------------------------------------

# --- head node (merge, witness, audit, replay) ----------------------------
