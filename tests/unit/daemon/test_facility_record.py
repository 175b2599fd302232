"""The facility PER of a follow-up: its fields, its windows, and each way it is unavailable.

The rack stream is a real `CycleRing` (what the Karman subscriber keeps) filled
with a power trace, one cycle every 100 ms; GPU telemetry keeps the sampler's
readings, `t0 <= time <= t1`. Most changes here are stamped in the past, so the
follow-up is due at once and the windows are pure arithmetic on `changed_ns`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.daemon.facility import FacilityFollower
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.gpu.backend import Sample
from spark_slurm.karman.ring import CycleRing, FacilityWindow
from spark_slurm.ledger import Ledger, Receipt
from spark_slurm.policy.model import FacilitySettings

S = 1_000_000_000
# An odd nanosecond, as a real change's stamp is: the settling boundary T + 3 s
# is then not a round float, and a frame stamped on it must still count.
T = 1_700_000_000_000_000_129
# No policy default (10 s, 10 s, 500 W, 25 %), so a setting read wrongly shows.
SETTINGS = FacilitySettings(before_s=8.0, after_s=6.0, tolerance_w=300, tolerance_pct=20)
REF = Receipt(7, "ab" * 32)
Trace = Callable[[int], "int | None"]  # power in mW at an instant; None: no reading


def step(before: int, settling: int, after: int, older: int | None = None) -> Trace:
    """`older` until 8 s before T, `before` until T, `settling` for 3 s, then `after`."""
    def mw(t: int) -> int | None:
        if t < T - 8 * S:
            return before if older is None else older
        if t <= T:
            return before
        return settling if t < T + 3 * S else after
    return mw


def cycle_times(first_s: float = -20.0, last_s: float = 10.0, every_ns: int = S // 10,
                skip: tuple[int, ...] = ()) -> list[int]:
    return [t for t in range(T + int(first_s * S), T + int(last_s * S) + 1, every_ns)
            if t not in skip]


class Meter:
    """Karman as sparkd holds it: the rack total of each cycle in a real CycleRing.

    `live`: cycles stamped after the wall clock have not arrived yet.
    """

    def __init__(self, trace: Trace, times: list[int], live: bool = False) -> None:
        self.ring = CycleRing(max(2, len(times)))
        self.live = live
        for t in times:
            mw = trace(t)
            if mw is not None:
                self.ring.append(t, b"", (mw, (("threephase/karman1", "a"),), (mw / 1000,)))

    def window(self, t0_ns: int, t1_ns: int) -> FacilityWindow:
        return self.ring.window(t0_ns, min(t1_ns, time.time_ns()) if self.live else t1_ns)

    def stats(self) -> dict[str, int]:
        return {"frames": len(self.ring)}


class Telemetry:
    """Each GPU index's readings along its trace, filtered as the sampler filters them."""

    def __init__(self, traces: dict[int, Trace], times: list[int], live: bool = False) -> None:
        self.traces, self.times, self.live = traces, times, live

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(self.traces)

    def window(self, index: int, t0_ns: int, t1_ns: int) -> list[Sample]:
        now = time.time_ns() if self.live else t1_ns
        out = []
        for t in self.times:
            mw = self.traces[index](t)
            if t0_ns <= t <= min(t1_ns, now) and mw is not None:
                out.append(Sample(time_ns=t, power_mw=mw, energy_mj=0, temp_mc=40_000,
                                  util_pct=90, reasons=0, enforced_mw=mw))
        return out


@dataclass
class Settings:
    facility: FacilitySettings


@dataclass
class Pol:
    settings: Settings
    sha256: str = "x"
    text: str = ""

    def evaluate(self, request: Any) -> Any:
        raise AssertionError("not used")


# The job's GPUs are minors 4 and 5, telemetry indices 0 and 1; index 2 is another job's.
INDEX_OF = {4: 0, 5: 1, 6: 2}


def job_gpu(older: int | None = None) -> Trace:
    """1 kW -> 400 W, a dip to 100 W while settling, then 370 W rising 2 W a reading.

    Over the after window [T + 3 s, T + 6 s] the mean is 400 W only if the
    reading stamped on T + 3 s itself is counted.
    """
    base = step(1_000_000, 100_000, 400_000, older)

    def mw(t: int) -> int | None:
        settled = base(t)
        if settled is None or t < T + 3 * S:
            return settled
        return settled - 30_000 + (t - T - 3 * S) // (S // 10) * 2_000
    return mw


def job_gpus(older: int | None = None) -> dict[int, Trace]:
    """The job's GPUs 0 and 1 as `job_gpu`; GPU 2 (another job's) steady at 300 W."""
    return {0: job_gpu(older), 1: job_gpu(older), 2: step(300_000, 300_000, 300_000)}


