"""The Grafana dashboard and scrape config refer to metrics the exporter really serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from spark_slurm.karman.exporter import QUANTITIES
from spark_slurm.karman.recorder import ROW_FIELDS, TABLE
from spark_slurm.karman.subscriber import COUNTERS

ROOT = Path(__file__).resolve().parents[3]


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "contrib" / "grafana" / "karman-dashboard.json").read_text())
    served = {metric for _, metric, _ in QUANTITIES}
    served |= {f"karman_{c}_total" for c in COUNTERS}
    served |= {"karman_window_cycles", "karman_last_cycle_age_seconds"}
    used: set[str] = set()
    sql = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
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


def test_scrape_config_targets_the_exporter_port() -> None:
    conf = yaml.safe_load((ROOT / "contrib" / "prometheus" / "karman-scrape.yml").read_text())
    job = conf["scrape_configs"][0]
    assert job["job_name"] == "karman"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9557"]
