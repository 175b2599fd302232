"""The fleet directory: shared safely between processes, and bad state named clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import InputError, SimStateError
from spark_slurm.gpu import open_backend
from spark_slurm.gpu.sim import SimFleet

WRITER = """
import sys
from spark_slurm.gpu.sim import SimFleet
fleet = SimFleet.open(sys.argv[1])
for k in range(150):
    if sys.argv[2] == "load":
        fleet.set_load(k / 149, index=0)
    else:
        fleet.oob_set_limit(0, 200_000 + k * 1000)
"""


def test_concurrent_writers_lose_no_update_and_readers_never_see_torn_state(
        tmp_path: Path) -> None:
    SimFleet.init(tmp_path / "f", 1, "b200")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "f"), what])
             for what in ("load", "limit")]
    gpu = open_backend("sim", state_dir=tmp_path / "f")
    reads = 0
    while any(p.poll() is None for p in procs) or reads < 50:
        lim = gpu.limits(0)  # raises SimStateError on a torn or half-written file
        assert 200_000 <= lim.requested_mw <= 1_000_000
        gpu.sample(0)
        reads += 1
    assert [p.wait() for p in procs] == [0, 0]
    assert gpu.limits(0).requested_mw == 349_000
    assert gpu.sample(0).util_pct == 100
    assert not [p for p in (tmp_path / "f").iterdir() if p.suffix == ".tmp"]


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    SimFleet.init(tmp_path / "f", 2, "h100")
    with pytest.raises(SimStateError, match="already holds a simulated fleet"):
        SimFleet.init(tmp_path / "f", 4, "b200")
    fleet = SimFleet.init(tmp_path / "f", 4, "b200", force=True)
    assert len(SimFleet.open(tmp_path / "f").devices) == 4
    assert fleet.model.max_mw == 1_000_000


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"model": "z100"}, "unknown GPU model 'z100'"),
    ({"gpus": 0}, "--gpus must be between 1 and 64"),
    ({"minors": [0, 0]}, "--minors must list 2 distinct"),
    ({"minor_base": -1}, "--minor-base must be >= 0"),
    ({"min_mw": 500_000, "max_mw": 400_000}, "need 0 < min"),
])
def test_bad_init_requests_are_named(tmp_path: Path, kwargs: dict[str, object],
                                     text: str) -> None:
    args: dict[str, object] = {"gpus": 2, "model": "b200"} | kwargs
    with pytest.raises(InputError, match=text):
        SimFleet.init(tmp_path / "f", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "f" / "fleet.json").exists()


def test_identities_are_stable_per_fleet_and_differ_between_fleets(tmp_path: Path) -> None:
    a = SimFleet.init(tmp_path / "a", 10, "b200")
    b = SimFleet.init(tmp_path / "b", 10, "b200")
    assert SimFleet.open(tmp_path / "a").devices == a.devices
    assert not {d.uuid for d in a.devices} & {d.uuid for d in b.devices}
    assert len({d.pci_bus_id for d in a.devices}) == 10
    assert a.devices[8].pci_bus_id == "00000001:18:00.0"


def test_configured_limits_are_used(tmp_path: Path) -> None:
    clock = ManualClock()
    SimFleet.init(tmp_path / "f", 1, "h100", clock=clock, max_mw=600_000, min_mw=150_000)
    lim = open_backend("sim", state_dir=tmp_path / "f", clock=clock).limits(0)
    assert (lim.min_mw, lim.max_mw, lim.default_mw) == (150_000, 600_000, 600_000)


def test_missing_state_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(SimStateError, match=r"nowhere: state directory does not exist"):
        open_backend("sim", state_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimStateError, match=r"fleet.json: missing fleet config"):
        SimFleet.open(tmp_path / "empty")


@pytest.mark.parametrize(("target", "content", "text"), [
    ("gpu1.json", "{not json", "gpu1.json: corrupt GPU state file"),
    ("gpu1.json", "[1, 2]", "gpu1.json: corrupt GPU state file: not a JSON object"),
    ("gpu1.json", '{"faults": [], "t_ns": "soon"}', "field 't_ns' missing or of the wrong"),
    ("gpu1.json", '{"faults": [{"kind": "driver-crash", "start_ns": "x", "end_ns": null}]}',
     "malformed fault entry"),
    ("fleet.json", "", "fleet.json: corrupt fleet config"),
    ("fleet.json", '{"format": "other"}', "format is not"),
])
def test_corrupt_files_are_named(tmp_path: Path, target: str, content: str, text: str) -> None:
    SimFleet.init(tmp_path / "f", 2, "b200")
    (tmp_path / "f" / target).write_text(content)
    with pytest.raises(SimStateError, match=text):
        open_backend("sim", state_dir=tmp_path / "f").sample(1)


def test_a_corrupt_gpu_file_spoils_only_that_gpu(tmp_path: Path) -> None:
    SimFleet.init(tmp_path / "f", 2, "b200")
    state = json.loads((tmp_path / "f" / "gpu1.json").read_text())
    del state["requested_mw"]
    (tmp_path / "f" / "gpu1.json").write_text(json.dumps(state))
    gpu = open_backend("sim", state_dir=tmp_path / "f")
    assert gpu.sample(0).power_mw > 0
    with pytest.raises(SimStateError, match="'requested_mw'"):
        gpu.set_power_limit(1, 500_000)
    with pytest.raises(SimStateError):  # the bad file is left for inspection, not replaced
        gpu.limits(1)


def test_unknown_backend_name() -> None:
    with pytest.raises(InputError, match="unknown gpu backend 'cuda'"):
        open_backend("cuda")
    with pytest.raises(InputError, match="needs a state_dir"):
        open_backend("sim")