def follow(tmp_path: Path, stream: Meter | None, telemetry: Telemetry,
           settings: FacilitySettings = SETTINGS, changed_ns: int = T,
           reload: FacilitySettings | None = None, **kw: Any) -> dict[str, Any]:
    """The one facility PER of a `cap` at changed_ns; `reload`: the policy once scheduled."""
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = LedgerWriter(ledger)
    writer.start()
    policy = Pol(Settings(settings))
    follower = FacilityFollower(node="n1", writer=writer, policy=lambda: policy,
                                stream=stream, telemetry=telemetry, index_of=INDEX_OF.__getitem__,
                                **kw)
    follower.start()
    follower.schedule("cap", REF, [4, 5], changed_ns, "42")
    if reload is not None:
        policy = Pol(Settings(reload))
    deadline = time.monotonic() + 10
    while follower.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    follower.stop()
    writer.stop()
    bodies = [r.body for r in ledger.records(kinds=["facility"])]
    ledger.close()
    assert len(bodies) == 1, bodies
    return bodies[0]


def window(mean: int, samples: int, lo: int | None = None, hi: int | None = None,
           gaps: int = 0) -> dict[str, int]:
    return {"mean_mw": mean, "min_mw": mean if lo is None else lo,
            "max_mw": mean if hi is None else hi, "samples": samples, "gaps": gaps}


HEAD = {"v": 1, "node": "n1", "source": "automation", "ref": {"seq": 7, "hash": "ab" * 32},
        "ref_kind": "cap", "gpus": [4, 5], "changed_ns": T, "job_id": "42"}
WINDOW_NS = {"before": 8 * S, "after": 6 * S, "settle": 3 * S}


def test_the_record_links_the_action_and_shows_the_windows_it_compared(
        tmp_path: Path) -> None:
    # The rack was at 9 kW until 8 s before the change (older than the before
    # window), dips to 3 kW while settling, and holds 4.8 kW from T + 3 s. One
    # cycle (T - 4 s) is missing. Only [T - 8 s, T] and [T + 3 s, T + 6 s] count.
    rack = Meter(step(6_000_000, 3_000_000, 4_800_000, older=9_000_000),
                 cycle_times(skip=(T - 4 * S,)))
    body = follow(tmp_path, rack, Telemetry(job_gpus(older=1_500_000), cycle_times()))
    assert body == {
        **HEAD, "verdict": "correlated",
        "window": {"before": window(6_000_000, 80, gaps=1), "after": window(4_800_000, 31)},
        "window_ns": WINDOW_NS,
        "delta_mw": -1_200_000, "expected_delta_mw": -1_200_000,
        # 20 % of 1.2 kW is 240 W: the 300 W floor applies.
        "tolerance_mw": 300_000}


def test_the_tolerance_floor_in_watts_applies_to_a_small_change(tmp_path: Path) -> None:
    # The GPUs do not move; the rack drifts by 300 W (correlated) or 300.001 W.
    steady = {i: step(500_000, 500_000, 500_000) for i in (0, 1)}
    for drift, verdict in ((300_000, "correlated"), (300_001, "flagged")):
        (tmp_path / verdict).mkdir()
        rack = Meter(step(6_000_000, 6_000_000, 6_000_000 + drift), cycle_times())
        body = follow(tmp_path / verdict, rack, Telemetry(steady, cycle_times()))
        assert (body["verdict"], body["expected_delta_mw"], body["delta_mw"],
                body["tolerance_mw"]) == (verdict, 0, drift, 300_000)


def test_every_other_gpu_is_counted_after_one_without_telemetry(tmp_path: Path) -> None:
    # GPU 2 has no readings (its driver crashed); GPU 3, another job's, rose by 500 W.
    gpus = {**job_gpus(), 2: lambda t: None, 3: step(200_000, 700_000, 700_000)}
    rack = Meter(step(6_000_000, 3_000_000, 5_300_000), cycle_times())
    body = follow(tmp_path, rack, Telemetry(gpus, cycle_times()))
    assert (body["verdict"], body["expected_delta_mw"], body["gpus_unsampled"]) == \
        ("correlated", -700_000, [2])


@pytest.mark.parametrize(("first_s", "last_s", "before", "after"), [
    (-20.0, 0.0, 81, 0),  # the stream went quiet at the change (publisher died, stale)
    (1.0, 10.0, 0, 31),   # the stream came up only after the change
])
def test_a_window_without_karman_frames_is_unavailable_and_says_what_was_seen(
        tmp_path: Path, first_s: float, last_s: float, before: int, after: int) -> None:
    rack = Meter(step(6_000_000, 3_000_000, 4_800_000), cycle_times(first_s, last_s))
    body = follow(tmp_path, rack, Telemetry(job_gpus(), cycle_times()))
    empty = window(0, 0)
    assert body == {
        **HEAD, "verdict": "unavailable", "reason": "no Karman frames in the window",
        "window": {"before": window(6_000_000, 81) if before else empty,
                   "after": window(4_800_000, 31) if after else empty},
        "window_ns": WINDOW_NS}


@pytest.mark.parametrize("gpu_1", [
    lambda t: None,                              # no readings at all
    lambda t: 1_000_000 if t <= T else None,     # readings stopped at the change
    lambda t: None if t <= T else 400_000,       # readings began only after it
], ids=["never", "stopped", "started"])
def test_the_jobs_own_gpu_without_telemetry_makes_it_unavailable(
        tmp_path: Path, gpu_1: Trace) -> None:
    rack = Meter(step(6_000_000, 3_000_000, 4_800_000), cycle_times())
    body = follow(tmp_path, rack, Telemetry({**job_gpus(), 1: gpu_1}, cycle_times()))
    assert body == {
        **HEAD, "verdict": "unavailable", "reason": "no GPU telemetry in the window",
        "window": {"before": window(6_000_000, 81), "after": window(4_800_000, 31)},
        "window_ns": WINDOW_NS}


