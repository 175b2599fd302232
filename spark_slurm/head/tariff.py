"""Energy prices: a flat rate or a time-of-use tariff, applied to recorded energy.

Money is computed with `Decimal` from the prices as written in the tariff file, so
that a bill reproduces to the last digit. Energy comes from the ledger in integer
millijoules; it is spread evenly over the interval it was measured in (cap to
restore) and each slice is priced by the period its hours fall in.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from spark_slurm.errors import TariffError

MJ_PER_KWH = 3_600_000_000  # millijoules in one kilowatt-hour
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Period:
    """Hours [start, end) of each day at one price; end < start wraps past midnight."""

    name: str
    start_min: int
    end_min: int
    price_per_kwh: Decimal

    def covers(self, minute_of_day: int) -> bool:
        if self.start_min == self.end_min:
            return True
        if self.start_min < self.end_min:
            return self.start_min <= minute_of_day < self.end_min
        return minute_of_day >= self.start_min or minute_of_day < self.end_min


@dataclass(frozen=True, slots=True)
class Tariff:
    """Flat when `periods` is empty; otherwise the first period covering a minute wins."""

    currency: str
    price_per_kwh: Decimal
    periods: tuple[Period, ...] = ()
    timezone: str = "UTC"

    @property
    def kind(self) -> str:
        return "time-of-use" if self.periods else "flat"

    def price_at(self, time_ns: int) -> tuple[str, Decimal]:
        """The period name and price in force at an instant."""
        if not self.periods:
            return "flat", self.price_per_kwh
        local = dt.datetime.fromtimestamp(time_ns / _NS_PER_S, ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        for period in self.periods:
            if period.covers(minute):
                return period.name, period.price_per_kwh
        return "default", self.price_per_kwh


@dataclass(frozen=True, slots=True)
class Cost:
    """Price of some energy: total and how much of it fell in each period."""

    currency: str
    total: Decimal
    by_period_mj: dict[str, int]
    by_period_cost: dict[str, Decimal]


def flat(price_per_kwh: str | float | Decimal, currency: str = "EUR") -> Tariff:
    """A single price for every hour."""
    return Tariff(currency=currency, price_per_kwh=_price(price_per_kwh, "price_per_kwh", "<flag>"))


def _price(value: Any, key: str, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise TariffError(f"{key} must be a number, got {value!r}", where)
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise TariffError(f"{key} must be a number, got {value!r}", where) from None
    if not price.is_finite() or price < 0:
        raise TariffError(f"{key} must be a non-negative number, got {value!r}", where)
    return price


def _minute(value: Any, key: str, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 24:
        return value * 60
    if isinstance(value, str) and ":" in value:
        hh, _, mm = value.partition(":")
        if hh.isdigit() and mm.isdigit() and int(hh) <= 24 and int(mm) < 60:
            total = int(hh) * 60 + int(mm)
            if total <= 24 * 60:
                return total
    raise TariffError(f"{key} must be an hour 0-24 or \"HH:MM\", got {value!r}", where)


def parse_tariff(data: Any, where: str = "<tariff>") -> Tariff:
    """Build a tariff from its YAML mapping (schema in docs/head-node.md)."""
    if not isinstance(data, dict):
        raise TariffError("a tariff must be a mapping", where)
    known = {"currency", "price_per_kwh", "periods", "timezone"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TariffError(f"unknown key {unknown[0]!r} (expected {sorted(known)})", where)
    currency = str(data.get("currency", "EUR"))
    timezone = str(data.get("timezone", "UTC"))
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise TariffError(f"unknown timezone {timezone!r}", where) from None
    raw_periods = data.get("periods") or []
    if "price_per_kwh" not in data and not raw_periods:
        raise TariffError("needs price_per_kwh (flat) or periods (time-of-use)", where)
    default = _price(data.get("price_per_kwh", 0), "price_per_kwh", where)
    if not isinstance(raw_periods, list):
        raise TariffError("periods must be a list", where)
    periods = []
    for i, item in enumerate(raw_periods):
        at = f"{where}: periods[{i}]"
        if not isinstance(item, dict):
            raise TariffError("each period must be a mapping", at)
        for key in ("start", "end", "price_per_kwh"):
            if key not in item:
                raise TariffError(f"missing {key}", at)
        periods.append(Period(
            name=str(item.get("name", f"period{i}")),
            start_min=_minute(item["start"], "start", at) % (24 * 60),
            end_min=_minute(item["end"], "end", at) % (24 * 60),
            price_per_kwh=_price(item["price_per_kwh"], "price_per_kwh", at),
        ))
    return Tariff(currency=currency, price_per_kwh=default, periods=tuple(periods),
                  timezone=timezone)


def load_tariff(path: Path) -> Tariff:
    """Read a tariff YAML file; any problem is a one-line TariffError naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TariffError(f"cannot read tariff: {exc.strerror}", str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise TariffError("not valid YAML", str(path), line) from None
    return parse_tariff(data, str(path))


def _boundaries(tariff: Tariff, t0_ns: int, t1_ns: int) -> list[int]:
    """Instants in (t0, t1) where the price may change: every period edge, local time."""
    if not tariff.periods:
        return []
    zone = ZoneInfo(tariff.timezone)
    edges = sorted({p.start_min for p in tariff.periods} | {p.end_min for p in tariff.periods})
    day = dt.datetime.fromtimestamp(t0_ns / _NS_PER_S, zone).date()
    last = dt.datetime.fromtimestamp(t1_ns / _NS_PER_S, zone).date()
    out = []
    while day <= last:
        for minute in edges:
            local = dt.datetime.combine(day, dt.time(minute // 60, minute % 60), zone)
            ns = int(local.timestamp()) * _NS_PER_S
            if t0_ns < ns < t1_ns:
                out.append(ns)
        day += dt.timedelta(days=1)
    return sorted(out)


def price_energy(tariff: Tariff, energy_mj: int, t0_ns: int, t1_ns: int) -> Cost:
    """Cost of energy drawn evenly over [t0, t1], split by tariff period."""
    by_mj: dict[str, int] = {}
    by_cost: dict[str, Decimal] = {}
    t1_ns = max(t1_ns, t0_ns + 1)
    cuts = [t0_ns, *_boundaries(tariff, t0_ns, t1_ns), t1_ns]
    span = t1_ns - t0_ns
    assigned = 0
    for i in range(len(cuts) - 1):
        a, b = cuts[i], cuts[i + 1]
        # integer split; the last slice takes the remainder so nothing is lost
        part = energy_mj - assigned if i == len(cuts) - 2 else energy_mj * (b - a) // span
        assigned += part
        name, price = tariff.price_at(a)
        by_mj[name] = by_mj.get(name, 0) + part
        by_cost[name] = by_cost.get(name, Decimal(0)) + Decimal(part) / MJ_PER_KWH * price
    total = sum(by_cost.values(), Decimal(0))
    return Cost(currency=tariff.currency, total=total, by_period_mj=by_mj, by_period_cost=by_cost)
