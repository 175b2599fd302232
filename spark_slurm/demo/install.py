"""What the stack installs from the source checkout: slurm/ wrappers, etc/ examples.

The demo and the tests install spark-slurm the way docs/slurm-setup.md says a
site does, from this checkout (or the admin files an installed wheel carries):
the prolog/epilog/NHC wrappers with their placeholders filled for this
interpreter, and the shipped policy and Lua.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from spark_slurm.files.layout import Layout, render
from spark_slurm.files.shipped import data_root


def find_repo(start: Path | None = None) -> Path:
    """The tree holding slurm/, etc/ and contrib/ as shipped (the demo installs from it):
    `start` or this package's checkout, else the admin files an installed wheel carries."""
    candidates = [Path(__file__).resolve().parents[2]]
    if start is not None:
        candidates.insert(0, start.resolve())
    for path in candidates:
        if (path / "slurm" / "job_submit.lua").is_file() and \
                (path / "etc" / "policy.yaml").is_file():
            return path
    return data_root()


def render_wrapper(template: Path, out: Path, hook_config: Path | str) -> Path:
    """A slurm/ wrapper with its install placeholders filled for this interpreter
    (as `sparkctl files install` fills them, with this run's hook config; on a
    namespaced host that is /run/spark/hook.json, the host's own)."""
    layout = replace(Layout.current(), hook_config=Path(hook_config))
    out.write_text(render(template.read_text(), layout.values(), str(template)))
    out.chmod(0o755)
    return out
