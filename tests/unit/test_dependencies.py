"""Every runtime dependency pyproject.toml declares is imported by the package, and the
package imports nothing third-party that is not declared (the wheel's venv holds only
what is declared, so an undeclared import fails there, not here)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "spark_slurm"
# imported only where they can be, and said so in pyproject.toml
OPTIONAL = {"matplotlib", "psycopg", "pyslurm"}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    ours = {p.stem for p in PACKAGE.rglob("*.py")}  # a worker's stdlib-only fallback import
    return names - set(sys.stdlib_module_names) - ours - {"spark_slurm", "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}


@functools.cache
def _used() -> frozenset[str]:
    """Distributions of the third-party modules the package imports."""
    owners = importlib.metadata.packages_distributions()
    return frozenset(canonicalize_name(owners.get(name, [name])[0])
                     for name in _imported_top_levels() - OPTIONAL)


def test_every_declared_dependency_is_imported() -> None:
    assert _declared() - _used() == set()


def test_every_third_party_import_is_declared() -> None:
    assert _used() - _declared() == set()
