"""Ledger rows and the exact bytes each one's hash covers.

A row's stored bytes are a canonical JSON *envelope*
`{"body":{...},"job":J,"kind":K,"seq":N,"time_ns":T}` so that the sequence
number, time, kind and job id are covered by the hash as well as the body; the
plain columns are only an index and the verifier checks them against the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spark_slurm.canonical import canonical_bytes
from spark_slurm.errors import CanonicalError

_FAST = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                        allow_nan=False)
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+[],")
_KIND_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True, slots=True)
class Receipt:
    """What an append returns: the record's sequence number and hash (hex)."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class Record:
    """One stored Power Event Record, exactly as on disk (hashes in hex)."""

    seq: int
    time_ns: int
    kind: str
    job_id: str | None
    body_bytes: bytes
    prev_hash: str
    hash: str
    mac: str | None
    key_id: str | None
    node: str = ""
    """The node that wrote it, where records of many nodes meet (the head node's
    stores and audits); empty when read from a node ledger by itself."""

    @property
    def body(self) -> dict[str, Any]:
        """The PER body as appended (the envelope's `body`)."""
        envelope = json.loads(self.body_bytes.decode("utf-8"))
        body = envelope["body"] if isinstance(envelope, dict) else None
        if not isinstance(body, dict):
            raise CanonicalError(f"stored bytes of seq {self.seq} hold no body object")
        return body


def check_kind(kind: str) -> str:
    """Kinds are short lowercase words so they sort, index and print predictably."""
    if not isinstance(kind, str) or not kind or len(kind) > 64 or not set(kind) <= _KIND_OK:
        raise CanonicalError(f"kind {kind!r} must be 1-64 chars of a-z, 0-9, '-', '_', '.'")
    return kind


def job_of(body: Mapping[str, Any]) -> str | None:
    """The job id a record is indexed under: `body["job_id"]` when it is a string."""
    job = body.get("job_id") if isinstance(body, Mapping) else None
    if job is None:
        return None
    if not isinstance(job, str):
        raise CanonicalError(f"job_id must be a string, not {type(job).__name__}", "$.job_id")
    return job


_SCALAR_TYPES = frozenset((str, int, bool, type(None)))


def _plain_json(body: dict[str, Any]) -> bool:
    """True when the body holds only dicts with str keys, lists, str, int, bool and
    None (exact types): then the C encoder's output is already canonical. Recursive
    and branch-light because it runs once per appended record; too deep a body
    returns False so the careful path decides (as the encoder would refuse it)."""
    try:
        return _plain_dict(body)
    except RecursionError:
        return False


def _plain_dict(value: dict[Any, Any]) -> bool:
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is dict:
            if not _plain_dict(item):
                return False
        elif kind is list:
            if not _plain_list(item):
                return False
        elif kind not in _SCALAR_TYPES:
            return False
    return True


def _plain_list(value: list[Any]) -> bool:
    for item in value:
        kind = type(item)
        if kind is dict:
            if not _plain_dict(item):
                return False
        elif kind is list:
            if not _plain_list(item):
                return False
        elif kind not in _SCALAR_TYPES:
            return False
    return True


def body_bytes(body: Mapping[str, Any]) -> bytes:
    """canonical_bytes(body), fast for plain bodies (an exact-type walk, then the C
    encoder); anything else takes the careful path that names what is wrong."""
    if type(body) is dict and _plain_json(body):
        try:
            return _FAST.encode(body).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            pass
    try:
        return canonical_bytes(body)
    except UnicodeEncodeError as exc:
        raise CanonicalError(f"string is not valid Unicode: {exc.reason}") from None


def envelope_bytes(seq: int, time_ns: int, kind: str, body: Mapping[str, Any]) -> bytes:
    """Canonical stored bytes for one record (refuses floats, NaN, non-string keys)."""
    job = job_of(body)
    # Same bytes as canonical_bytes() of the whole envelope: "body" sorts first.
    suffix = envelope_suffix(seq, time_ns, check_kind(kind), job)
    return b'{"body":' + body_bytes(body) + suffix


def _json_str(value: str) -> str:
    if set(value) <= _PLAIN:  # nothing to escape: skip the encoder
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def envelope_suffix(seq: int, time_ns: int, kind: str, job_id: str | None) -> bytes:
    """The fixed tail of an envelope; the verifier matches columns against it cheaply."""
    job = "null" if job_id is None else _json_str(job_id)
    return f',"job":{job},"kind":{_json_str(kind)},"seq":{seq},"time_ns":{time_ns}}}'.encode()
