"""The wheel as an admin gets it: `python -m build` on a clean copy of the tree, installed
into a fresh venv that holds only its runtime dependencies, run from outside any
checkout. The Karman path (replay, tail, exporter, record, sparkd with an endpoint)
works at the lowest and the highest protobuf the wheel allows; a protobuf outside the
range is a clear error and leaves sparkd governing; the admin files come out of the
wheel. Built once per session, with pip's cache, to keep `make test` cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.integration.daemon.conftest import _free_port, _wait
from tests.proto_generator import load_generator

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
DATASET = REPO / "datasets" / "sample3-b200-dynamic-powercap.csv"
# what a source tree has that a release does not need (and that is big)
NOT_BUILT = ("datasets/", "tests/", "benchmarks/")
DEV_ONLY = ("grpcio-tools", "grpcio", "pytest", "hypothesis", "mypy", "ruff", "build")


def _run(argv: list[str], timeout: float = 300, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd, env=env)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Built:
    wheel: Path
    sdist: Path
    protobuf: Requirement  # the wheel's own Requires-Dist for protobuf


@dataclass
class Venv:
    root: Path
    work: Path  # a scratch directory outside any checkout, the commands' cwd

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run([self.bin(argv[0]), *argv[1:]], timeout, cwd=self.work,
                    env=_clean_env())

    def start(self, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        out = log.open("ab")
        try:
            return subprocess.Popen([self.bin(argv[0]), *argv[1:]], cwd=self.work,
                                    env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        finally:
            out.close()

    def pip(self, *args: str) -> str:
        return _ok(_run([self.bin("python"), "-m", "pip", "-q", *args], 600, env=_clean_env()))

    def protobuf(self) -> Version:
        out = _ok(self.run("python", "-c", "import google.protobuf as p; print(p.__version__)"))
        return Version(out.strip())


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH or venv of ours leaks into the wheel's environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """sdist + wheel from a copy of exactly what git would clone (plus uncommitted edits)."""
    listed = _ok(_run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"]))
    tree = tmp_path_factory.mktemp("clean-tree")
    for name in listed.split("\0"):
        if not name or name.startswith(NOT_BUILT) or not (REPO / name).is_file():
            continue
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    assert not (tree / "spark_slurm" / "karman" / "_proto").exists()
    dist = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "build", "--outdir", str(dist), str(tree)], 900,
             env=_clean_env()))
    wheel = next(dist.glob("spark_slurm-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in meta.decode().splitlines() if line.startswith("Requires-Dist:")]
    protobuf = next(r for r in requires if r.name == "protobuf" and r.marker is None)
    return Built(wheel, next(dist.glob("spark_slurm-*.tar.gz")), protobuf)


def _lowest(req: Requirement) -> str:
    return next(s.version for s in req.specifier if s.operator == ">=")


@pytest.fixture(scope="session")
def venv(built: Built) -> Iterator[Venv]:
    """A fresh venv with the wheel and its runtime dependencies, protobuf at its lowest."""
    base = Path(tempfile.mkdtemp(prefix="wheel-venv-"))
    try:
        _ok(_run([sys.executable, "-m", "venv", str(base / "venv")], 300))
        env = Venv(base / "venv", base / "work")
        env.work.mkdir()
        env.pip("install", str(built.wheel), f"protobuf=={_lowest(built.protobuf)}")
        yield env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_wheel_carries_bindings_admin_files_and_matching_metadata(built: Built) -> None:
    generate = load_generator()
    with zipfile.ZipFile(built.wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        pb2 = zf.read("spark_slurm/karman/_proto/karman_pb2.py").decode()
    for shipped in ("spark_slurm/_data/slurm/job_submit.lua", "spark_slurm/_data/etc/sparkd.yaml",
                    "spark_slurm/_data/contrib/sparkd.service",
                    "spark_slurm/_data/contrib/prometheus/spark-rules.yml",
                    "spark_slurm/_data/proto/karman.proto", "spark_slurm/_data/docs/admin-guide.md",
                    "spark_slurm/karman/_proto/karman_pb2.pyi", "spark_slurm/py.typed"):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    stamp = Path(tempfile.mkdtemp()) / "karman_pb2.py"
    try:
        stamp.write_text(pb2)
        gencode = generate.gencode_version(stamp)
    finally:
        shutil.rmtree(stamp.parent)
    assert generate.runtime_range_problem([str(built.protobuf)], gencode) is None
    with tarfile.open(built.sdist) as tf:
        inside = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"setup.py", "proto/generate.py", "proto/karman.proto", "LICENSE",
            "slurm/job_submit.lua", "contrib/sparkd.service"} <= inside
    assert not any(n.startswith("spark_slurm/karman/_proto/") for n in inside)


def test_venv_holds_only_runtime_dependencies(venv: Venv) -> None:
    listed = json.loads(_ok(venv.run("python", "-m", "pip", "list", "--format", "json")))
    names = {p["name"].lower() for p in listed}
    assert "spark-slurm" in names and not names & set(DEV_ONLY), sorted(names)
    _ok(venv.run("python", "-m", "pip", "check"))
    assert venv.run("sparkd", "--version").stdout.strip().startswith("sparkd ")


def _karman_path(venv: Venv, tmp: Path) -> None:
    """replay → tail, exporter, record, and sparkd subscribed to the same stream."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp / "logs"
    logs.mkdir()
    try:
        procs.append(venv.start("sparkctl", "karman", "replay", str(DATASET), "--bind",
                                endpoint, "--loop", log=logs / "replay.log"))
        tail = venv.run("sparkctl", "karman", "tail", "--endpoint", endpoint, "--count", "5",
                        "--json", "--duration", "60")
        cycles = [json.loads(line) for line in _ok(tail).splitlines()]
        assert len(cycles) == 5 and all(c["real_power_w"] > 0 for c in cycles), cycles
        assert {s["name"] for s in cycles[0]["streams"]} == {
            "threephase/karman1", "threephase/karman2", "threephase/karman3"}
        db = tmp / "record.db"
        _ok(venv.run("sparkctl", "karman", "record", "--endpoint", endpoint, "--to", str(db),
                     "--count", "30", "--duration", "60"))
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT count(DISTINCT time_ns) FROM karman_readings").fetchone()
        conn.close()
        assert rows[0] >= 30
        port = _free_port()
        procs.append(venv.start("sparkctl", "karman", "exporter", "--endpoint", endpoint,
                                "--port", str(port), log=logs / "exporter.log"))
        scraped: list[str] = []

        def exported() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2) as resp:
                    scraped[:] = [resp.read().decode()]
            except OSError:
                return False
            return 'karman_real_power_watts{phase="sum",stat="average",stream="rack"}' \
                in scraped[0]

        _wait(exported, 60, f"exporter metrics ({(logs / 'exporter.log').read_text()})")
        status = _sparkd_status(venv, tmp, endpoint, logs)
        karman = status["karman"]
        assert isinstance(karman, dict) and karman["decoded"] > 0 and "error" not in karman
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)


