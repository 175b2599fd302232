"""Any text, YAML-shaped or not, either loads or raises PolicyError naming a position."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_slurm.errors import PolicyError
from spark_slurm.policy import Policy, PowerRequest

EXAMPLE = (Path(__file__).resolve().parents[3] / "etc" / "policy.yaml").read_text()
KEYS = ["version", "gpu", "tenants", "partitions", "qos", "classes", "rules", "thermal",
        "drift", "hook", "facility", "admission", "permissions", "on_exceed", "min_watts",
        "max_watts", "default_watts", "max_gpus", "id", "action", "match", "reason",
        "max_watts_per_gpu", "on_exceed", "account", "class"]
SCALARS = st.one_of(st.integers(-10, 10**6), st.booleans(), st.none(), st.floats(),
                    st.sampled_from(["deny", "clamp", "x", "", "~", "/p", "a b"]))
YAMLISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=25)


def _to_yaml(value: object, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n" + "\n".join(f"{pad}{k}: {_to_yaml(v, indent + 2)}" for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return "[]"
        return "\n" + "\n".join(f"{pad}- {_to_yaml(v, indent + 2).lstrip()}" for v in value)
    return "null" if value is None else str(value)


def _check(text: str) -> None:
    try:
        pol = Policy.from_text(text, source="fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems
        for line, column, message in exc.problems:
            assert line >= 1 and column >= 1 and message and "\n" not in message
        return
    decision = pol.evaluate(PowerRequest("admission", 2, 300_000, account="physics"))
    assert decision.action in ("allow", "clamp", "deny")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_never_raises_anything_but_policy_error(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(YAMLISH)
def test_random_policy_shaped_yaml_never_crashes(value: object) -> None:
    _check(_to_yaml(value).lstrip("\n"))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(EXAMPLE)), st.text(max_size=8))
def test_mutated_example_never_crashes(at: int, junk: str) -> None:
    _check(EXAMPLE[:at] + junk + EXAMPLE[at:])


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    _check("a: " + "[" * 5000 + "]" * 5000 + "\n")
