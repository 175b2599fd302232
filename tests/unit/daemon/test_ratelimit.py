"""The refusal budget: a burst, a steady refill, counts kept until recorded."""

from __future__ import annotations

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.ratelimit import RefusalLimiter, Suppressed


def _spend(limiter: RefusalLimiter, uid: int, n: int) -> None:
    for _ in range(n):
        assert limiter.retry_after(uid) is None
        limiter.refused(uid)


def test_a_burst_of_refusals_then_one_per_refill_interval() -> None:
    clock = ManualClock()
    limiter = RefusalLimiter(2.0, 5, clock=clock)
    _spend(limiter, 1000, 5)
    wait = limiter.retry_after(1000)
    assert wait is not None and abs(wait - 0.5) < 1e-9
    assert limiter.retry_after(1001) is None  # budgets are per uid
    clock.advance(0.5)
    _spend(limiter, 1000, 1)
    assert limiter.retry_after(1000) is not None
    clock.advance(60)  # refills up to the burst, not beyond
    _spend(limiter, 1000, 5)
    assert limiter.retry_after(1000) is not None


def test_suppressed_requests_are_counted_per_uid_and_drained_once() -> None:
    clock = ManualClock()
    limiter = RefusalLimiter(1.0, 1, clock=clock)
    _spend(limiter, 7, 1)
    t0 = clock.now_ns()
    limiter.suppress(7, "cap")
    clock.advance(0.25)
    limiter.suppress(7, "unknown")
    limiter.suppress(7, "cap")
    limiter.suppress(8, "prolog")
    assert limiter.drain() == [
        Suppressed(7, 3, t0, t0 + 250_000_000, {"cap": 2, "unknown": 1}),
        Suppressed(8, 1, t0 + 250_000_000, t0 + 250_000_000, {"prolog": 1})]
    assert limiter.drain() == []
    assert limiter.suppressed_total == 4  # the metric's counter is never drained


def test_restore_puts_unrecorded_counts_back() -> None:
    clock = ManualClock()
    limiter = RefusalLimiter(1.0, 1, clock=clock)
    limiter.suppress(7, "cap")
    taken = limiter.drain()
    clock.advance(1)
    limiter.suppress(7, "cap")
    limiter.restore(taken)
    [again] = limiter.drain()
    assert again.count == 2 and again.ops == {"cap": 2}
    assert again.first_ns == taken[0].first_ns and again.last_ns == clock.now_ns()


def test_idle_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    clock = ManualClock()
    limiter = RefusalLimiter(10.0, 2, clock=clock)
    for uid in range(1000, 1100):
        limiter.refused(uid)
    assert limiter.tracked == 100
    clock.advance(1)
    limiter.drain()
    assert limiter.tracked == 0


def test_a_zero_rate_or_burst_turns_the_limit_off() -> None:
    for limiter in (RefusalLimiter(0.0, 5), RefusalLimiter(1.0, 0)):
        assert not limiter.enabled
        for _ in range(100):
            limiter.refused(1)
        assert limiter.retry_after(1) is None
