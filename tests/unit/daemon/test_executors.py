"""Validate-only mode, unit level: config, intent requests, the durable pending file and
the gate's verdict logic, stepped by hand with a manual clock and a GPU fake."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.config import ExecutorSettings, load_config, parse_config
from spark_slurm.daemon.executor_intents import PendingIntents
from spark_slurm.daemon.executors import ExecutorGate
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import request_from
from spark_slurm.daemon.state import IntentStore, NodeState
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import BadRequest, ConfigError
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy
from tests.unit.daemon.test_pipeline_record import Failing

BASE = "node: n1\nstate_dir: s\ngpu: {backend: sim, state_dir: sim}\npolicy: p.yaml\n"
POLICY = """\
version: 1
gpu: {default_watts: 500, min_watts: 200, max_watts: 700}
permissions: {owner_may: lower, admin_group: no-such-group-here}
"""
ROOT = Peer(0, 0, 1)


def test_executor_settings_parse_and_default_off(tmp_path: Path) -> None:
    assert not parse_config(BASE, Path("c")).executors.enabled
    cfg = parse_config(BASE + "executors: {validate_only: [3, 1], users: [dcgm, 4242], "
                       "deadline_s: 10, expect: dps}\n", Path("c")).executors
    assert cfg.validate_gpus == (1, 3) and cfg.validate_only(3) and not cfg.validate_only(2)
    assert cfg.users == ("dcgm", "4242") and cfg.deadline_s == 10 and cfg.expect == "dps"
    assert cfg.max_deadline_s == 600
    every = parse_config(BASE + "executors: {validate_only: all}\n", Path("c")).executors
    assert every.validate_only(63) and every.enabled
    example = load_config(Path(__file__).parents[3] / "etc" / "sparkd.yaml").executors
    assert not example.enabled and example.deadline_s == 30


@pytest.mark.parametrize(("extra", "message"), [
    ("executors: {validate_only: some}\n", "c:5:28: executors.validate_only: expected"),
    ("executors: {validate_only: [1, 1]}\n", "c:5:28: executors.validate_only: expected"),
    ("executors: {users: dcgm}\n", "c:5:20: executors.users: expected a list"),
    ("executors: {deadline_s: 60, max_deadline_s: 30}\n",
     "c:5:45: executors.max_deadline_s: 30 is shorter"),
    ("executors: {expect: 'a b'}\n", "c:5:21: executors.expect: 'a b' is not an executor"),
    ("executors: {validate: all}\n", "c:5:23: executors.validate: unknown key"),
])
def test_bad_executor_settings_name_the_place(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + extra, Path("c"))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"op": "intent", "gpus": [0], "watts_per_gpu": 300}, "needs 'executor'"),
    ({"op": "intent", "executor": "x", "watts_per_gpu": 300}, "needs 'gpus'"),
    ({"op": "intent", "executor": "x", "gpus": [0]}, "needs 'watts_per_gpu'"),
    ({"op": "intent", "executor": "x", "gpus": [0], "watts": 300}, "not 'watts'"),
    ({"op": "intent", "executor": "x y", "gpus": [0], "watts_per_gpu": 3}, "is not a name"),
    ({"op": "intent", "executor": "x", "gpus": [0], "watts_per_gpu": 3, "deadline_s": 0},
     "'deadline_s' = 0"),
    ({"op": "cap", "job_id": "1", "watts": 3, "deadline_s": 5}, "belongs to intent"),
])
def test_bad_intent_requests_are_refused_with_the_field(data: dict[str, object],
                                                        message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        request_from(data)


class Gpus:
    """Four whole GPUs whose limits only the test (the "executor") changes."""

    def __init__(self) -> None:
        self.limit = dict.fromkeys(range(4), 700_000)
        self.sets: list[tuple[int, int]] = []

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(i, i, f"0:{i}", f"GPU-{i}", "fake") for i in range(4)]

    def limits(self, index: int) -> PowerLimits:
        return PowerLimits(100_000, 700_000, 700_000, self.limit[index], self.limit[index])

    def sample(self, index: int) -> Sample:
        return Sample(1, 50_000, 1_000, 30_000, 0, 0, self.limit[index])

    def set_power_limit(self, index: int, mw: int) -> None:
        self.sets.append((index, mw))
        self.limit[index] = mw

    def persistence_mode(self, index: int) -> bool | None:
        return True

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        raise AssertionError("validate-only tests never change persistence mode")

    def close(self) -> None:
        pass


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = ManualClock()
        self.gpus = Gpus()
        self.ledger = Ledger.open(root / "l.db", node="n1", clock=self.clock)
        self.writer = LedgerWriter(self.ledger)
        self.writer.start()
        policy = Policy.from_text(POLICY)
        self.pipeline = Pipeline(
            node="n1", actuator=Actuator(self.gpus, clock=self.clock), writer=self.writer,
            policy=lambda: policy, state=NodeState(governed=dict.fromkeys(range(4), 700_000)),
            intents=IntentStore(root), authority=Authority, context_source=None)
        self.gate = self.new_gate()

    def new_gate(self, compact_after: int = 1000) -> ExecutorGate:
        gate = ExecutorGate(self.pipeline, ExecutorSettings(validate_gpus=(0, 1, 2),
                                                            deadline_s=10),
                            PendingIntents(self.root), clock=self.clock,
                            compact_after=compact_after)
        self.pipeline.executors = gate
        return gate

    def intent(self, gpus: list[int], watts: float, job: str | None = None) -> dict[str, object]:
        data: dict[str, object] = {"op": "intent", "gpus": gpus, "watts_per_gpu": watts,
                                   "executor": "t"}
        if job is not None:
            data["job_id"] = job
        return self.gate.announce(request_from(data), ROOT, Origin())

    def tick(self) -> None:
        """What the monitor does each period for the validate-only GPUs."""
        for g in (0, 1, 2):
            self.gate.watch(g, self.gpus.sample(g), lambda _l, _s: ("out-of-band", False))
        self.gate.settle()

    def verdicts(self) -> list[tuple[str, list[int]]]:
        self.writer.stop()
        out = [(str(r.body["verdict"]), [int(g["index"]) for g in r.body["gpus"]])
               for r in self.ledger.records(kinds=["executor"])]
        self.writer = LedgerWriter(self.ledger)
        self.writer.start()
        self.pipeline.writer = self.writer
        return out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.writer.stop()
    w.ledger.close()


def test_one_per_when_every_gpu_has_landed_and_never_a_set(world: World) -> None:
    reply = world.intent([0, 1], 400)
    assert reply["ok"] and reply["verdict"] == "approve"
    world.gpus.limit[0] = 400_000
    world.tick()
    assert world.verdicts() == []  # GPU 1 has not landed yet
    world.gpus.limit[1] = 400_000
    world.tick()
    assert world.verdicts() == [("validated", [0, 1])]
    assert world.gpus.sets == []  # the gate never sets a limit
    assert world.pipeline.state.governed[0] == world.pipeline.state.governed[1] == 400_000


def test_partly_landed_at_the_deadline_is_expired_naming_each_gpu(world: World) -> None:
    world.intent([0, 1], 400)
    world.gpus.limit[0] = 400_000
    world.tick()
    world.clock.advance(11)
    world.tick()
    (verdict,) = world.verdicts()
    assert verdict == ("intent-expired", [0, 1])
    (record,) = list(world.ledger.records(kinds=["executor"]))
    landed = {g["index"]: g["landed"] for g in record.body["gpus"]}
    assert landed == {0: True, 1: False} and record.body["paths"]["telemetry"] == "partial"


def test_a_denied_value_already_in_force_is_not_a_violation(world: World) -> None:
    world.gpus.limit[2] = 150_000  # below the policy minimum, set long before
    world.pipeline.state.governed[2] = 150_000
    reply = world.intent([2], 150)  # asks for what is already there: denied (min 200 W)
    assert reply["verdict"] == "deny"
    world.tick()
    world.clock.advance(11)
    world.tick()
    assert world.verdicts() == []  # nothing moved: only the reject PER records it


def test_intents_for_other_gpus_or_jobs_are_refused(world: World) -> None:
    with pytest.raises(Refusal, match="not validate-only"):
        world.intent([3], 400)
    with pytest.raises(Refusal, match="does not exist"):
        world.intent([9], 400)
    with pytest.raises(Refusal) as err:
        world.gate.announce(request_from({"op": "intent", "gpus": [0], "watts_per_gpu": 400,
                                          "executor": "t"}), Peer(5000, 5000, 9), Origin())
    assert err.value.code == "forbidden"


def test_a_restart_resumes_pending_and_drops_recorded_outcomes(world: World) -> None:
    first_id = world.intent([0], 400)["intent"]["id"]  # type: ignore[index]
    world.intent([1], 450)
    first = world.gate.pending[str(first_id)]
    world.gpus.limit[0] = 400_000
    world.tick()
    assert world.verdicts() == [("validated", [0])]
    # a crash after the PER but before its `done` line: the file still lists it
    book = PendingIntents(world.root)
    assert str(first_id) not in book.load()
    book.add(first)
    book.close()
    world.gate.book.close()
    gate = world.new_gate()
    assert gate.resume(world.ledger) == 1  # only GPU 1's intent is still pending
    world.gpus.limit[1] = 450_000
    world.tick()
    assert world.verdicts() == [("validated", [0]), ("validated", [1])]


def test_a_torn_last_line_of_the_pending_file_is_ignored(world: World) -> None:
    world.intent([0], 400)
    with (world.root / "executor-intents.jsonl").open("ab") as fh:
        fh.write(b'{"op": "add", "intent": {"id": "torn')
    assert len(PendingIntents(world.root).load()) == 1


def test_the_pending_file_is_rewritten_once_nothing_is_pending(world: World) -> None:
    world.gate.book.close()
    world.gate = world.new_gate(compact_after=4)
    path = world.root / "executor-intents.jsonl"
    for watts in (300, 350, 400):
        world.intent([0], watts)
        world.gpus.limit[0] = watts * 1000
        world.tick()
    world.verdicts()  # every outcome durable, so every `done` is written
    world.tick()
    assert path.read_bytes() == b""  # idle: compacted to nothing
    world.intent([1], 450)
    assert len(PendingIntents(world.root).load()) == 1


def test_an_intent_for_a_gpu_the_named_job_does_not_hold_is_denied(world: World) -> None:
    prolog = request_from({"op": "prolog", "job_id": "7", "uid": 1000, "user": "alice",
                           "gpus": [0], "watts": 400})
    assert world.pipeline.prolog(prolog, ROOT, Origin())["ok"]
    assert world.gpus.sets == []  # validate-only: the prolog only expects
    with pytest.raises(Refusal, match=r"job 7 does not hold GPU\(s\) \[1\]"):
        world.intent([1], 400, job="7")
    with pytest.raises(Refusal, match="GPU 0 is held by job 7"):
        world.intent([0], 400, job="8")


def test_a_prolog_and_epilog_expect_the_executor_on_its_gpus_and_set_the_rest(
        world: World) -> None:
    prolog = request_from({"op": "prolog", "job_id": "7", "uid": 1000, "user": "alice",
                           "gpus": [0, 3], "watts": 800})
    reply = world.pipeline.prolog(prolog, ROOT, Origin())
    (intent,) = world.gate.pending.values()
    assert (intent.source, intent.job_id, intent.targets) == ("prolog", "7", {0: 400_000})
    assert intent.decision == reply["decision"]
    assert reply["gpus"] == [
        {"index": 0, "expected_mw": 400_000, "enforced_mw": 700_000, "executor": "external",
         "intent": intent.id},
        {"index": 3, "intended_mw": 400_000, "readback_mw": 400_000, "ok": True}]
    assert world.gpus.sets == [(3, 400_000)]  # GPU 0 is the executor's
    (cap,) = [r.body for r in world.ledger.records(kinds=["cap"])]
    expected = dict(cap["gpus"][0])
    assert expected.pop("before")["enforced_mw"] == 700_000
    assert expected == {"index": 0, "uuid": "GPU-0", "expected_mw": 400_000,
                        "enforced_mw": 700_000, "previous_mw": 700_000,
                        "executor": "external", "intent": intent.id}
    assert cap["expectation"]["gpus"] == [0] and cap["paths"]["telemetry"] == "ok"
    world.gpus.limit[0] = 400_000
    world.tick()
    assert world.verdicts() == [("validated", [0])]
    epilog = world.pipeline.epilog(request_from({"op": "epilog", "job_id": "7"}), ROOT,
                                   Origin())
    (back,) = world.gate.pending.values()
    assert (back.source, back.job_id, back.targets, back.decision) == (
        "epilog", "7", {0: 700_000}, {})
    assert epilog["gpus"][0] == {"index": 0, "expected_mw": 700_000, "enforced_mw": 400_000,
                                 "executor": "external", "intent": back.id}
    assert world.gpus.sets == [(3, 400_000), (3, 700_000)]
    world.gpus.limit[0] = 700_000
    world.tick()
    assert world.verdicts() == [("validated", [0]), ("validated", [0])]
    changes = list(world.ledger.records(kinds=["cap", "restore"]))
    verdicts = [r.body for r in world.ledger.records(kinds=["executor"])]
    assert [v["ref"] for v in verdicts] == [{"seq": r.seq, "hash": r.hash} for r in changes]


def test_only_gpus_left_to_the_executor_make_an_expectation(world: World) -> None:
    world.pipeline.prolog(request_from({"op": "prolog", "job_id": "7", "gpus": [3],
                                        "watts": 400}), ROOT, Origin())
    (cap,) = [r.body for r in world.ledger.records(kinds=["cap"])]
    assert "expectation" not in cap and world.gate.pending == {}
    reply = world.pipeline.epilog(request_from({"op": "epilog", "job_id": "9", "gpus": [1]}),
                                  ROOT, Origin())
    assert reply["gpus"] == [{"index": 1, "governed_mw": 700_000, "enforced_mw": 700_000}]
    assert world.gate.pending == {}  # a job sparkd never capped: checked, not expected
    assert world.pipeline.cap(request_from({"op": "cap", "job_id": "7", "watts": 300}), ROOT,
                              Origin())["ok"]  # GPU 3 is sparkd's to set
    world.pipeline.prolog(request_from({"op": "prolog", "job_id": "8", "gpus": [1, 2],
                                        "watts": 800}), ROOT, Origin())
    with pytest.raises(Refusal) as err:
        world.pipeline.cap(request_from({"op": "cap", "job_id": "8", "watts": 300}), ROOT,
                           Origin())
    assert (err.value.code, err.value.reason) == (
        "denied", "GPU(s) [1, 2] of job 8 are validate-only on node n1: an external executor "
        "sets their limits (it announces each change with `sparkctl intent`)")


def test_a_prolog_that_cannot_be_recorded_never_sets_the_executors_gpu(world: World) -> None:
    failing = Failing(world.ledger)
    failing.refuse.add("cap")
    failing.start()
    world.writer.stop()
    world.pipeline.writer = world.writer = failing
    prolog = request_from({"op": "prolog", "job_id": "7", "gpus": [0, 3], "watts": 800})
    with pytest.raises(OSError, match="No space left"):
        world.pipeline.prolog(prolog, ROOT, Origin())
    assert world.gpus.sets == [(3, 400_000), (3, 700_000)]  # GPU 3 put back, 0 never set
    assert world.pipeline.state.governed == dict.fromkeys(range(4), 700_000)
    assert world.pipeline.state.jobs == {}
