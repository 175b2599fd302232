"""Reads policy YAML into `PolicyData`, collecting every problem with its line and column.

PyYAML's composer gives nodes with marks; walking them ourselves (rather than
loading to plain dicts) keeps positions for every key and value, catches
duplicate keys that `safe_load` silently merges, and lets one pass report all
mistakes at once instead of stopping at the first.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from spark_slurm.policy.model import (
    AdmissionSettings,
    FacilitySettings,
    GpuSettings,
    Limit,
    Match,
    PolicyData,
    Rule,
    ThermalSettings,
)

Problem = tuple[int, int, str]
T = TypeVar("T")

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_WATTS = 100_000  # per GPU or per node: anything larger is a typo, not a GPU
LIMIT_KEYS = ("min_watts_per_gpu", "max_watts_per_gpu", "default_watts_per_gpu",
              "max_node_watts", "max_gpus", "on_exceed")
_TAG = "tag:yaml.org,2002:"


class _Walker:
    """Typed accessors over YAML nodes that record problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, node: yaml.Node, message: str) -> None:
        mark = node.start_mark
        self.problems.append((mark.line + 1, mark.column + 1, message))

    def mapping(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where}: expected a mapping, got {_kind(node)}")
            return None
        items: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _TAG + "str":
                self.error(key_node, f"{where}: keys must be names (quote numbers: '1')")
                continue
            key = key_node.value
            if key in seen:
                self.error(key_node, f"{where}: duplicate key '{key}'")
                continue
            seen.add(key)
            items.append((key, key_node, value_node))
        return items

    def fields(self, node: yaml.Node, where: str,
               spec: dict[str, Callable[[yaml.Node, str], Any]]) -> dict[str, Any]:
        """Parse the keys `spec` knows; unknown keys are problems (with a suggestion)."""
        out: dict[str, Any] = {}
        for key, key_node, value_node in self.mapping(node, where) or []:
            parse = spec.get(key)
            if parse is None:
                close = difflib.get_close_matches(key, list(spec), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.error(key_node, f"{where}: unknown key '{key}'{hint}")
                continue
            value = parse(value_node, f"{where}.{key}")
            if value is not None:
                out[key] = value
        return out

    @staticmethod
    def invalid(node: yaml.Node, parsed: dict[str, Any]) -> set[str]:
        """Keys present in a mapping whose values did not parse (their checks are skipped)."""
        if not isinstance(node, yaml.MappingNode):
            return set()
        present = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
        return present - set(parsed)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        try:
            return yaml.constructor.SafeConstructor().construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            return node.value

    def integer(self, lo: int, hi: int) -> Callable[[yaml.Node, str], int | None]:
        def parse(node: yaml.Node, where: str) -> int | None:
            value = self.scalar(node)
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(node, f"{where}: expected a whole number, got {_show(node)}")
                return None
            if not lo <= value <= hi:
                self.error(node, f"{where}: {value} is out of range [{lo}, {hi}]")
                return None
            return value
        return parse

    def number(self, lo: float, hi: float) -> Callable[[yaml.Node, str], float | None]:
        def parse(node: yaml.Node, where: str) -> float | None:
            value = self.scalar(node)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(node, f"{where}: expected a number, got {_show(node)}")
                return None
            if not lo <= value <= hi:
                self.error(node, f"{where}: {value} is out of range [{lo}, {hi}]")
                return None
            return float(value)
        return parse

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.error(node, f"{where}: expected true or false, got {_show(node)}")
            return None
        return value

    def choice(self, *options: str) -> Callable[[yaml.Node, str], str | None]:
        def parse(node: yaml.Node, where: str) -> str | None:
            value = self.scalar(node)
            if not isinstance(value, str) or value not in options:
                self.error(node, f"{where}: expected one of {', '.join(options)}, "
                                 f"got {_show(node)}")
                return None
            return value
        return parse

    def text(self, node: yaml.Node, where: str) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or not value.strip():
            self.error(node, f"{where}: expected non-empty text, got {_show(node)}")
            return None
        return value

    def path(self, node: yaml.Node, where: str) -> str | None:
        value = self.text(node, where)
        if value is not None and not value.startswith("/"):
            self.error(node, f"{where}: expected an absolute path, got {value!r}")
            return None
        return value

    def name(self, node: yaml.Node, where: str) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or not NAME_RE.match(value):
            self.error(node, f"{where}: expected a name of letters, digits, '_', '.' or '-', "
                             f"got {_show(node)}")
            return None
        return value

    def names(self, node: yaml.Node, where: str) -> tuple[str, ...] | None:
        if isinstance(node, yaml.SequenceNode):
            found = [self.name(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
            if not node.value:
                self.error(node, f"{where}: empty list matches nothing")
            return tuple(n for n in found if n is not None)
        single = self.name(node, where)
        return (single,) if single is not None else None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _show(node)


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        return repr(text) if node.tag == _TAG + "str" else text or "nothing"
    return _kind(node)


def _limit_spec(w: _Walker) -> dict[str, Callable[[yaml.Node, str], Any]]:
    watts = w.integer(1, MAX_WATTS)
    return {
        "min_watts_per_gpu": watts,
        "max_watts_per_gpu": watts,
        "default_watts_per_gpu": watts,
        "max_node_watts": w.integer(1, MAX_WATTS * 64),
        "max_gpus": w.integer(1, 1024),
        "on_exceed": w.choice("clamp", "deny"),
    }


def _at(node: yaml.Node, key: str) -> yaml.Node:
    """The value node of `key` in a mapping (for precise positions), else the mapping."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return node


def _check_bounds(w: _Walker, node: yaml.Node, where: str, *, lo: int | None, hi: int | None,
                  default: int | None, keys: tuple[str, str] = (
                      "min_watts_per_gpu", "default_watts_per_gpu")) -> None:
    """min <= default <= max, each reported at the key that breaks it."""
    lo_key, default_key = keys
    if lo is not None and hi is not None and lo > hi:
        w.error(_at(node, lo_key), f"{where}: minimum {lo} W is above maximum {hi} W")
    if default is not None and hi is not None and default > hi:
        w.error(_at(node, default_key), f"{where}: default {default} W is above maximum {hi} W")
    if default is not None and lo is not None and default < lo:
        w.error(_at(node, default_key), f"{where}: default {default} W is below minimum {lo} W")


def _limit(w: _Walker, node: yaml.Node, where: str, values: dict[str, Any],
           on_exceed: str) -> Limit:
    _check_bounds(w, node, where, lo=values.get("min_watts_per_gpu"),
                  hi=values.get("max_watts_per_gpu"), default=values.get("default_watts_per_gpu"))
    picked = {k: values[k] for k in LIMIT_KEYS if k in values}
    picked.setdefault("on_exceed", on_exceed)
    return Limit(**picked)


def _sections(w: _Walker, node: yaml.Node, where: str, on_exceed: str) -> dict[str, Limit]:
    out: dict[str, Limit] = {}
    for key, key_node, value_node in w.mapping(node, where) or []:
        if w.name(key_node, f"{where} name") is None:
            continue
        values = w.fields(value_node, f"{where}.{key}", _limit_spec(w))
        out[key] = _limit(w, value_node, f"{where}.{key}", values, on_exceed)
    return out


def _rules(w: _Walker, node: yaml.Node, on_exceed: str) -> tuple[Rule, ...]:
    if not isinstance(node, yaml.SequenceNode):
        w.error(node, f"rules: expected a list of rules, got {_kind(node)}")
        return ()
    match_spec: dict[str, Callable[[yaml.Node, str], Any]] = {
        "account": w.names, "partition": w.names, "qos": w.names, "class": w.names}
    spec = {"id": w.name, "action": w.choice("deny", "limit"), "reason": w.text,
            "match": lambda n, where: w.fields(n, where, match_spec), **_limit_spec(w)}
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(node.value):
        where = f"rules[{i}]"
        values = w.fields(item, where, spec)
        if not isinstance(item, yaml.MappingNode):
            continue
        rule_id = values.get("id")
        if rule_id is None:
            if "id" not in {k.value for k, _ in item.value}:
                w.error(item, f"{where}: every rule needs an 'id'")
            continue
        where = f"rule '{rule_id}'"
        if rule_id in seen:
            w.error(item, f"{where}: duplicate rule id (first at line {seen[rule_id]})")
            continue
        seen[rule_id] = item.start_mark.line + 1
        action = values.get("action", "limit")
        has_limits = any(k in values for k in LIMIT_KEYS if k != "on_exceed")
        if action == "deny" and "reason" not in values:
            w.error(item, f"{where}: a deny rule needs a 'reason' to show the user")
        if action == "deny" and has_limits:
            w.error(item, f"{where}: a deny rule takes no limits")
        if action == "limit" and not has_limits:
            w.error(item, f"{where}: sets no limit (give min/max/default watts, "
                          "max_node_watts or max_gpus, or action: deny)")
        m = values.get("match", {})
        match = Match(account=m.get("account", ()), partition=m.get("partition", ()),
                      qos=m.get("qos", ()), workload_class=m.get("class", ()))
        rules.append(Rule(id=rule_id, action=action, match=match,
                          limit=_limit(w, item, where, values, on_exceed),
                          reason=values.get("reason", "")))
    return tuple(rules)


def _gpu(w: _Walker, node: yaml.Node, on_exceed: str) -> GpuSettings:
    watts = w.integer(1, MAX_WATTS)
    v = w.fields(node, "gpu", {
        "default_watts": watts, "min_watts": watts, "max_watts": watts,
        "node_max_watts": w.integer(1, MAX_WATTS * 64),
        "on_exceed": w.choice("clamp", "deny")})
    base = GpuSettings()
    out = GpuSettings(
        default_watts=v.get("default_watts", base.default_watts),
        min_watts=v.get("min_watts", base.min_watts),
        max_watts=v.get("max_watts", base.max_watts),
        node_max_watts=v.get("node_max_watts"),
        on_exceed=v.get("on_exceed", on_exceed))
    bad = w.invalid(node, v)
    _check_bounds(w, node, "gpu", lo=None if "min_watts" in bad else out.min_watts,
                  hi=None if "max_watts" in bad else out.max_watts,
                  default=None if "default_watts" in bad else out.default_watts,
                  keys=("min_watts", "default_watts"))
    return out


def _thermal(w: _Walker, node: yaml.Node) -> ThermalSettings:
    v = w.fields(node, "thermal", {
        "enabled": w.boolean, "threshold_c": w.integer(30, 130),
        "release_c": w.integer(20, 130), "throttle_watts": w.integer(1, MAX_WATTS),
        "throttle_fraction": w.number(0.05, 0.99), "interval_s": w.number(0.05, 3600)})
    if "throttle_watts" in v and "throttle_fraction" in v:
        w.error(node, "thermal: give throttle_watts or throttle_fraction, not both")
    base = ThermalSettings()
    out = ThermalSettings(
        enabled=v.get("enabled", base.enabled),
        threshold_c=v.get("threshold_c", base.threshold_c),
        release_c=v.get("release_c", base.release_c),
        throttle_watts=v.get("throttle_watts"),
        throttle_fraction=None if "throttle_watts" in v
        else v.get("throttle_fraction", base.throttle_fraction),
        interval_s=v.get("interval_s", base.interval_s))
    if not w.invalid(node, v) & {"release_c", "threshold_c"} and \
            out.release_c >= out.threshold_c:
        w.error(_at(node, "release_c"), f"thermal: release_c {out.release_c} must be below "
                      f"threshold_c {out.threshold_c} (hysteresis)")
    return out


def _facility(w: _Walker, node: yaml.Node) -> FacilitySettings:
    v = w.fields(node, "facility", {
        "enabled": w.boolean, "before_s": w.number(1, 600), "after_s": w.number(1, 600),
        "tolerance_w": w.integer(0, 10_000_000), "tolerance_pct": w.integer(0, 100)})
    return FacilitySettings(**v)


def read_policy(text: str) -> tuple[PolicyData | None, list[Problem]]:
    """Parse and check policy YAML; returns the data (None if unusable) and every problem."""
    w = _Walker()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        what = exc.problem or "invalid YAML"
        if exc.context:
            what += f" ({exc.context})"
        return None, [(*where, f"YAML syntax: {what}")]
    except (yaml.YAMLError, RecursionError) as exc:
        return None, [(1, 1, f"YAML syntax: {type(exc).__name__}")]
    if root is None:
        return None, [(1, 1, "the policy is empty")]
    on_exceed_spec = w.choice("clamp", "deny")
    top = w.fields(root, "policy", {
        "version": w.integer(1, 1),
        "on_exceed": on_exceed_spec,
        "gpu": lambda n, _: n, "tenants": lambda n, _: n, "partitions": lambda n, _: n,
        "qos": lambda n, _: n, "classes": lambda n, _: n, "rules": lambda n, _: n,
        "permissions": lambda n, _: n, "thermal": lambda n, _: n, "drift": lambda n, _: n,
        "hook": lambda n, _: n, "facility": lambda n, _: n, "admission": lambda n, _: n,
    })
    if not isinstance(root, yaml.MappingNode):
        return None, w.problems
    on_exceed = top.get("on_exceed", "clamp")
    data: dict[str, Any] = {}
    data["gpu"] = _gpu(w, top["gpu"], on_exceed) if "gpu" in top else GpuSettings(
        on_exceed="deny" if on_exceed == "deny" else "clamp")
    for section in ("tenants", "partitions", "qos", "classes"):
        if section in top:
            data[section] = _sections(w, top[section], section, on_exceed)
    if "rules" in top:
        data["rules"] = _rules(w, top["rules"], on_exceed)
    if "permissions" in top:
        v = w.fields(top["permissions"], "permissions", {
            "owner_may": w.choice("lower", "none", "any"), "admin_group": w.name})
        data.update(v)
    if "thermal" in top:
        data["thermal"] = _thermal(w, top["thermal"])
    if "drift" in top:
        v = w.fields(top["drift"], "drift", {"action": w.choice("reconcile", "record")})
        if "action" in v:
            data["drift"] = v["action"]
    if "hook" in top:
        v = w.fields(top["hook"], "hook",
                     {"on_daemon_down": w.choice("fail_open", "fail_closed")})
        data.update(v)
    if "facility" in top:
        data["facility"] = _facility(w, top["facility"])
    if "admission" in top:
        v = w.fields(top["admission"], "admission",
                     {"fail_mode": w.choice("closed", "open"), "spool": w.path})
        data["admission"] = AdmissionSettings(**v)
    if w.problems:
        return None, sorted(w.problems)
    return PolicyData(**data), []
