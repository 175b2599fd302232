"""Namespaced hosts for real: own hostname, address and /run; side by side; nothing left."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from spark_slurm.demo import netns
from tests.conftest import require

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    require(netns.unavailable_reason(), "the namespace tests")


def _in(topo: netns.Topology, name: str, script: str) -> str:
    return subprocess.run(topo.exec_argv(name, ["sh", "-c", script]), capture_output=True,
                          text=True, timeout=30, check=True).stdout


def test_two_clusters_side_by_side_and_nothing_left_after(tmp_path: Path) -> None:
    (tmp_path / "n1-run").mkdir()
    a = netns.Topology(tmp_path / "a", ["ctl", "n1"],
                       binds={"n1": [(tmp_path / "n1-run", "/run/spark")]}).up()
    b = netns.Topology(tmp_path / "b", ["ctl", "n1"])
    try:
        b.up()
        assert a.subnet != b.subnet and a.bridge != b.bridge
        assert _in(a, "n1", "hostname").strip() == "n1"
        private = set(_in(a, "n1", "touch /run/spark/x; ls /run").split())
        assert {"spark", "sshd"} <= private and "netns" not in private   # a fresh /run
        assert (tmp_path / "n1-run" / "x").exists()              # the bind mount
        assert not Path("/run/spark/x").exists()                 # the host's /run untouched
        assert "ctl" in _in(a, "n1", "cat /etc/hosts")
        assert (tmp_path / "a" / "topology.json").is_file()
        probe = f"import socket; socket.create_connection(('{a.address('n1')}', 9), 2)"
        reached = subprocess.run(a.exec_argv("ctl", ["python3", "-c", probe]),
                                 capture_output=True, text=True, timeout=30, check=False)
        assert "Connection refused" in reached.stderr            # routed, nothing listening
        a.set_link("n1", False)
        cut = subprocess.run(a.exec_argv("ctl", ["python3", "-c", probe]),
                             capture_output=True, text=True, timeout=30, check=False)
        assert "timed out" in cut.stderr or "unreachable" in cut.stderr.lower()
    finally:
        a.down()
        b.down()
    assert a.leftovers() == [] and b.leftovers() == []
    assert a.down() == []                                        # twice is harmless
