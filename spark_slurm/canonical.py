"""Canonical record bytes: the exact bytes a PER's hash covers.

UTF-8 JSON, keys sorted, no insignificant whitespace, integers only. Floats are
refused rather than rounded: a verifier must be able to reproduce nothing, only
compare, so every value is stored in integer units (mW, m°C, mJ, ns).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spark_slurm.errors import CanonicalError

JSONValue = None | bool | int | str | list["JSONValue"] | dict[str, "JSONValue"]

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
)


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        raise CanonicalError(f"float {value!r} is not allowed; use integer units", path)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"key {key!r} is not a string", path)
            _check(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    raise CanonicalError(f"value of type {type(value).__name__} is not JSON", path)


def canonical_bytes(body: Mapping[str, Any]) -> bytes:
    """Encode a record body canonically, refusing anything not integer-clean."""
    if not isinstance(body, Mapping):
        raise CanonicalError("a record body must be a JSON object")
    _check(body, "$")
    return _ENCODER.encode(body).encode("utf-8")


def parse_body(data: bytes) -> dict[str, Any]:
    """Decode stored bytes back to a dict (for display; hashes never re-serialise)."""
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise CanonicalError("stored body is not a JSON object")
    return value
