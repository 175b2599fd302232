"""Canonical bytes are what every hash covers: they must be exact and refuse floats."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spark_slurm.canonical import canonical_bytes, parse_body
from spark_slurm.errors import CanonicalError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def test_sorted_keys_no_whitespace_utf8() -> None:
    body = {"b": 1, "a": [1, 2, {"z": None, "y": True}], "é": "ω"}
    assert canonical_bytes(body) == '{"a":[1,2,{"y":true,"z":null}],"b":1,"é":"ω"}'.encode()


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"power": 1.5}, "$.power"),
        ({"x": [1, math.nan]}, "$.x[1]"),
        ({"x": {"y": math.inf}}, "$.x.y"),
        ({"x": {1: 2}}, "$.x"),
        ({"x": object()}, "$.x"),
        ({"x": b"bytes"}, "$.x"),
    ],
)
def test_refuses_non_integer_clean_values_and_names_where(body: dict[str, Any], where: str) -> None:
    with pytest.raises(CanonicalError) as info:
        canonical_bytes(body)
    assert where in str(info.value)


def test_refuses_a_non_object_body() -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes([1, 2])  # type: ignore[arg-type]


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_round_trip_and_key_order_independence(body: dict[str, Any]) -> None:
    data = canonical_bytes(body)
    assert parse_body(data) == json.loads(data)
    reordered = dict(reversed(list(body.items())))
    assert canonical_bytes(reordered) == data
    assert canonical_bytes(parse_body(data)) == data
