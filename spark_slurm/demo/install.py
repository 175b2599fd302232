"""What the stack installs from the source checkout: slurm/ wrappers, etc/ examples.

The demo and the tests install spark-slurm the way docs/slurm-setup.md says a
site does, from this checkout: the prolog/epilog/NHC wrappers with their
placeholders filled for this interpreter, and the shipped policy and Lua.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from spark_slurm.errors import InputError


def find_repo(start: Path | None = None) -> Path:
    """The source checkout holding slurm/, etc/ and contrib/ (the demo installs from it)."""
    candidates = [Path(__file__).resolve().parents[2]]
    if start is not None:
        candidates.insert(0, start.resolve())
    for path in candidates:
        if (path / "slurm" / "job_submit.lua").is_file() and \
                (path / "etc" / "policy.yaml").is_file():
            return path
    raise InputError("sparkctl demo needs the spark-slurm source checkout (slurm/, etc/, "
                     "contrib/); run it from the repository (make demo)")


def render_wrapper(template: Path, out: Path, hook_config: Path | str) -> Path:
    """A slurm/ wrapper with its install placeholders filled for this interpreter."""
    pkg = Path(__file__).resolve().parents[1]
    values = {"PYTHON": sys.executable, "PKGDIR": str(pkg.parent),
              "HOOK": str(pkg / "hook.py"), "HOOK_CONFIG": str(hook_config)}
    text = re.sub(r"@([A-Z_]+)@", lambda m: values.get(m.group(1), m.group(0)),
                  template.read_text())
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise InputError(f"{template}: unknown install placeholder {left[0]}")
    out.write_text(text)
    out.chmod(0o755)
    return out
