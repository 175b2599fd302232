"""GRES/TRES strings in every spelling Slurm uses; gpu is never gpupower."""

from __future__ import annotations

import pytest

from spark_slurm.errors import SlurmParseError
from spark_slurm.slurm.gres import (
    GresAlloc,
    GresRequest,
    parse_count,
    parse_gres,
    parse_gres_alloc,
    parse_index_list,
    total,
)
from spark_slurm.slurm.hostlist import expand_hostlist


@pytest.mark.parametrize("text,gpus,watts", [
    ("gres:gpu:2,gres:gpupower:800", 2, 800),      # 22.05 TresPerNode
    ("gres/gpu:2,gres/gpupower:800", 2, 800),      # 23.02+
    ("gpu:2,gpupower:800", 2, 800),                # the --gres argument
    ("gres/gpu:h100:4", 4, None),                  # typed
    ("gres:gpu:h100:2,gres:gpu:a100:1", 3, None),  # several types add up
    ("gres:gpupower:300", None, 300),              # power alone
    ("gpu", 1, None),                              # bare name: count 1
    ("gpu:h100", 1, None),                         # bare type: count 1
    ("cpu=4,mem=1G,node=1,billing=4,gres/gpu=2,gres/gpu:h100=2", 4, None),  # TRES counts
    ("gres/gpupower=900,gres/gpu=3", 3, 900),
    ("gpu:1k", 1024, None),
    ("(null)", None, None),
    ("", None, None),
])
def test_request_forms(text: str, gpus: int | None, watts: int | None) -> None:
    reqs = parse_gres(text)
    assert total(reqs, "gpu") == gpus
    assert total(reqs, "gpupower") == watts


def test_gpu_and_gpupower_are_different_names() -> None:
    reqs = parse_gres("gres:gpupower:800")
    assert reqs == [GresRequest("gpupower", None, 800)]
    assert total(reqs, "gpu") is None


@pytest.mark.parametrize("text,why", [
    ("gpu:2,gpupower:abc", "bad count"),
    ("gpu:2,,gpupower:1", "empty item"),
    ("gpu:h100:x", "non-negative integer"),
    ("gpu:a:b:c", "too many"),
    ("9gpu:1", "bad GRES name"),
    ("gpupower:99999999999999999999", "exceeds"),
    ("gpu:-1", "bad count"),
    ("gpupower:h100:800", "takes a count, not a type"),
])
def test_bad_requests_name_the_problem(text: str, why: str) -> None:
    with pytest.raises(SlurmParseError, match=why) as info:
        parse_gres(text, "TresPerNode")
    assert "TresPerNode" in str(info.value)


def test_count_suffixes() -> None:
    assert parse_count("2") == 2
    assert parse_count("1M") == 1024**2
    with pytest.raises(SlurmParseError):
        parse_count("1.5")


@pytest.mark.parametrize("text,expected", [
    ("gpu:3(IDX:0-2),gpupower(CNT:900)",
     [GresAlloc("gpu", None, 3, (0, 1, 2)), GresAlloc("gpupower", None, 900)]),
    ("gpu:h100:2(IDX:4,6)", [GresAlloc("gpu", "h100", 2, (4, 6))]),
    ("gpu:2(IDX:0-1,5)", [GresAlloc("gpu", None, 2, (0, 1, 5))]),
    ("gpu(IDX:N/A)", [GresAlloc("gpu", None, 1, ())]),
    ("", []),
])
def test_allocation_forms(text: str, expected: list[GresAlloc]) -> None:
    assert parse_gres_alloc(text) == expected


@pytest.mark.parametrize("text", ["gpu:2(IDX:0-1", "gpu:2(IDX:a-b)", "gpu:2(IDX:3-1)"])
def test_bad_allocations_raise(text: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_gres_alloc(text)


def test_index_lists() -> None:
    assert parse_index_list("0-2,5,1") == [0, 1, 2, 5]
    with pytest.raises(SlurmParseError, match="bad index range"):
        parse_index_list("0-")


def test_hostlists() -> None:
    assert expand_hostlist("vm") == ["vm"]
    assert expand_hostlist("g[01-03,07],login1") == ["g01", "g02", "g03", "g07", "login1"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    with pytest.raises(SlurmParseError, match="unbalanced"):
        expand_hostlist("g[01-03")
