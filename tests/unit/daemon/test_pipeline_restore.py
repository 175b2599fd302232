"""What an epilog records and answers: each GPU put back to the limit it had
before the job, the energy the job used, a job the node holds no cap for, and
the one restore PER per job end."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spark_slurm.daemon.pipeline import Refusal
from spark_slurm.daemon.state import IntentStore, JobState, Throttle
from tests.unit.daemon.test_pipeline_record import Node, reading


def _restored(g: int, energy: int, used: int, reset: bool = False) -> dict[str, Any]:
    return {"index": g, "uuid": f"GPU-{g}", "intended_mw": 700_000, "readback_mw": 700_000,
            "ok": True, "before": reading(energy, 400_000, 3 if reset else 2),
            "previous_mw": 700_000,
            "energy_mj": used, "energy_reset": reset}


def test_an_epilog_restores_each_gpu_and_records_the_energy_it_used(node: Node) -> None:
    node.prolog("7", [0, 1], 800)
    node.gpus.cards[0].energy = 59_000  # 50 J since the prolog
    node.gpus.cards[1].energy, node.gpus.cards[1].epoch = 100, 3  # a driver reload
    started = time.time_ns()
    reply = node.epilog("7", id="e1")
    (restore,) = node.bodies("restore")
    assert started <= restore.pop("changed_ns") <= time.time_ns()
    assert restore == {
        "v": 1, "node": "n1", "source": "socket", "authority": "slurm-epilog", "job_id": "7",
        "requester": {"uid": 0, "user": "root", "role": "scheduler"},
        "request": {"op": "epilog", "job_id": "7"}, "op": "epilog",
        "context": {"job_id": "7", "user": "alice", "uid": 1000, "gpus": [0, 1],
                    "status": "ok"},
        "gpus": [_restored(0, 59_000, 50_000), _restored(1, 100, 100, reset=True)],
        "energy_mj": 50_100, "energy_known": True,
        "paths": {"telemetry": "ok", "context": "ok", "facility": "pending",
                  "policy": "allow", "ledger": "committed"}}
    (record,) = node.ledger.records(kinds=["restore"])
    assert reply == {"ok": True, "id": "e1", "seq": record.seq, "hash": record.hash,
                     "gpus": [{"index": g, "intended_mw": 700_000, "readback_mw": 700_000,
                               "ok": True} for g in (0, 1)]}
    assert node.limits() == [700_000] * 4
    assert node.state.governed == {0: 700_000, 1: 700_000} and node.state.jobs == {}
    assert IntentStore(node.intents.path.parent).load() == {}
    _, (kind, followed, gpus, changed_ns, job_id) = node.follow_ups
    assert (kind, followed.seq, gpus, changed_ns, job_id) == (
        "restore", record.seq, [0, 1], record.body["changed_ns"], "7")


def test_a_gpu_lost_before_its_energy_is_read_says_so_and_counts_nothing(node: Node) -> None:
    node.prolog("7", [0, 1], 800)
    node.gpus.cards[0].samples_left = 1  # the epilog's before reading, then lost
    node.gpus.cards[1].energy = 10_000
    node.epilog("7")
    (restore,) = node.bodies("restore")
    first, second = restore["gpus"]
    assert first["energy_error"] == "GpuLost: GPU 0: sample failed"
    assert "energy_mj" not in first and "energy_reset" not in first
    assert (second["energy_mj"], restore["energy_mj"]) == (1_000, 1_000)


def test_an_epilog_for_a_job_without_a_cap_checks_the_idle_limits(node: Node) -> None:
    node.prolog("5", [1], 400)
    node.state.governed[0] = 650_000
    node.gpus.cards[2].requested = 550_000  # never governed: kept as it is
    node.epilog("9", gpus=[0, 1, 2], uid=1000)  # GPU 1 is job 5's
    (restore,) = node.bodies("restore")
    assert restore["context"] == {
        "job_id": "9", "gpus": [0, 1, 2], "status": "partial", "uid": 1000,
        "notes": ["no job context source configured; request fields only"]}
    assert restore["notes"] == ["no cap recorded for this job on this node; limits checked "
                                "against the governed idle value"]
    assert [(e["index"], e["intended_mw"], e["previous_mw"]) for e in restore["gpus"]] == [
        (0, 650_000, 650_000), (2, 550_000, 550_000)]
    assert not any("energy_mj" in e for e in restore["gpus"])
    assert (restore["energy_mj"], restore["energy_known"]) == (0, False)
    assert restore["paths"]["context"] == "partial"
    assert node.limits() == [650_000, 400_000, 550_000, 700_000]
    assert node.state.governed == {0: 650_000, 1: 400_000, 2: 550_000}
    assert list(node.state.jobs) == ["5"]


def test_a_gpu_with_no_target_and_no_reading_is_an_error(node: Node) -> None:
    node.gpus.cards[3].fail.add("limits")
    reply = node.epilog("9", gpus=[3])
    assert reply["gpus"] == [{"index": 3, "intended_mw": None, "readback_mw": None,
                              "ok": False, "error": "GpuLost: GPU 3: limits failed"}]
    node.epilog("10")  # nothing named at all
    first, second = node.bodies("restore")
    assert first["gpus"] == [{"index": 3, "error": "GpuLost: GPU 3: limits failed"}]
    assert first["paths"]["telemetry"] == "failed"
    assert (second["gpus"], second["paths"]["telemetry"]) == ([], "ok")


def test_a_recorded_restore_refuses_a_second_epilog(node: Node) -> None:
    node.prolog("7", [0], 400)
    node.epilog("7")
    (record,) = node.ledger.records(kinds=["restore"])
    with pytest.raises(Refusal) as err:
        node.epilog("7")
    assert (err.value.code, err.value.reason) == (
        "already-restored",
        f"job 7: its restore is already recorded (PER seq {record.seq}); nothing changed")
    node.prolog("8", [1], 400)
    node.cap("8", watts_per_gpu=300)
    node.state.jobs.clear()  # the job's newest PER is a cap: its end is not recorded
    node.epilog("8", gpus=[1])
    assert len(node.bodies("restore")) == 2


def test_an_epilog_while_another_records_the_same_end_is_refused(node: Node) -> None:
    node.prolog("7", [0], 400)
    message = "job 7: an earlier epilog is recording its restore; nothing changed"
    node.state.ending.add("7")
    with pytest.raises(Refusal, match=message) as err:
        node.epilog("7")  # the job still holds its cap: refused under the lock
    assert err.value.code == "already-restored"
    node.state.ending.add("9")
    with pytest.raises(Refusal, match=message.replace("7", "9")):
        node.epilog("9", gpus=[1])  # not held: refused before the context is asked
    assert node.limits()[0] == 400_000 and node.bodies("restore") == []


def test_without_a_ledger_lookup_a_repeated_epilog_checks_again(tmp_path: Path) -> None:
    node = Node(tmp_path, ledger_lookup=False)
    try:
        node.epilog("9", gpus=[0])
        node.epilog("9", gpus=[0])  # the first one's end is no longer in progress
        assert len(node.bodies("restore")) == 2 and node.state.ending == set()
    finally:
        node.writer.stop()
        node.ledger.close()


def test_a_restore_whose_intent_cannot_be_closed_is_still_done(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.prolog("7", [0], 400)

    def broken(job_id: str) -> None:
        raise OSError(5, "Input/output error")

    node.intents.end = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="sparkd.pipeline"):
        reply = node.epilog("7")
    assert reply["ok"] and node.state.jobs == {}
    assert any("job 7: restore recorded, intent not closed" in m for m in caplog.messages)


def _free(lock: Any) -> bool:
    """Whether another thread could take `lock` now (so this one does not hold it)."""
    free: list[bool] = []

    def probe() -> None:
        took = lock.acquire(blocking=False)
        if took:
            lock.release()
        free.append(took)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free[0]


class Scontrol:
    """A job-context source noting, per question, whether the pipeline lock was free."""

    def __init__(self) -> None:
        self.pipeline: Any = None
        self.asked: list[tuple[str, bool]] = []
        self.meanwhile: Callable[[], object] | None = None  # run once, inside the question

    def get(self, job_id: str) -> SimpleNamespace:
        self.asked.append((job_id, _free(self.pipeline.lock)))
        if self.meanwhile is not None:
            run, self.meanwhile = self.meanwhile, None
            run()
        return SimpleNamespace(user="bob", uid=2000, account="physics",
                               node_gpus={"n1": [0], "n2": [3]})


@pytest.fixture
def sourced(tmp_path: Path) -> Iterator[tuple[Node, Scontrol]]:
    source = Scontrol()
    made = Node(tmp_path, source=source)
    source.pipeline = made.pipeline
    yield made, source
    made.writer.stop()
    made.ledger.close()


def test_the_context_of_a_job_without_a_cap_is_asked_outside_the_lock(
        sourced: tuple[Node, Scontrol]) -> None:
    node, source = sourced
    node.epilog("9")
    assert source.asked == [("9", True)]  # once, while other requests could go on
    (restore,) = node.bodies("restore")
    assert restore["context"] == {"job_id": "9", "gpus": [0], "status": "ok", "user": "bob",
                                  "uid": 2000, "account": "physics"}
    assert [e["index"] for e in restore["gpus"]] == [0]  # this node's GPUs, not n2's


def test_an_epilog_of_a_capped_job_does_not_ask_the_context_source(
        sourced: tuple[Node, Scontrol]) -> None:
    node, source = sourced
    node.prolog("7", [0], 400)
    node.epilog("7")
    assert [job for job, _ in source.asked] == ["7"]  # the prolog's question only


def test_an_end_recorded_while_its_context_was_asked_is_refused(
        sourced: tuple[Node, Scontrol]) -> None:
    node, source = sourced
    source.meanwhile = lambda: node.epilog("9")  # a repeated epilog gets there first
    with pytest.raises(Refusal) as err:
        node.epilog("9")
    assert err.value.code == "already-restored"
    assert len(node.bodies("restore")) == 1


def test_an_epilog_under_a_thermal_throttle_keeps_the_throttle(node: Node) -> None:
    node.prolog("7", [1], 500)
    node.state.throttled[1] = Throttle(base_mw=500_000, to_mw=300_000, ref=None)
    node.gpus.cards[1].requested = 300_000
    node.epilog("7")
    assert node.limits()[1] == 300_000 and node.state.throttled[1].base_mw == 700_000


def test_a_job_from_an_intent_without_energy_epochs_counts_from_epoch_zero(
        node: Node) -> None:
    node.state.jobs["8"] = JobState(job_id="8", uid=1000, user="alice", gpus=[2],
                                    previous_mw={2: 700_000}, start_energy_mj={2: 4_000},
                                    start_energy_epoch={}, granted_mw=400_000)
    node.gpus.cards[2].epoch = 0
    node.epilog("8")
    (restore,) = node.bodies("restore")
    assert (restore["gpus"][0]["energy_mj"], restore["gpus"][0]["energy_reset"]) == (
        5_000, False)


def test_a_restore_the_gpu_refuses_leaves_it_governed_at_the_cap(node: Node) -> None:
    node.prolog("7", [3], 400)
    node.gpus.cards[3].fail.add("refuse")
    node.epilog("7")
    assert node.state.governed[3] == 400_000 and node.state.jobs == {}


def test_a_restore_the_driver_does_not_take_is_a_fault_of_the_job(node: Node) -> None:
    node.state.governed[0] = 500_000
    node.prolog("7", [0], 400)
    node.gpus.cards[0].enforced = 650_000
    node.epilog("7")
    (fault,) = node.bodies("fault")
    assert (fault["job_id"], fault["expected_mw"], fault["enforced_mw"]) == (
        "7", 500_000, 650_000)
