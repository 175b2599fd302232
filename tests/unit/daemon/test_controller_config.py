"""sparkd on the slurmctld host: no GPUs, and a spool poll period (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.daemon.config import parse_config
from spark_slurm.errors import ConfigError, GpuNotFound
from spark_slurm.gpu import open_backend

BASE = "node: ctl\npolicy: /etc/spark/policy.yaml\n"


def test_a_controller_config_needs_no_gpu_state() -> None:
    cfg = parse_config(BASE + "gpu: {backend: none}\nspool_path: /var/spool/spark/d.jsonl\n",
                       Path("/etc/spark/sparkd.yaml"))
    assert cfg.gpu_backend == "none" and cfg.gpu_state_dir is None
    assert cfg.ingest_period_s == 1.0 and cfg.checkpoint_interval_s == 900.0


def test_the_ingest_period_is_checked() -> None:
    cfg = parse_config(BASE + "gpu: {backend: none}\nautomations: {ingest_period_s: 0.5}\n",
                       Path("p"))
    assert cfg.ingest_period_s == 0.5
    with pytest.raises(ConfigError, match=r"ingest_period_s: 0.01 is outside"):
        parse_config(BASE + "gpu: {backend: none}\nautomations: {ingest_period_s: 0.01}\n",
                     Path("p"))


def test_an_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="sim, nvml, or none"):
        parse_config(BASE + "gpu: {backend: cuda}\n", Path("p"))


def test_the_none_backend_has_no_devices_and_says_so() -> None:
    backend = open_backend("none")
    assert backend.devices() == []
    with pytest.raises(GpuNotFound, match="GPU 0: this host has no GPUs"):
        backend.limits(0)
    with pytest.raises(GpuNotFound):
        backend.set_power_limit(1, 300_000)
    backend.close()


def test_the_checkpoint_interval_is_configurable() -> None:
    cfg = parse_config(BASE + "gpu: {backend: none}\n"
                       "automations: {checkpoint_interval_s: 60}\n", Path("p"))
    assert cfg.checkpoint_interval_s == 60.0
