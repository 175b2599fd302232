"""The thermal guard, stepped by hand: throttle at threshold_c, hold through the
hysteresis band, release at release_c, and what each action records.

Job 9 holds Slurm GPU 0 at 400 W on NvmlBackend over the pynvml stand-in (see
test_monitor_causes); the policy's guard throttles at 85 °C and releases at 75 °C.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.ledger.records import Record
from tests.unit.daemon.test_monitor_causes import Rig, rigged
from tests.unit.gpu import fake_nvml as fn

GPU_LIMITS = "gpu: {default_watts: 500, min_watts: 200, max_watts: 700}\n"
REFUSED = "NVML error code 4"  # NO_PERMISSION, as the driver said it
PATHS = {"telemetry": "ok", "policy": "allow", "facility": "pending", "ledger": "committed"}


def _policy(thermal: str) -> str:
    return f"version: 1\n{GPU_LIMITS}thermal: {{{thermal}}}\n"


GUARD = _policy("threshold_c: 85, release_c: 75")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with rigged(tmp_path, GUARD) as made:
        yield made


def _look(rig: Rig, temp_c: int) -> None:
    rig.gpu.temp_c = temp_c
    rig.clock.advance(1)
    rig.monitor.tick()


def _records(rig: Rig, kind: str) -> list[Record]:
    rig.writer.flush()
    return list(rig.ledger.records(kinds=[kind]))


def test_the_threshold_itself_throttles_and_the_per_says_why(rig: Rig) -> None:
    _look(rig, 84)
    assert rig.bodies("throttle") == [] and rig.gpu.requested_mw == 400_000
    _look(rig, 85)
    (throttle,) = rig.bodies("throttle")
    assert throttle == {
        "v": 1, "node": "n1", "gpu": 0, "job_id": "9", "source": "automation",
        "authority": "automation:thermal",
        "requester": {"uid": 0, "user": "sparkd", "role": "automation"},
        "temp_mc": 85_000, "threshold_mc": 85_000, "from_mw": 400_000, "to_mw": 280_000,
        "readback_mw": 280_000, "ok": True, "paths": PATHS}
    assert rig.gpu.requested_mw == 280_000  # 0.7 of the job's 400 W, the default fraction
    assert rig.counted == ["throttle"]
    assert rig.bodies("drift") == []  # the guard's own limit is not drift


def test_the_band_between_release_and_threshold_holds_the_throttle(rig: Rig) -> None:
    _look(rig, 90)
    for temp in (90, 84, 80, 76):
        _look(rig, temp)
    assert len(rig.bodies("throttle")) == 1 and rig.bodies("release") == []
    assert rig.gpu.requested_mw == 280_000 and rig.bodies("drift") == []
    _look(rig, 75)  # release_c itself releases
    (throttle,) = _records(rig, "throttle")
    (release,) = rig.bodies("release")
    assert release == {
        "v": 1, "node": "n1", "gpu": 0, "job_id": "9", "source": "automation",
        "authority": "automation:thermal",
        "requester": {"uid": 0, "user": "sparkd", "role": "automation"},
        "temp_mc": 75_000, "threshold_mc": 75_000, "from_mw": 280_000, "to_mw": 400_000,
        "readback_mw": 400_000, "ok": True,
        "ref": {"seq": throttle.seq, "hash": throttle.hash}, "paths": PATHS}
    assert rig.gpu.requested_mw == 400_000
    assert rig.counted == ["throttle", "release"]
    _look(rig, 75)
    _look(rig, 85)  # released for good: the next spike throttles again
    assert len(rig.bodies("throttle")) == 2 and len(rig.bodies("release")) == 1


@pytest.mark.parametrize(("thermal", "to_mw"), [
    ("throttle_watts: 300", 300_000),
    ("throttle_watts: 150", 200_000),  # never below the GPU's own minimum
    ("throttle_fraction: 0.5", 200_000),
])
def test_the_throttle_goes_to_the_policy_s_watts_or_fraction(
        tmp_path: Path, thermal: str, to_mw: int) -> None:
    with rigged(tmp_path, _policy(f"threshold_c: 85, release_c: 75, {thermal}")) as rig:
        _look(rig, 86)
        (throttle,) = rig.bodies("throttle")
        assert (throttle["from_mw"], throttle["to_mw"], throttle["ok"]) == (
            400_000, to_mw, True)
        assert rig.gpu.requested_mw == to_mw
        _look(rig, 70)
        (release,) = rig.bodies("release")
        assert (release["from_mw"], release["to_mw"]) == (to_mw, 400_000)


@pytest.mark.parametrize("thermal", ["throttle_watts: 400", "throttle_watts: 450"])
def test_a_throttle_that_would_not_lower_the_limit_is_not_taken(
        tmp_path: Path, thermal: str) -> None:
    with rigged(tmp_path, _policy(f"threshold_c: 85, release_c: 75, {thermal}")) as rig:
        _look(rig, 95)
        _look(rig, 70)
        assert rig.bodies("throttle") == [] and rig.bodies("release") == []
        assert rig.gpu.requested_mw == 400_000 and rig.counted == []


def test_a_disabled_guard_never_throttles(tmp_path: Path) -> None:
    with rigged(tmp_path, _policy("enabled: false, threshold_c: 85, release_c: 75")) as rig:
        _look(rig, 120)
        assert rig.bodies("throttle") == [] and rig.gpu.requested_mw == 400_000


def test_an_ungoverned_gpu_is_not_throttled(rig: Rig) -> None:
    other = rig.fake.devices[0]  # Slurm GPU 1: no job, no governed limit
    other.temp_c = 100
    rig.clock.advance(1)
    rig.monitor.tick()
    rig.writer.flush()
    assert list(rig.ledger.records(kinds=["throttle"])) == []
    assert other.requested_mw == other.default_mw


def test_a_throttle_the_driver_refuses_is_recorded_and_tried_again(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceSetPowerManagementLimit"] = fn.NVML_ERROR_NO_PERMISSION
    _look(rig, 90)
    (failed,) = rig.bodies("throttle")
    assert failed["ok"] is False and REFUSED in failed["error"]
    assert (failed["to_mw"], failed["readback_mw"]) == (280_000, 400_000)
    assert rig.gpu.requested_mw == 400_000
    _look(rig, 70)  # nothing is in force, so nothing is released
    assert rig.bodies("release") == []
    del rig.fake.fail["nvmlDeviceSetPowerManagementLimit"]
    _look(rig, 90)  # still hot: the guard tries again, and this time the limit holds
    assert [b["ok"] for b in rig.bodies("throttle")] == [False, True]
    assert rig.gpu.requested_mw == 280_000


def test_a_release_the_driver_refuses_keeps_the_throttle_in_force(rig: Rig) -> None:
    _look(rig, 90)
    rig.fake.fail["nvmlDeviceSetPowerManagementLimit"] = fn.NVML_ERROR_NO_PERMISSION
    _look(rig, 70)
    (failed,) = rig.bodies("release")
    assert failed["ok"] is False and REFUSED in failed["error"]
    assert rig.gpu.requested_mw == 280_000 and rig.bodies("drift") == []
    del rig.fake.fail["nvmlDeviceSetPowerManagementLimit"]
    _look(rig, 70)
    assert [b["ok"] for b in rig.bodies("release")] == [False, True]
    assert rig.gpu.requested_mw == 400_000


def test_each_action_asks_the_facility_check_once_its_per_is_durable(rig: Rig) -> None:
    asked: list[tuple[str, int, list[int], int, str | None]] = []

    def follow(kind: str, receipt: ReceiptLike, gpus: list[int], changed_ns: int,
               job: str | None) -> None:
        asked.append((kind, receipt.seq, gpus, changed_ns, job))

    rig.monitor.pipeline.follow_up = follow
    _look(rig, 90)
    _look(rig, 70)
    rig.writer.stop()  # the writer's thread runs a PER's callbacks before it ends
    (throttle,) = _records(rig, "throttle")
    (release,) = _records(rig, "release")
    assert [(k, s, g, j) for k, s, g, _, j in asked] == [
        ("throttle", throttle.seq, [0], "9"), ("release", release.seq, [0], "9")]
    assert all(changed > 0 for *_, changed, _ in asked)