def test_without_a_stream_or_when_disabled_the_reason_is_exact(tmp_path: Path) -> None:
    telemetry = Telemetry(job_gpus(), cycle_times())
    (tmp_path / "a").mkdir()
    assert follow(tmp_path / "a", None, telemetry) == {
        **HEAD, "verdict": "unavailable", "reason": "no Karman endpoint configured"}
    (tmp_path / "b").mkdir()
    body = follow(tmp_path / "b", None, telemetry,
                  unavailable_reason="karman: tcp://karman:5555 unreachable")
    assert body["reason"] == "karman: tcp://karman:5555 unreachable"
    (tmp_path / "c").mkdir()
    rack = Meter(step(6_000_000, 3_000_000, 4_800_000), cycle_times())
    off = FacilitySettings(enabled=False, before_s=8.0, after_s=6.0)
    assert follow(tmp_path / "c", rack, telemetry, off) == {
        **HEAD, "verdict": "unavailable",
        "reason": "facility correlation is disabled by the policy"}


def test_the_follow_up_waits_until_the_whole_after_window_has_arrived(tmp_path: Path) -> None:
    # A live stream: a cycle every 10 ms, none stamped after the wall clock has
    # arrived. Judged early, the after window [T + 0.2 s, T + 0.4 s] would be short.
    now = time.time_ns()
    times = list(range(now - S, now + S, S // 100))
    rack = Meter(lambda t: 6_000_000 if t <= now else 4_800_000, times, live=True)
    gpus: dict[int, Trace] = {i: (lambda t: 1_000_000 if t <= now else 400_000) for i in (0, 1)}
    body = follow(tmp_path, rack, Telemetry(gpus, times, live=True),
                  FacilitySettings(before_s=0.2, after_s=0.4, tolerance_w=100),
                  changed_ns=now)
    assert body["verdict"] == "correlated"
    assert body["window"]["after"]["samples"] == len(
        [t for t in times if now + S // 5 <= t <= now + 2 * S // 5])


def test_a_policy_reloaded_while_the_follow_up_waits_keeps_the_windows_of_the_change(
        tmp_path: Path) -> None:
    # SIGHUP with longer windows and a tighter tolerance just after the change: the
    # follow-up is already due at the change's windows; judged by the new ones, the
    # after window would lie in the future (no frames: unavailable).
    now = time.time_ns()
    times = list(range(now - S, now + S, S // 100))
    rack = Meter(lambda t: 6_000_000 if t <= now else 4_850_000, times, live=True)
    gpus: dict[int, Trace] = {i: (lambda t: 1_000_000 if t <= now else 400_000) for i in (0, 1)}
    body = follow(tmp_path, rack, Telemetry(gpus, times, live=True),
                  FacilitySettings(before_s=0.2, after_s=0.4, tolerance_w=100),
                  changed_ns=now, reload=FacilitySettings(before_s=30.0, after_s=30.0,
                                                          tolerance_w=10, tolerance_pct=1))
    assert (body["verdict"], body["window_ns"], body["tolerance_mw"]) == (
        "correlated", {"before": S // 5, "after": 2 * S // 5, "settle": S // 5}, 300_000)


def test_stop_writes_every_pending_follow_up_as_unavailable_and_ends_its_thread(
        tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = LedgerWriter(ledger)
    writer.start()
    before = set(threading.enumerate())
    long = FacilitySettings(before_s=8.0, after_s=600.0)
    follower = FacilityFollower(node="n1", writer=writer, policy=lambda: Pol(Settings(long)),
                                stream=Meter(step(1, 1, 1), cycle_times()),
                                telemetry=Telemetry(job_gpus(), cycle_times()),
                                index_of=INDEX_OF.__getitem__)
    follower.start()
    # Its thread must not keep the process alive if sparkd's shutdown fails early.
    assert [t.daemon for t in set(threading.enumerate()) - before] == [True]
    now = time.time_ns()
    follower.schedule("cap", REF, [4, 5], now, "42")
    follower.schedule("restore", Receipt(9, "cd" * 32), [6], now + 1)
    assert follower.pending() == 2
    follower.stop()
    assert set(threading.enumerate()) - before == set()
    writer.stop()
    bodies = [r.body for r in ledger.records(kinds=["facility"])]
    ledger.close()
    reason = "sparkd stopped before the window elapsed"
    assert bodies == [
        {**HEAD, "changed_ns": now, "verdict": "unavailable", "reason": reason},
        {**{k: v for k, v in HEAD.items() if k != "job_id"},  # none was given
         "ref": {"seq": 9, "hash": "cd" * 32}, "ref_kind": "restore", "gpus": [6],
         "changed_ns": now + 1, "verdict": "unavailable", "reason": reason}]
