"""Tariffs: flat and time-of-use pricing, and clear errors for bad files."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from spark_slurm.errors import TariffError
from spark_slurm.head.tariff import MJ_PER_KWH, flat, load_tariff, parse_tariff, price_energy


def ns(hour: int, minute: int = 0) -> int:
    return int(dt.datetime(2026, 1, 5, hour, minute, tzinfo=dt.UTC).timestamp()) * 10**9


TOU = {"currency": "USD", "price_per_kwh": 0.20, "periods": [
    {"name": "peak", "start": "08:00", "end": "20:00", "price_per_kwh": 0.40},
    {"name": "night", "start": 22, "end": 6, "price_per_kwh": 0.10}]}


def test_flat_price_is_exact() -> None:
    cost = price_energy(flat("0.25"), 2 * MJ_PER_KWH, ns(1), ns(3))
    assert cost.total == Decimal("0.50") and cost.by_period_mj == {"flat": 2 * MJ_PER_KWH}


def test_time_of_use_splits_energy_evenly_over_the_interval() -> None:
    tariff = parse_tariff(TOU)
    # 07:00-09:00: one hour default (0.20), one hour peak (0.40), 1 kWh each
    cost = price_energy(tariff, 2 * MJ_PER_KWH, ns(7), ns(9))
    assert cost.by_period_mj == {"default": MJ_PER_KWH, "peak": MJ_PER_KWH}
    assert cost.total == Decimal("0.60")
    # wrapping period: 23:00 is night
    assert tariff.price_at(ns(23)) == ("night", Decimal("0.1"))
    assert tariff.price_at(ns(5, 59)) == ("night", Decimal("0.1"))


def test_no_energy_is_lost_to_rounding() -> None:
    cost = price_energy(parse_tariff(TOU), 1_000_000_007, ns(7, 13), ns(21, 47))
    assert sum(cost.by_period_mj.values()) == 1_000_000_007


@pytest.mark.parametrize(("data", "message"), [
    ({"price_per_kwh": -1}, "non-negative"),
    ({"price_per_kwh": "abc"}, "number"),
    ({}, "needs price_per_kwh"),
    ({"periods": [{"start": 25, "end": 3, "price_per_kwh": 1}]}, "start"),
    ({"periods": [{"start": 1, "price_per_kwh": 1}]}, "missing end"),
    ({"price_per_kwh": 1, "timezone": "Mars/Olympus"}, "timezone"),
    ({"price_per_kwh": 1, "prices": 2}, "unknown key"),
])
def test_bad_tariffs_name_the_problem(data: dict[str, object], message: str) -> None:
    with pytest.raises(TariffError, match=message):
        parse_tariff(data, "t.yaml")


def test_load_tariff_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("currency: EUR\nprice_per_kwh: 0.3\ntimezone: Europe/Paris\n")
    assert load_tariff(path).price_per_kwh == Decimal("0.3")
    path.write_text("price_per_kwh: [\n")
    with pytest.raises(TariffError, match=r"t\.yaml"):
        load_tariff(path)
    with pytest.raises(TariffError, match="cannot read"):
        load_tariff(tmp_path / "missing.yaml")
