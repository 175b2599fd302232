"""The Actuator on its own: what a PER's per-GPU entry says after each kind of
set and read-back, the hardware range and MIG targets a decision is made with,
persistence checks, and which reading counts as "before"."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.actuation import (
    Actuator,
    Energy,
    energy_between,
    error_text,
    judge_readback,
)
from spark_slurm.errors import GpuLost, GpuNoPermission
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample


@dataclass
class Card:
    """One backend device; `requested`/`enforced` differ under another limiter."""

    info: DeviceInfo
    requested: int = 700_000
    enforced: int | None = None  # None: the requested limit is what is enforced
    low: int = 100_000
    high: int = 700_000
    persistence: bool | None = True
    energy: int = 9_000
    epoch: int = 2
    fail: set[str] = field(default_factory=set)  # calls that raise GpuLost
    samples_left: int | None = None  # readings it gives before it is lost


class Gpus:
    """A backend over a list of cards, counting and failing calls per card."""

    def __init__(self, cards: list[Card]) -> None:
        self.cards = cards
        self.calls: list[tuple[str, int]] = []

    def _card(self, call: str, index: int) -> Card:
        self.calls.append((call, index))
        card = self.cards[index]
        if call in card.fail:
            raise GpuLost(f"{call} failed", index)
        return card

    def devices(self) -> list[DeviceInfo]:
        return [c.info for c in self.cards]

    def limits(self, index: int) -> PowerLimits:
        c = self._card("limits", index)
        enforced = c.requested if c.enforced is None else c.enforced
        return PowerLimits(c.low, c.high, 700_000, c.requested, enforced)

    def sample(self, index: int) -> Sample:
        c = self._card("sample", index)
        if c.samples_left is not None:
            if c.samples_left == 0:
                raise GpuLost("sample failed", index)
            c.samples_left -= 1
        return Sample(11, 250_000, c.energy, 41_000, 77, 4, 700_000, energy_epoch=c.epoch)

    def set_power_limit(self, index: int, mw: int) -> None:
        c = self._card("set", index)
        if "refuse" in c.fail:
            raise GpuNoPermission("not allowed", index)
        c.requested = mw

    def persistence_mode(self, index: int) -> bool | None:
        return self._card("persistence", index).persistence

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        self._card("set_persistence", index).persistence = enabled

    def close(self) -> None:
        pass


def whole(index: int, minor: int | None = None) -> Card:
    m = index if minor is None else minor
    return Card(DeviceInfo(index, m, f"0:{m}", f"GPU-{index}", "fake"))


def mig_node() -> Gpus:
    """Backend 0 is a MIG parent with slices 1 and 2; 3 is a whole GPU (Slurm 0, 3, 4, 5)."""
    return Gpus([whole(0),
                 Card(DeviceInfo(1, 0, "0:0", "MIG-1", "fake", mig_parent="GPU-0")),
                 Card(DeviceInfo(2, 0, "0:0", "MIG-2", "fake", mig_parent="GPU-0")),
                 whole(3)])


# -- judge_readback and error_text -------------------------------------------------

def _limits(requested: int, enforced: int) -> PowerLimits:
    return PowerLimits(100_000, 700_000, 700_000, requested, enforced)


@pytest.mark.parametrize(("requested", "enforced", "verdict"), [
    (400_000, 400_000, "exact"),
    (400_000, 399_000, "rounded"),  # exactly the tolerance below
    (400_000, 401_000, "rounded"),  # and above
    (400_000, 398_999, "lower-limiter"),  # 1 mW past it below, our request held
    (400_000, 401_001, "mismatch"),  # over the intended limit: never another limiter
    (401_000, 300_000, "lower-limiter"),  # requested held up to the tolerance
    (399_000, 300_000, "lower-limiter"),
    (401_001, 300_000, "mismatch"),  # the requested limit is not ours either
    (398_999, 300_000, "mismatch"),
])
def test_read_back_is_judged_with_the_driver_tolerance_inclusive(
        requested: int, enforced: int, verdict: str) -> None:
    assert judge_readback(400_000, _limits(requested, enforced)) == verdict


def test_a_site_tolerance_replaces_the_default() -> None:
    assert judge_readback(400_000, _limits(400_000, 395_000), 5_000) == "rounded"
    assert judge_readback(400_000, _limits(400_000, 395_000), 4_999) == "lower-limiter"
    assert judge_readback(400_000, _limits(406_000, 300_000), 5_000) == "mismatch"


def test_a_counter_that_did_not_move_used_nothing_and_was_not_reset() -> None:
    end = Sample(1, 1, 5_000, 1, 0, 0, 1, energy_epoch=3)
    assert energy_between(5_000, 3, end) == Energy(0, False)
    assert energy_between(5_000, 2, end) == Energy(5_000, True)  # a reload in between


def test_an_error_is_named_by_its_type_and_message() -> None:
    assert error_text(GpuLost("gone", 3)) == "GpuLost: GPU 3: gone"


# -- apply: the per-GPU entry ------------------------------------------------------

def test_an_exact_set_records_intended_and_read_back_and_is_ok() -> None:
    act = Actuator(Gpus([whole(0)]))
    assert act.apply(0, 400_000) == {"index": 0, "uuid": "GPU-0", "intended_mw": 400_000,
                                     "readback_mw": 400_000, "ok": True}


def test_a_lower_limiter_entry_says_why_and_what_nvml_holds() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].enforced = 300_000
    assert Actuator(gpus).apply(0, 400_000) == {
        "index": 0, "uuid": "GPU-0", "intended_mw": 400_000, "readback_mw": 300_000,
        "readback": "lower-limiter", "requested_readback_mw": 400_000, "ok": True}


def test_a_mismatch_is_not_ok_and_names_both_limits() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].enforced = 650_000
    entry = Actuator(gpus).apply(0, 400_000)
    assert (entry["ok"], entry["readback"], entry["readback_mw"],
            entry["requested_readback_mw"]) == (False, "mismatch", 650_000, 400_000)


def test_the_read_back_tolerance_of_the_site_is_used() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].enforced = 405_000  # over the intended limit: a mismatch by default
    assert Actuator(gpus).apply(0, 400_000)["ok"] is False
    act = Actuator(gpus, readback_tolerance_mw=5_000)
    entry = act.apply(0, 400_000)
    assert (entry["readback"], entry["ok"]) == ("rounded", True)
    assert act.agrees(400_000, 405_000) and not act.agrees(400_000, 405_001)
    assert Actuator(gpus).agrees(400_000, 401_000)
    assert not Actuator(gpus).agrees(400_000, 398_999)


def test_a_refused_set_is_an_error_and_the_limit_still_read_back() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].fail.add("refuse")
    entry = Actuator(gpus).apply(0, 400_000)
    assert entry == {"index": 0, "uuid": "GPU-0", "intended_mw": 400_000,
                     "error": "GpuNoPermission: GPU 0: not allowed", "readback_mw": 700_000,
                     "readback": "mismatch", "requested_readback_mw": 700_000, "ok": False}


def test_a_refused_set_is_not_ok_even_when_the_gpu_already_holds_the_limit() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].requested = 400_000
    gpus.cards[0].fail.add("refuse")
    entry = Actuator(gpus).apply(0, 400_000)
    assert (entry["readback_mw"], entry["ok"]) == (400_000, False) and "readback" not in entry


def test_a_failed_read_back_is_an_error_and_not_ok() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].fail.add("limits")
    entry = Actuator(gpus).apply(0, 400_000)
    assert entry == {"index": 0, "uuid": "GPU-0", "intended_mw": 400_000,
                     "error": "GpuLost: GPU 0: limits failed", "ok": False}
    assert gpus.cards[0].requested == 400_000  # the set itself went through


def test_when_set_and_read_back_both_fail_the_set_error_is_kept() -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].fail.update({"set", "limits"})
    entry = Actuator(gpus).apply(0, 400_000)
    assert entry["error"] == "GpuLost: GPU 0: set failed" and entry["ok"] is False


def test_calls_go_to_the_backend_index_of_the_slurm_gpu() -> None:
    gpus = Gpus([whole(0), whole(1)])
    act = Actuator(gpus, slurm_map={0: 1, 1: 0, 7: 9})  # 9: no such backend device
    assert sorted(act.devices) == [0, 1] and not act.known(7)
    assert act.index(0) == 1
    entry = act.apply(0, 400_000)
    assert entry["uuid"] == "GPU-1" and gpus.cards[1].requested == 400_000
    assert gpus.cards[0].requested == 700_000
    with pytest.raises(KeyError):
        act.index(7)


def test_without_a_map_gpus_are_numbered_by_minor() -> None:
    act = Actuator(Gpus([whole(0, minor=2), whole(1, minor=0)]))
    assert act.index(2) == 0 and act.index(0) == 1


# -- before: path 1 ------------------------------------------------------------------

def test_before_records_the_reading_and_limits_and_returns_the_enforced_one() -> None:
    gpus = Gpus([whole(0), whole(1)])
    gpus.cards[1].enforced = 450_000
    gpus.cards[1].energy = 9_001
    act = Actuator(gpus)
    reading, enforced, err = act.before(1)
    assert reading == {"time_ns": 11, "power_mw": 250_000, "energy_mj": 9_001,
                       "energy_epoch": 2, "temp_mc": 41_000, "util_pct": 77,
                       "limit_mw": 700_000, "enforced_mw": 450_000, "reasons": 4,
                       "min_mw": 100_000, "max_mw": 700_000, "default_mw": 700_000}
    assert (enforced, err) == (450_000, None)
    act.check_persistence()
    assert act.before(1)[0]["persistence"] is True  # once checked, recorded


@pytest.mark.parametrize("call", ["limits", "sample"])
def test_a_failed_before_reading_is_empty_with_the_error(call: str) -> None:
    gpus = Gpus([whole(0)])
    gpus.cards[0].fail.add(call)
    assert Actuator(gpus).before(0) == ({}, None, f"GpuLost: GPU 0: {call} failed")


class Latest:
    def __init__(self, reading: object) -> None:
        self.reading = reading
        self.asked: list[int] = []

    def latest(self, index: int) -> object:
        self.asked.append(index)
        return self.reading


def test_a_sampler_reading_exactly_the_maximum_age_old_is_still_used() -> None:
    clock = ManualClock()
    cached = Sample(clock.now_ns(), 99_000, 5_000, 40_000, 90, 0, 700_000)
    sampler = Latest(cached)
    act = Actuator(Gpus([whole(0), whole(1)]), sampler, clock=clock, slurm_map={0: 1})
    clock.advance(0.25)  # the default maximum age
    assert act.sample(0) is cached and sampler.asked == [1]
    clock.advance(1e-9)
    assert act.sample(0) is not cached


def test_a_sampler_without_a_reading_leaves_it_to_the_gpu() -> None:
    gpus = Gpus([whole(0)])
    act = Actuator(gpus, Latest(None), clock=ManualClock())
    assert act.sample(0).power_mw == 250_000 and ("sample", 0) in gpus.calls


# -- hw_range and mig_targets --------------------------------------------------------

def test_the_hardware_range_is_the_tightest_and_read_once_per_gpu() -> None:
    gpus = Gpus([whole(0), whole(1), whole(2)])
    gpus.cards[0].low, gpus.cards[0].high = 150_000, 650_000
    gpus.cards[1].low, gpus.cards[1].high = 120_000, 600_000
    gpus.cards[2].fail.add("limits")  # unreadable: left out, asked again next time
    act = Actuator(gpus)
    assert act.hw_range([2, 0, 1]) == (150_000, 600_000)
    assert act.hw_range([1]) == (120_000, 600_000)
    assert act.hw_range([0, 1, 2]) == (150_000, 600_000)
    assert gpus.calls.count(("limits", 0)) == 1 and gpus.calls.count(("limits", 1)) == 1
    assert gpus.calls.count(("limits", 2)) == 2
    assert act.hw_range([2]) == (0, 0)  # nothing known


def test_mig_targets_name_each_limit_bearing_gpu_once() -> None:
    act = Actuator(mig_node())
    assert sorted(act.devices) == [0, 3, 4, 5]
    assert act.mig_targets([3, 3, 4, 5]) == ([3, 0], None)
    assert act.mig_targets([5, 4]) == ([0], None)
    targets, why = act.mig_targets([3, 4])
    assert targets == []
    assert why == ("GPU 4 is a MIG slice of GPU-0, whose power limit is shared with slices "
                   "[5] outside this job; a MIG power request never changes a shared "
                   "parent GPU")


def test_a_slice_whose_parent_is_not_visible_is_refused() -> None:
    gpus = mig_node()
    act = Actuator(gpus, slurm_map={4: 1, 5: 2, 3: 3})  # the parent is not in the map
    assert act.mig_targets([4, 5]) == ([], "GPU 4 is a MIG slice whose parent GPU-0 is not "
                                       "visible to the daemon")


# -- persistence ---------------------------------------------------------------------

def test_persistence_is_read_once_per_physical_gpu_and_shared_by_its_slices(
        caplog: pytest.LogCaptureFixture) -> None:
    gpus = mig_node()
    gpus.cards[0].persistence = False
    gpus.cards[3].fail.add("persistence")
    act = Actuator(gpus)
    with caplog.at_level(logging.WARNING, logger="sparkd.actuation"):
        assert act.check_persistence() == {0: False, 3: None, 4: False, 5: False}
    assert [c for c in gpus.calls if c[0] == "persistence"] == [("persistence", 0),
                                                               ("persistence", 3)]
    assert "GPU 3: persistence mode: GPU 3: persistence failed" in caplog.messages
    assert gpus.cards[0].persistence is False  # only read


def test_persistence_is_turned_on_when_asked_and_read_again() -> None:
    gpus = Gpus([whole(0), whole(1)])
    gpus.cards[1].persistence = False
    act = Actuator(gpus)
    assert act.check_persistence(enable=True) == {0: True, 1: True}
    assert [c for c in gpus.calls if c[0] == "set_persistence"] == [("set_persistence", 1)]
    assert gpus.calls.count(("persistence", 1)) == 2


# -- each -----------------------------------------------------------------------------

def test_a_jobs_gpus_are_called_at_once_and_answered_in_order() -> None:
    act = Actuator(Gpus([whole(i) for i in range(3)]))
    together = threading.Barrier(2, timeout=30)  # broken unless both calls run at once

    def call(minor: int) -> int:
        together.wait()
        return minor * 10

    assert act.each([2, 0], call) == [20, 0]


def test_one_call_at_a_time_when_the_backend_is_serial() -> None:
    act = Actuator(Gpus([whole(i) for i in range(3)]), parallel=0)  # at least one
    threads: list[str] = []

    def call(minor: int) -> int:
        threads.append(threading.current_thread().name)
        return minor

    assert act.each([1, 0], call) == [1, 0]
    assert threads == [threading.current_thread().name] * 2
