"""Request lines: checked field by field, watts converted to integer milliwatts."""

from __future__ import annotations

import pytest

from spark_slurm.daemon.requests import parse_request
from spark_slurm.errors import BadRequest


def test_prolog_request_is_parsed_with_milliwatts() -> None:
    req = parse_request(b'{"op": "prolog", "id": 7, "job_id": 42, "user": "alice", '
                        b'"uid": 1000, "partition": "gpu", "gpus": [0, 3], "watts": 1600.5, '
                        b'"class": "training"}')
    assert req.job_id == "42" and req.id == 7
    assert req.gpus == (0, 3)
    assert req.node_mw == 1_600_500
    assert req.workload_class == "training"
    assert req.echo()["class"] == "training"


def test_cap_needs_watts() -> None:
    with pytest.raises(BadRequest, match="cap request needs 'watts_per_gpu'"):
        parse_request(b'{"op": "cap", "job_id": "1"}')


@pytest.mark.parametrize(("line", "message"), [
    (b"", "empty request line"),
    (b"  \t ", "empty request line"),
    (b'{"op": "prolog", "job_id": "1", "watts": ' + b"9" * 5000 + b"}",
     "malformed JSON: Exceeds the limit"),
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (b'{"op": "prolog", "job_id": "1", "user": "\\ud800"}', "unpaired UTF-16 surrogate"),
    (b'{"op": "status", "id": "\\udfff"}', "unpaired UTF-16 surrogate"),
    (b'{"op": "status", "id": ' + b"9" * 40 + b"}", "outside the 64-bit integer range"),
    (b"{", "malformed JSON at column 2"),
    (b'"prolog"', "must be a JSON object"),
    (b"{}", "no string field 'op'"),
    (b'{"op": "shutdown"}', "unknown op 'shutdown'"),
    (b'{"op": "prolog"}', "prolog request needs 'job_id'"),
    (b'{"op": "prolog", "job_id": "1; rm -rf /"}', "must be a Slurm job id"),
    (b'{"op": "prolog", "job_id": "1", "gpus": [0, 0]}', "names a GPU twice"),
    (b'{"op": "prolog", "job_id": "1", "gpus": [true]}', "list of GPU indices"),
    (b'{"op": "prolog", "job_id": "1", "watts": -5}', "not a usable number of watts"),
    (b'{"op": "prolog", "job_id": "1", "watts": Infinity}', "not a usable number of watts"),
    (b'{"op": "prolog", "job_id": "1", "uid": "root"}', "'uid' must be an integer"),
    (b'{"op": "prolog", "job_id": "1", "user": 5}', "'user' must be a string"),
    (b'{"op": "status", "id": [1]}', "'id' must be a string or an integer"),
    (b'{"op": "status", "extra": 1}', "unknown field 'extra'"),
    (b"\xff", "not UTF-8"),
])
def test_bad_requests_say_what_is_wrong(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")) as err:
        parse_request(line)
    assert err.value.code == "bad-request"
