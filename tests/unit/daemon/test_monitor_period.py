"""The monitor looks at least as often as the policy's thermal.interval_s asks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from spark_slurm.daemon.automations import MIN_PERIOD_S, Monitor
from spark_slurm.daemon.pipeline import Pipeline
from spark_slurm.policy.model import ThermalSettings


def _monitor(period_s: float, thermal: ThermalSettings | None) -> tuple[Monitor, list[Any]]:
    current: list[Any] = [SimpleNamespace(settings=SimpleNamespace(thermal=thermal))]
    pipeline = cast(Pipeline, SimpleNamespace(actuator=None, state=None, node="n1"))
    return Monitor(pipeline, lambda: current[0], period_s=period_s), current


def test_a_shorter_thermal_interval_shortens_the_period() -> None:
    monitor, _ = _monitor(0.5, ThermalSettings(interval_s=0.2))
    assert monitor.current_period() == 0.2


def test_a_longer_interval_keeps_the_configured_period() -> None:
    monitor, _ = _monitor(0.5, ThermalSettings(interval_s=30))
    assert monitor.current_period() == 0.5


def test_the_period_has_a_floor_and_ignores_a_disabled_guard() -> None:
    monitor, current = _monitor(0.5, ThermalSettings(interval_s=0.001))
    assert monitor.current_period() == MIN_PERIOD_S
    current[0] = SimpleNamespace(settings=SimpleNamespace(
        thermal=ThermalSettings(enabled=False, interval_s=0.1)))
    assert monitor.current_period() == 0.5  # a reloaded policy counts at the next look
    current[0] = SimpleNamespace(settings=SimpleNamespace(thermal=None))
    assert monitor.current_period() == 0.5
