"""The Grafana dashboards and scrape config refer to what the exporter and recorder serve."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from spark_slurm.karman.exporter import (
    DEFAULT_PORT,
    QUANTITIES,
    REFERENCE_QUANTITIES,
    STATS,
    THREE_PHASE,
)
from spark_slurm.karman.recorder import BIBIMBAP_FIELDS, ROW_FIELDS, TABLE
from spark_slurm.karman.subscriber import COUNTERS

ROOT = Path(__file__).resolve().parents[3]
GRAFANA = ROOT / "contrib" / "grafana"
REFERENCE_PROMQL = ROOT / "tests" / "data" / "karman" / "reference-summary-promql.txt"


def _targets(name: str) -> list[dict[str, Any]]:
    dash = json.loads((GRAFANA / name).read_text())
    return [t for panel in dash["panels"] for t in panel["targets"]]


def test_our_dashboard_queries_only_exported_metrics() -> None:
    served = {metric for _, metric, _ in QUANTITIES}
    served |= {f"karman_{c}_total" for c in COUNTERS}
    served |= {"karman_window_cycles", "karman_last_cycle_age_seconds"}
    used: set[str] = set()
    sql = []
    for target in _targets("karman-dashboard.json"):
        if "expr" in target:
            used |= set(re.findall(r"\bkarman_[a-z_]+", target["expr"]))
        else:
            sql.append(target["rawSql"])
    assert used and used <= served, used - served
    assert "karman_real_power_watts" in used
    assert sql and all(TABLE in s for s in sql)
    for s in sql:
        for column in re.findall(r"\b(real_power_w|[a-z]+_rms|power_factor)\b", s):
            assert column in ROW_FIELDS


def test_summary_dashboard_runs_the_reference_queries_unchanged() -> None:
    reference = {line for line in REFERENCE_PROMQL.read_text().splitlines()
                 if line and not line.startswith("#")}
    ours = {t["expr"].replace("$breaker_amps", "{{ .Values.breakerRatingAmps }}")
            for t in _targets("karman-summary.json")}
    assert ours == reference
    served = {f"{m}_{s}" for m, _ in (*REFERENCE_QUANTITIES, *THREE_PHASE) for s in STATS}
    for expr in reference:
        for name in re.findall(r"\b([a-z_]+_(?:latest|peak|trough|average))\b", expr):
            assert name in served, name


def test_per_cycle_dashboard_reads_the_bibimbap_fields() -> None:
    keys = {k for k, _ in BIBIMBAP_FIELDS} | {"three_phase_real_power",
                                              "three_phase_reactive_power"}
    sql = [t["rawSql"] for t in _targets("karman-per-cycle.json")]
    assert len(sql) == 8
    for s in sql:
        assert "FROM bibimbap" in s and "device = 'bibimbap'" in s
        for key in re.findall(r"->> '([a-z_]+)'", s):
            assert key in keys
    dash = json.loads((GRAFANA / "karman-per-cycle.json").read_text())
    choices = {o["value"] for v in dash["templating"]["list"] for o in v.get("options", [])}
    assert choices and choices <= keys


def test_scrape_config_targets_the_exporter_port() -> None:
    conf = yaml.safe_load((ROOT / "contrib" / "prometheus" / "karman-scrape.yml").read_text())
    job = conf["scrape_configs"][0]
    assert job["job_name"] == "karman" and job["scrape_interval"] == "1s"
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{DEFAULT_PORT}"]
    assert DEFAULT_PORT == 9105
