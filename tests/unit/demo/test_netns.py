"""The namespaced topology's pure parts: subnet choice, names, the saved description."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest

from spark_slurm.demo.netns import Member, Topology, pick_subnet
from spark_slurm.errors import ServiceError


def test_a_picked_subnet_overlaps_nothing_in_use() -> None:
    used = [ipaddress.IPv4Network("10.0.0.0/9"), ipaddress.IPv4Network("10.200.0.0/16"),
            ipaddress.IPv4Network("0.0.0.0/0")]         # a default route does not count
    rng = random.Random(7)
    for _ in range(200):
        net = pick_subnet(used, rng)
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.IPv4Network("10.128.0.0/9"))
        assert not any(net.overlaps(u) for u in used[:2])


def test_no_free_subnet_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match=r"no free 10\.x\.y\.0/24"):
        pick_subnet([ipaddress.IPv4Network("10.0.0.0/8")], random.Random(1))


def test_names_carry_the_instance_token_and_fit_linux_limits(tmp_path: Path) -> None:
    a = Topology(tmp_path, ["ctl", "n1", "n2", "n3"])
    b = Topology(tmp_path, ["ctl", "n1"])
    assert a.token != b.token and a.bridge != b.bridge
    assert len(a.bridge) <= 15 and a.bridge.startswith("spk")


def test_the_saved_description_round_trips(tmp_path: Path) -> None:
    topo = Topology(tmp_path, ["ctl", "n1"], token="abc123", subnet="10.150.7.0/24")
    topo.members = {"ctl": Member("ctl", "10.150.7.10", "spkabc123-ctl", "spkabc123h0", 41),
                    "n1": Member("n1", "10.150.7.11", "spkabc123-n1", "spkabc123h1", 42)}
    back = Topology.from_json(topo.to_json())
    assert back.to_json() == topo.to_json()
    assert back.host_address == "10.150.7.1" and back.address("n1") == "10.150.7.11"
    assert back.exec_argv("n1", ["slurmd", "-D"]) == [
        "nsenter", "-t", "42", "-n", "-u", "-m", "--", "slurmd", "-D"]
