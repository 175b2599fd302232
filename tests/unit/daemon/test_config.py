"""sparkd.yaml: every problem names file, line and column; defaults are sane."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.daemon.config import load_config, parse_config
from spark_slurm.errors import ConfigError

GOOD = """\
node: n7
socket: {path: run/sparkd.sock, mode: "0660"}
state_dir: state
gpu: {backend: sim, state_dir: sim}
policy: policy.yaml
karman: {endpoint: "tcp://127.0.0.1:5557"}
metrics: {port: 9464}
job_context: {source: static, path: jobs.json}
slurm_user: slurm
sampler: {rate_hz: 20}
"""


def test_good_config_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sparkd.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.node == "n7"
    assert cfg.socket_path == tmp_path / "run" / "sparkd.sock"
    assert cfg.socket_mode == 0o660
    assert cfg.ledger_path == tmp_path / "state" / "ledger.db"
    assert cfg.journal_path == tmp_path / "state" / "journal.jsonl"
    assert cfg.gpu_state_dir == tmp_path / "sim"
    assert cfg.metrics_port == 9464 and cfg.metrics_address == "127.0.0.1"
    assert cfg.job_context_options == {"path": str(tmp_path / "jobs.json")}
    assert cfg.sampler_hz == 20.0
    assert cfg.karman_topic == "cycle-aligned"


@pytest.mark.parametrize(("text", "message"), [
    ("policy: p.yaml\ngpu: {backend: sim}\n", "p:2:6: gpu: the sim backend needs gpu.state_dir"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nfrobnicate: 1\n",
     "p:3:13: frobnicate: unknown key"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nmetrics: {port: 70000}\n",
     "p:3:17: metrics.port: 70000 is outside 0..65535"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nsocket: {mode: rwx}\n",
     "p:3:16: socket.mode: 'rwx' is not an octal mode"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\njob_context: {source: ldap}\n",
     "p:3:23: job_context.source: unknown source 'ldap'"),
    ("gpu: {backend: sim, state_dir: s}\n", "p:1:1: policy: missing"),
    ("policy: [unclosed\n", "p:2:1: not valid YAML"),
    ("- a list\n", "p:1:1: expected a YAML mapping"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nrefusal_limit: {burst: 2.5}\n",
     "p:3:24: refusal_limit.burst: 2.5 is not a whole number"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nrefusal_limit: {rate_per_s: -1}\n",
     "p:3:29: refusal_limit.rate_per_s: -1 is outside 0.0..1000.0"),
    ("policy: p.yaml\ngpu: {backend: sim, state_dir: s}\nrefusal_limit: 5\n",
     "p:3:16: refusal_limit: expected a mapping"),
    ("policy: p.yaml\ngpu: {backend: nvml, persistence: force}\n",
     "p:2:35: gpu.persistence: expected check or enable, got 'force'"),
    ("policy: p.yaml\ngpu: {backend: nvml, readback_tolerance_mw: -5}\n",
     "p:2:45: gpu.readback_tolerance_mw: -5 is outside 0..50000"),
])
def test_bad_config_names_the_place(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("p"))
    assert str(err.value).startswith(message)


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_the_shipped_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[3] / "etc" / "sparkd.yaml")
    assert cfg.gpu_backend == "nvml" and cfg.socket_path == Path("/run/spark/sparkd.sock")
    assert cfg.metrics_address == "127.0.0.1" and cfg.slurm_user == "slurm"
    assert cfg.refusal_rate_per_s == 1.0 and cfg.refusal_burst == 20
    assert (cfg.gpu_persistence, cfg.gpu_readback_tolerance_mw) == ("check", 1000)
    assert cfg.gpu_gres_conf is None


def test_gpu_gres_conf_resolves_next_to_the_file(tmp_path: Path) -> None:
    cfg = parse_config("policy: p.yaml\ngpu: {backend: nvml, gres_conf: gres.conf, "
                       "persistence: enable}\n", tmp_path / "sparkd.yaml")
    assert cfg.gpu_gres_conf == tmp_path / "gres.conf" and cfg.gpu_persistence == "enable"
