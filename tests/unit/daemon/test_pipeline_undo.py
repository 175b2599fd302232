"""A change whose PER cannot be committed (a full disk): every GPU and the node's
state go back to what they were, since a limit moved without its PER would be
unprovable; an epilog keeps its job so that it can be retried."""

from __future__ import annotations

import logging

import pytest

from spark_slurm.daemon.state import IntentStore, Throttle
from tests.unit.daemon.test_pipeline_record import OWNER, Node


def test_a_prolog_that_cannot_be_recorded_puts_everything_back(node: Node) -> None:
    node.state.governed.update({1: 700_000, 2: 700_000})  # start-up's baseline
    node.prolog("5", [0], 500)
    node.writer.refuse.add("cap")
    with pytest.raises(OSError, match="No space left"):
        node.prolog("7", [1, 2], 600)
    assert node.limits() == [500_000, 700_000, 700_000, 700_000]
    assert node.state.governed == {0: 500_000, 1: 700_000, 2: 700_000}
    assert list(node.state.jobs) == ["5"]
    assert list(IntentStore(node.intents.path.parent).load()) == ["5"]


def test_a_failed_prolog_whose_intent_cannot_be_closed_reports_the_first_failure(
        node: Node) -> None:
    node.writer.refuse.add("cap")

    def broken(job_id: str) -> None:
        raise OSError(5, "Input/output error")

    node.intents.end = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"):
        node.prolog("7", [0], 400)  # start-up drops the intent: no restore PER, no cap
    assert node.state.jobs == {}


def test_a_gpu_not_governed_yet_goes_back_to_its_limit_when_the_prolog_fails(
        node: Node) -> None:
    node.gpus.cards[1].requested = 650_000  # what start-up could not read, say
    node.writer.refuse.add("cap")
    with pytest.raises(OSError, match="No space left"):
        node.prolog("7", [0, 1], 800)
    assert node.limits()[:2] == [700_000, 650_000]  # no limit moved without its PER
    assert node.state.governed == {} and node.state.jobs == {}


def test_a_cap_that_cannot_be_recorded_puts_the_limits_and_grant_back(node: Node) -> None:
    node.prolog("7", [0, 1], 1000)
    node.writer.refuse.add("cap")
    with pytest.raises(OSError, match="No space left"):
        node.cap("7", watts_per_gpu=300)
    assert node.limits()[:2] == [500_000, 500_000]
    assert node.state.governed == {0: 500_000, 1: 500_000}
    assert node.state.jobs["7"].granted_mw == 500_000
    node.writer.refuse.clear()
    node.cap("7", OWNER, watts_per_gpu=400)  # still judged against the old grant
    assert node.limits()[:2] == [400_000, 400_000]


def test_an_epilog_that_cannot_be_recorded_keeps_the_job_for_a_retry(node: Node) -> None:
    node.prolog("7", [0], 400)
    node.writer.refuse.add("restore")
    with pytest.raises(OSError, match="No space left"):
        node.epilog("7")
    assert "7" in node.state.jobs and node.state.ending == set()
    assert list(IntentStore(node.intents.path.parent).load()) == ["7"]
    node.writer.refuse.clear()
    node.epilog("7")
    assert len(node.bodies("restore")) == 1 and node.state.jobs == {}


def test_a_failed_prolog_puts_back_the_governed_limit_not_what_it_found(node: Node) -> None:
    node.state.governed[0] = 700_000
    node.gpus.cards[0].requested = 650_000  # moved out of band, not yet seen by the monitor
    node.writer.refuse.add("cap")
    with pytest.raises(OSError, match="No space left"):
        node.prolog("7", [0], 400)
    assert node.limits()[0] == 700_000 and node.state.governed == {0: 700_000}


def test_a_failed_prolog_puts_a_throttled_gpu_back_under_its_throttle(node: Node) -> None:
    node.state.governed[1] = 600_000
    node.state.throttled[1] = Throttle(base_mw=600_000, to_mw=300_000, ref=None)
    node.gpus.cards[1].requested = 300_000
    node.writer.refuse.add("cap")
    with pytest.raises(OSError, match="No space left"):
        node.prolog("7", [1], 500)
    assert node.limits()[1] == 300_000 and node.state.throttled[1].base_mw == 600_000


def test_a_rollback_the_gpu_refuses_is_logged_and_the_first_failure_raised(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.gpus.cards[3].fail.add("refuse")  # not governed yet, and it refuses every set
    node.writer.refuse.add("cap")
    with caplog.at_level(logging.ERROR, logger="sparkd.pipeline"), \
            pytest.raises(OSError, match="No space left"):
        node.prolog("7", [2, 3], 800)
    assert caplog.messages == ["GPU 3: could not roll back to 700000 mW: GpuNoPermission: "
                               "GPU 3: not allowed"]  # GPU 2 went back without a word
    assert node.state.governed == {} and node.limits()[2] == 700_000
