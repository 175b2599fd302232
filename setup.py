"""Build hooks that make a wheel self-contained; pyproject.toml holds all the metadata.

`build_py`, after copying the package into the build directory:

* generates the Karman protobuf bindings into `spark_slurm/karman/_proto/` with
  grpcio-tools' protoc (proto/generate.py, the code `make proto` runs), then checks
  that the protobuf release they are stamped with matches the `protobuf` range the
  wheel declares, so a wheel never carries bindings its own dependencies reject;
* copies the admin files (slurm/, contrib/, etc/, docs/, proto/*.proto) into
  `spark_slurm/_data/`, keeping their paths, where `sparkctl files` finds them.
  In git they stay where admins and the docs look for them: one copy each.

Editable installs (`pip install -e`, `make venv`) skip both: the checkout holds the
files, and `make proto` generates the bindings in place.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Top-level trees shipped whole as package data, and single files beside them.
DATA_TREES = ("slurm", "contrib", "etc", "docs")
DATA_GLOBS = ("proto/*.proto",)
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*~", ".*")


def _generator() -> ModuleType:
    """proto/generate.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("_spark_proto_generate",
                                                  ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    """build_py plus generated bindings and admin files (see the module docstring)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        lib = Path(self.build_lib) / "spark_slurm"
        self._bindings(lib / "karman" / "_proto")
        self._admin_files(lib / "_data")

    def _bindings(self, out: Path) -> None:
        gen = _generator()
        shutil.rmtree(out, ignore_errors=True)
        written = gen.generate(out, ROOT / "proto")
        gencode = gen.gencode_version(out / "karman_pb2.py")
        problem = gen.runtime_range_problem(list(self.distribution.install_requires), gencode)
        if problem is not None:
            raise SystemExit(f"setup.py: {problem} (pyproject.toml [project] dependencies)")
        self.announce(f"generated {len(written)} Karman binding files (gencode "
                      f"{'.'.join(map(str, gencode))})", level=2)

    def _admin_files(self, out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)
        for tree in DATA_TREES:
            shutil.copytree(ROOT / tree, out / tree, ignore=_SKIP)
        for pattern in DATA_GLOBS:
            for path in sorted(ROOT.glob(pattern)):
                dest = out / path.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


setup(cmdclass={"build_py": BuildPy})
