"""Policy files: every key read with its default, every mistake reported with line:column."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from spark_slurm.errors import ConfigError, PolicyError
from spark_slurm.policy import Policy, reload_policy
from spark_slurm.policy.model import Limit, Match

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "etc" / "policy.yaml"
BROKEN = ROOT / "tests" / "data" / "policy" / "broken.yaml"


def problems(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(PolicyError) as info:
        Policy.from_text(text, source="p.yaml")
    return info.value.problems


def test_example_policy_loads_with_its_settings() -> None:
    pol = Policy.load(EXAMPLE)
    assert pol.sha256 == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert pol.text == EXAMPLE.read_text()
    assert pol.default_watts_per_gpu == 500
    assert (pol.gpu.min_watts, pol.gpu.max_watts, pol.gpu.node_max_watts) == (200, 700, 5600)
    assert pol.data.tenants["students"] == Limit(max_watts_per_gpu=350, default_watts_per_gpu=300,
                                                 max_gpus=2, on_exceed="deny")
    assert pol.data.tenants["physics"].on_exceed == "clamp"  # from the top-level on_exceed
    assert [r.id for r in pol.data.rules] == [
        "no-gpus-on-login", "night-shift-cap", "students-no-training"]
    assert pol.data.rules[1].match == Match(qos=("night", "scavenger"))
    assert (pol.thermal.threshold_c, pol.thermal.release_c) == (87, 80)
    assert pol.thermal.throttle_fraction == 0.7 and pol.thermal.throttle_watts is None
    assert pol.drift == "reconcile"
    assert pol.on_daemon_down == "fail_closed"
    assert (pol.facility.before_s, pol.facility.after_s) == (10.0, 10.0)
    assert (pol.facility.tolerance_w, pol.facility.tolerance_pct) == (500, 25)
    assert (pol.owner_may, pol.admin_group) == ("lower", "sparkadm")
    assert pol.admission.fail_mode == "closed"
    assert pol.admission.spool == "/var/spool/spark/denials.jsonl"


def test_a_minimal_policy_takes_every_default() -> None:
    pol = Policy.from_text("version: 1\n")
    assert pol.default_watts_per_gpu == 400
    assert (pol.gpu.min_watts, pol.gpu.max_watts, pol.gpu.on_exceed) == (100, 1000, "clamp")
    assert pol.drift == "reconcile" and pol.on_daemon_down == "fail_closed"
    assert pol.owner_may == "lower" and pol.admin_group == "sparkadm"
    assert pol.thermal.enabled and pol.facility.enabled
    assert pol.data.rules == ()


def test_throttle_watts_replaces_the_fraction() -> None:
    pol = Policy.from_text("thermal: {throttle_watts: 250}\n")
    assert (pol.thermal.throttle_watts, pol.thermal.throttle_fraction) == (250, None)
    assert problems("thermal: {throttle_watts: 250, throttle_fraction: 0.5}\n") == [
        (1, 10, "thermal: give throttle_watts or throttle_fraction, not both")]


def test_snapshot_body_reloads_to_the_same_policy() -> None:
    pol = Policy.load(EXAMPLE)
    body = pol.snapshot_body()
    assert body == {"v": 1, "sha256": pol.sha256, "text": pol.text, "path": str(EXAMPLE)}
    again = Policy.from_text(body["text"])
    assert again.sha256 == pol.sha256
    assert again.data == pol.data


def test_broken_file_reports_every_mistake_at_its_line() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.load(BROKEN)
    marked = [i + 1 for i, line in enumerate(BROKEN.read_text().splitlines()) if "# ERR" in line]
    reported = {line for line, _, _ in info.value.problems}
    # every marked line is reported, plus line 4 (the default 500 W is below the minimum too)
    assert reported == {*marked, 4}
    assert len(info.value.problems) == len(marked) + 1
    msg = str(info.value)
    assert msg.startswith(f"{BROKEN}:4:18: gpu: default 500 W is below minimum 800 W")
    assert msg.endswith("(and 13 more)")


@pytest.mark.parametrize(("text", "expected"), [
    ("gpu:\n  max_wats: 3\n", (2, 3, "gpu: unknown key 'max_wats'; did you mean 'max_watts'?")),
    ("gpu: {min_watts: x}\n", (1, 18, "gpu.min_watts: expected a whole number, got 'x'")),
    ("gpu: {min_watts: true}\n", (1, 18, "gpu.min_watts: expected a whole number, got true")),
    ("gpu: {max_watts: 0}\n", (1, 18, "gpu.max_watts: 0 is out of range [1, 100000]")),
    ("gpu: {min_watts: 500, max_watts: 400}\n",
     (1, 18, "gpu: minimum 500 W is above maximum 400 W")),
    ("gpu: [1, 2]\n", (1, 6, "gpu: expected a mapping, got a list")),
    ("gpu: {a: 1}\ngpu: {b: 2}\n", (2, 1, "policy: duplicate key 'gpu'")),
    ("version: 2\n", (1, 10, "policy.version: 2 is out of range [1, 1]")),
    ("rules: {}\n", (1, 8, "rules: expected a list of rules, got a mapping")),
    ("rules:\n  - id: a b\n    max_gpus: 1\n",
     (2, 9, "rules[0].id: expected a name of letters, digits, '_', '.' or '-', got 'a b'")),
    ("rules:\n  - id: x\n    action: deny\n    reason: r\n    max_gpus: 2\n",
     (2, 5, "rule 'x': a deny rule takes no limits")),
    ("rules:\n  - id: x\n    match: {class: []}\n    max_gpus: 2\n",
     (3, 20, "rules[0].match.class: empty list matches nothing")),
    ("tenants:\n  1: {max_gpus: 2}\n", (2, 3, "tenants: keys must be names (quote numbers: '1')")),
    ("classes:\n  t: {min_watts_per_gpu: 300, default_watts_per_gpu: 200}\n",
     (2, 54, "classes.t: default 200 W is below minimum 300 W")),
    ("permissions: {owner_may: raise}\n",
     (1, 26, "permissions.owner_may: expected one of lower, none, any, got 'raise'")),
    ("a: [1\n", (2, 1, "YAML syntax: expected ',' or ']', but got '<stream end>' "
                       "(while parsing a flow sequence)")),
    ("a: 1\n---\nb: 2\n", (2, 1, "YAML syntax: but found another document "
                                 "(expected a single document in the stream)")),
    ("", (1, 1, "the policy is empty")),
    ("- 1\n", (1, 1, "policy: expected a mapping, got a list")),
    ("\tgpu: 1\n", (1, 1, "YAML syntax: found character '\\t' that cannot start any token "
                          "(while scanning for the next token)")),
])
def test_each_mistake_is_named_with_its_position(
        text: str, expected: tuple[int, int, str]) -> None:
    assert expected in problems(text)


def test_errors_are_config_errors_with_path_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("gpu:\n  min_watts: lots\n")
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 2, 14)
    assert str(info.value) == f"{path}:2:14: gpu.min_watts: expected a whole number, got 'lots'"


def test_unreadable_and_non_utf8_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.load(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nrules:\n  - id: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        Policy.load(bad)
    assert info.value.problems == [(3, 12, "policy is not valid UTF-8")]


def test_the_hash_is_over_the_exact_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("version: 1\n")
    b.write_text("version: 1   \n")
    assert Policy.load(a).data == Policy.load(b).data
    assert Policy.load(a).sha256 != Policy.load(b).sha256


def test_reload_keeps_the_last_good_policy_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("gpu: {default_watts: 300}\n")
    first = Policy.load(path)
    path.write_text("gpu: {default_watts: 350}\n")
    second, error = reload_policy(first, path)
    assert error is None and second.default_watts_per_gpu == 350
    assert second.settings.default_watts_per_gpu == 350
    path.write_text("gpu: {default_watts: lots}\n")
    kept, error = reload_policy(second, path)
    assert kept is second
    assert error is not None
    assert str(error) == f"{path}:1:22: gpu.default_watts: expected a whole number, got 'lots'"
