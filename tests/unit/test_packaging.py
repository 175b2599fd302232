"""What pyproject.toml promises about the build, checked without building: the SPDX
license and its file, one grpcio-tools pin for the wheel build and `make proto`, and a
`protobuf` range that is exactly what the generated bindings accept (the slow wheel
test builds and installs for real)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import spark_slurm
from spark_slurm.karman.schema import bindings
from tests.proto_generator import load_generator

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_one_protoc_for_the_wheel_and_for_make_proto() -> None:
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    dev = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    pins = {str(r.specifier) for r in build + dev if r.name == "grpcio-tools"}
    assert len(pins) == 1 and next(iter(pins)).startswith("=="), pins


def test_protobuf_range_matches_the_generated_bindings() -> None:
    gen = load_generator()
    module = Path(bindings().__file__ or "")
    gencode = gen.gencode_version(module)
    deps = PYPROJECT["project"]["dependencies"]
    assert gen.runtime_range_problem(deps, gencode) is None
    # and the check does refuse what the issue found: a range the bindings reject
    wide = [d for d in deps if not d.startswith("protobuf")] + ["protobuf>=4.25"]
    problem = gen.runtime_range_problem(wide, gencode)
    assert problem is not None and gen.runtime_range(gencode) in problem


def test_the_version_is_written_once() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "spark_slurm.__version__"}
    assert spark_slurm.__version__.count(".") == 2