def _sparkd_status(venv: Venv, tmp: Path, endpoint: str, logs: Path,
                   until: str = "decoded") -> dict[str, object]:
    """Start the wheel's sparkd (sim GPUs, the wheel's example policy) on `endpoint`,
    wait until its status shows `until` under karman, stop it cleanly."""
    run = tmp / "sparkd"
    sim = run / "sim"
    _ok(venv.run("sparkctl", "sim", "init", str(sim), "--gpus", "2"))
    data = Path(json.loads(_ok(venv.run("sparkctl", "files", "list", "--json")))["data_root"])
    (run / "jobs.json").write_text("{}")
    sock = run / "sparkd.sock"
    config = run / "sparkd.yaml"
    config.write_text(f"node: w1\nstate_dir: {run / 'state'}\nsocket: {{path: {sock}}}\n"
                      f"gpu: {{backend: sim, state_dir: {sim}}}\n"
                      f"policy: {data / 'etc' / 'policy.yaml'}\n"
                      f"job_context: {{source: static, path: {run / 'jobs.json'}}}\n"
                      f"journal_path: {run / 'journal.jsonl'}\n"
                      f"karman: {{endpoint: '{endpoint}'}}\n")
    log = logs / f"sparkd-{time.monotonic_ns()}.log"
    proc = venv.start("sparkd", "--config", str(config), log=log)
    status: dict[str, object] = {}
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"sparkd exited {proc.returncode}: {log.read_text()}")
            done = venv.run("sparkctl", "status", "--socket", str(sock), "--json")
            if done.returncode != 0:
                return False
            status.update(json.loads(done.stdout))
            karman = status.get("karman")
            return isinstance(karman, dict) and bool(karman.get(until))

        _wait(ready, 60, f"sparkd karman {until} ({log.read_text()[-2000:]})")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    shutil.rmtree(run)
    return status


def test_karman_path_at_the_lowest_allowed_protobuf(venv: Venv, built: Built,
                                                   tmp_path: Path) -> None:
    venv.pip("install", f"protobuf=={_lowest(built.protobuf)}")
    assert venv.protobuf() == Version(_lowest(built.protobuf))
    _karman_path(venv, tmp_path)


def test_karman_path_at_the_highest_allowed_protobuf(venv: Venv, built: Built,
                                                    tmp_path: Path) -> None:
    venv.pip("install", "--upgrade", str(built.protobuf))  # the newest the range allows
    assert venv.protobuf() in built.protobuf.specifier
    _karman_path(venv, tmp_path)


def test_a_protobuf_outside_the_range_is_a_clear_error(venv: Venv, built: Built,
                                                      tmp_path: Path) -> None:
    major = Version(_lowest(built.protobuf)).major
    try:
        venv.pip("install", "--no-deps", f"protobuf<{major}")  # what pip would refuse
        old = venv.protobuf()
        replay = venv.run("sparkctl", "karman", "replay", str(DATASET), "--bind",
                          f"tcp://127.0.0.1:{_free_port()}", "--count", "1")
        assert replay.returncode == 2 and "Traceback" not in replay.stderr, replay.stderr
        assert replay.stderr.startswith("sparkctl: Karman protobuf bindings do not load with the "
                                      f"installed protobuf {old}"), replay.stderr
        logs = tmp_path / "logs"
        logs.mkdir()
        status = _sparkd_status(venv, tmp_path, f"tcp://127.0.0.1:{_free_port()}", logs,
                                until="error")
        assert f"protobuf {old}" in str(status["karman"])
    finally:
        venv.pip("install", str(built.protobuf))


def test_admin_files_come_out_of_the_wheel(venv: Venv, tmp_path: Path) -> None:
    listed = json.loads(_ok(venv.run("sparkctl", "files", "list", "--json")))
    data = Path(listed["data_root"])
    assert data.parts[-3:] == ("site-packages", "spark_slurm", "_data"), data
    out = _ok(venv.run("sparkctl", "files", "install", "--root", str(tmp_path), "--json"))
    files = json.loads(out)["files"]
    assert {f["action"] for f in files} == {"created"}
    unit = (tmp_path / "etc/systemd/system/sparkd.service").read_text()
    assert f"ExecStart={venv.root}/bin/sparkd --config /etc/spark/sparkd.yaml" in unit
    prolog = (tmp_path / "etc/slurm/spark-prolog").read_text()
    assert f"exec {venv.root}/bin/python" in prolog and str(data.parents[1]) in prolog


@pytest.mark.slurm
def test_demo_runs_from_the_wheel(venv: Venv) -> None:
    work = Path(tempfile.mkdtemp(prefix="wheel-demo-"))
    try:
        done = venv.run("sparkctl", "demo", "oob", "--workdir", str(work), timeout=400)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr
        assert done.stdout.rstrip().endswith(f"1/1 scenarios passed; results in {work}/results")
        assert "plots skipped: matplotlib is not installed" in done.stdout
    finally:
        venv.run("sparkctl", "demo", "--stop", str(work))
        shutil.rmtree(work, ignore_errors=True)
