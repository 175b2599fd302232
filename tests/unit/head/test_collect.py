"""`sparkctl collect` without a cluster: the real SshTransport against a stand-in `ssh`.

The stand-in is a small program with ssh's calling convention (`ssh [opts] HOST CMD`)
that runs CMD with `sh -c` in HOST's directory, or fails the way ssh fails (exit
255) for a host that is "down". So the remote command, the streaming, the
rename, the witness and the merge are all the code a site runs; the real-ssh
path across network namespaces is tests/integration/multinode.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.cli import run
from spark_slurm.clock import ManualClock
from spark_slurm.errors import FetchError, InputError
from spark_slurm.head.collect import (
    ClockReading,
    CollectReport,
    SharedTransport,
    SshTransport,
    check_names,
    collect,
    read_node_list,
)
from spark_slurm.head.witness import latest
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.segment import read_witness_part
from tests.unit.head.builders import build_node, write_job

SPARKCTL = str(Path(sys.executable).with_name("sparkctl"))
FAKE_SSH = """
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-o", "-F", "-i") else args[1:]
host, command = args[0], args[1]
if host.startswith("down"):
    print(f"ssh: connect to host {host} port 22: Connection timed out", file=sys.stderr)
    sys.exit(255)
os.chdir(os.path.join(os.environ["FAKE_SSH_ROOT"], host))
sys.exit(subprocess.run(["sh", "-c", command]).returncode)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three nodes (n1, n2, ctl), each with its own directory holding `ledger.db`."""
    clock = ManualClock()
    for node, jobs in (("n1", [("100", [0], {0: 1000})]), ("n2", [("100", [1], {1: 900})]),
                       ("ctl", [])):
        (tmp_path / node).mkdir()
        built = build_node(tmp_path / node, node, tmp_path / "trust", clock, jobs)
        built.rename(tmp_path / node / "ledger.db")
    (tmp_path / "ssh.py").write_text(FAKE_SSH)
    monkeypatch.setenv("FAKE_SSH_ROOT", str(tmp_path))
    return tmp_path


def transport(site: Path) -> SshTransport:
    return SshTransport([sys.executable, str(site / "ssh.py"), "-o", "BatchMode=yes"],
                        ledger="ledger.db", sparkctl=SPARKCTL, socket="no-daemon.sock")


def merged_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT name, count FROM nodes"))
    finally:
        conn.close()


def test_every_node_is_fetched_witnessed_and_merged_once(site: Path) -> None:
    def once() -> CollectReport:
        return collect(["n1", "n2", "ctl"], transport(site), site / "collect",
                       keys_dir=site / "trust", witness_state=site / "witness", cosign=True,
                       into=site / "cluster.db")

    report = once()
    assert report.ok, report.problems
    assert [n.node for n in report.nodes] == ["n1", "n2", "ctl"]
    assert all(n.fetched and n.bytes > 0 and n.witness == "accepted" for n in report.nodes)
    # no daemon answers on the nodes: the clock is unknown, and that alone is no problem
    assert all(n.clock is None and "clock" in str(n.clock_error) for n in report.nodes)
    assert sorted(p.name for p in (site / "collect").glob("*.db")) == ["ctl.db", "n1.db",
                                                                        "n2.db"]
    assert not list((site / "collect").glob(".*part"))
    first = merged_counts(site / "cluster.db")
    assert first["n1"] > 1 and first["n2"] > 1 and first["ctl"] >= 1
    assert [n.head_seq for n in report.nodes] == [None, None, None]
    again = once()
    assert again.ok and again.merge is not None and again.merge.appended == 0
    assert [n.head_seq for n in again.nodes] == [first["n1"] - 1, first["n2"] - 1,
                                                 first["ctl"] - 1]
    assert [n.witness for n in again.nodes] == ["unchanged"] * 3
    assert merged_counts(site / "cluster.db") == first


def test_an_unreachable_node_is_reported_and_the_others_are_collected(site: Path) -> None:
    (site / "down3").mkdir()
    report = collect(["n1", "down3", "n2"], transport(site), site / "collect",
                     keys_dir=site / "trust", into=site / "cluster.db")
    assert not report.ok
    down = report.node("down3")
    assert down.unreachable and not down.fetched and "Connection timed out" in str(down.error)
    assert report.problems == [f"down3: {down.error}"]
    assert set(merged_counts(site / "cluster.db")) == {"n1", "n2"}


def test_a_failed_snapshot_keeps_the_last_good_copy(site: Path) -> None:
    first = collect(["n1"], transport(site), site / "collect")
    assert first.ok
    good = (site / "collect" / "n1.db").read_bytes()
    (site / "n1" / "ledger.db").rename(site / "n1" / "moved.db")
    report = collect(["n1"], transport(site), site / "collect")
    n1 = report.node("n1")
    assert not n1.fetched and not n1.unreachable
    assert n1.error is not None and n1.error.startswith("snapshot failed (")
    assert (site / "collect" / "n1.db").read_bytes() == good


def test_what_is_not_a_ledger_is_refused(site: Path) -> None:
    (site / "n1" / "junk").write_text('#!/bin/sh\necho "not a database" > "$4"\n')
    os.chmod(site / "n1" / "junk", 0o755)
    bad = SshTransport(transport(site).ssh, ledger="ledger.db", sparkctl="./junk")
    report = collect(["n1"], bad, site / "collect")
    assert report.node("n1").error == "what came back is not an SQLite ledger"
    assert not (site / "collect" / "n1.db").exists()


def test_the_remote_command_quotes_its_paths() -> None:
    remote = SshTransport(ledger="/var/lib/spark/my ledger.db", sparkctl="/opt/x y/sparkctl")
    text = remote.remote_fetch()
    assert "'/opt/x y/sparkctl' ledger snapshot '/var/lib/spark/my ledger.db'" in text
    assert 'rm -rf "$d"' in text
    assert remote.remote_fetch(41, 30) == ("'/opt/x y/sparkctl' ledger export "
                                           "'/var/lib/spark/my ledger.db' --after 41 "
                                           "--proof-from 30 --out -")
    assert "--proof-from" not in remote.remote_fetch(41)


class SkewedTransport(SharedTransport):
    def clock(self, node: str) -> ClockReading | None:
        if node == "n2":
            return ClockReading(90_000_000_000, 300_000_000)
        return ClockReading(-40_000_000, 200_000_000)


def test_a_skewed_clock_is_a_problem_that_names_the_node(site: Path) -> None:
    shared = site / "shared"
    shared.mkdir()
    for node in ("n1", "n2"):
        shutil.copy(site / node / "ledger.db", shared / f"{node}.db")
    report = collect(["n1", "n2"], SkewedTransport(shared), site / "collect",
                     into=site / "cluster.db")
    assert report.problems == ["n2: clock skew +90.0 s (±0.3 s) against the head node "
                               "(more than 2 s): its PER times are off"]
    assert report.merge is not None and report.merge.ok     # the records themselves verify
    assert not ClockReading(2_400_000_000, 500_000_000).beyond(2_000_000_000)
    assert ClockReading(-2_600_000_000, 500_000_000).beyond(2_000_000_000)


def test_the_clock_comes_from_the_daemon_status_midpoint(site: Path) -> None:
    (site / "n1" / "fake").write_text("#!/bin/sh\necho '{\"time_ns\": 5000}'\n")
    os.chmod(site / "n1" / "fake", 0o755)
    times = iter([1000, 3000, 4000, 4100])
    t = SshTransport(transport(site).ssh, sparkctl="./fake", now_ns=lambda: next(times))
    assert t.clock("n1") == ClockReading(3000, 1000)
    with pytest.raises(FetchError, match="unreachable") as err:
        t.clock("down1")
    assert err.value.unreachable


def test_node_lists_and_names(tmp_path: Path) -> None:
    listing = tmp_path / "nodes.list"
    listing.write_text("# the head node's list\nctl\nn1  # rack 1\n\nn2\n")
    assert read_node_list(listing) == ["ctl", "n1", "n2"]
    assert check_names(["n1", "n1", "n2"]) == ["n1", "n2"]
    for bad in (["n1;rm -rf /"], ["-oProxyCommand=x"], []):
        with pytest.raises(InputError):
            check_names(bad)
    with pytest.raises(InputError, match="cannot read the node list"):
        read_node_list(tmp_path / "missing")


def test_cli_reports_json_and_exits_1_on_a_down_node(site: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ssh = f"{sys.executable} {site / 'ssh.py'}"
    code = run(["collect", "--node", "n1", "--node", "down9", "--dest", str(site / "c"),
                "--ssh", ssh, "--ledger", "ledger.db", "--remote-sparkctl", SPARKCTL,
                "--keys", str(site / "trust"), "--into", str(site / "cluster.db"), "--json"])
    out = capsys.readouterr()
    assert code == 1
    data = json.loads(out.out)
    assert data["ok"] is False and data["merge"]["appended"] > 0
    assert [n["fetched"] for n in data["nodes"]] == [True, False]
    assert "down9: unreachable" in out.err and "sparkctl: collect: 1 problem(s)" in out.err
    assert run(["collect", "--dest", str(site / "c")]) == 2
    assert "name the nodes" in capsys.readouterr().err


# ------------------------------------------------ the next night: only what is new


def nightly(site: Path, nodes: tuple[str, ...] = ("n1", "n2"),
            ssh: SshTransport | None = None) -> CollectReport:
    return collect(list(nodes), ssh or transport(site), site / "collect",
                   keys_dir=site / "trust", witness_state=site / "witness", cosign=True,
                   into=site / "cluster.db")


def node_ledger(site: Path, node: str, *, signing: Any = None) -> Ledger:
    keys = site / node / f"keys-{node}"
    return Ledger.open(site / node / "ledger.db", load_hmac_key(keys / "hmac.key"),
                       signing or load_signing_key(keys / "node.key"), node=node,
                       clock=ManualClock())


def write_jobs(site: Path, node: str, first: int, count: int) -> int:
    """`count` more jobs and a checkpoint on `node`; the records it now holds."""
    with node_ledger(site, node) as led:
        for job in range(first, first + count):
            write_job(led, ManualClock(), node, str(job), [0], {0: 7})
        led.checkpoint()
        return led.size


def witnessed_size(site: Path, node: str) -> int:
    cp = latest(site / "witness", f"spark/spark/{node}")
    assert cp is not None
    return cp.size


def test_the_second_night_ships_only_the_new_records_and_the_proof(site: Path) -> None:
    size = write_jobs(site, "n1", 200, 60)           # a node with some history
    first = nightly(site)
    assert first.ok, first.problems
    f1 = first.node("n1")
    assert (f1.kind, f1.after, f1.rows) == ("ledger", None, size)  # nothing held: whole
    grown = write_jobs(site, "n1", 300, 2)
    again = nightly(site)
    assert again.ok, again.problems
    n1, n2 = again.node("n1"), again.node("n2")
    assert (n1.kind, n1.after, n1.proof_from) == ("segment", size - 1, size)
    assert n1.rows == grown - size > 0 and n2.rows == 0 and n2.kind == "segment"
    assert n1.bytes * 4 < f1.bytes                    # what travels follows what is new
    assert n1.witness == "accepted" and n2.witness == "unchanged"
    assert witnessed_size(site, "n1") == grown
    part = read_witness_part(site / "collect" / "n1.db")   # the proof the witness used
    assert part.proof and (part.proof_from, part.proof_to) == (size, grown)
    assert again.merge is not None and again.merge.appended == grown - size
    assert merged_counts(site / "cluster.db")["n1"] == grown
    assert again.to_json()["nodes"][0]["rows"] == n1.rows


def test_a_tampered_proof_is_a_fork_and_the_witness_keeps_its_checkpoint(
        site: Path) -> None:
    class Tampering(SshTransport):
        def fetch(self, node: str, dest: Path, after: int | None = None,
                  proof_from: int | None = None) -> None:
            super().fetch(node, dest, after, proof_from)
            if node == "n1":
                with closing(sqlite3.connect(dest)) as conn, conn:
                    conn.execute("UPDATE proof SET hash = zeroblob(32) WHERE i = 0")

    assert nightly(site).ok
    before = witnessed_size(site, "n1")
    write_jobs(site, "n1", 300, 3)
    bent = Tampering(transport(site).ssh, ledger="ledger.db", sparkctl=SPARKCTL,
                     socket="no-daemon.sock")
    report = nightly(site, ssh=bent)
    n1 = report.node("n1")
    assert n1.witness is None and n1.witness_error is not None
    assert n1.witness_error.startswith("FORK: spark/spark/n1")
    assert f"n1: witness refused: {n1.witness_error}" in report.problems
    assert witnessed_size(site, "n1") == before
    assert report.node("n2").witness == "unchanged" and not report.node("n2").witness_error


def test_a_rollback_then_a_fork_are_named_by_witness_and_merge_from_segments(
        site: Path) -> None:
    old = site / "n1-old.db"
    shutil.copy(site / "n1" / "ledger.db", old)
    write_jobs(site, "n1", 300, 4)
    assert nightly(site).ok                          # witnessed and merged the longer one
    shutil.copy(old, site / "n1" / "ledger.db")      # an old backup restored
    rolled = nightly(site)
    n1 = rolled.node("n1")
    assert n1.kind == "segment" and n1.rows == 0
    assert n1.witness_error is not None and n1.witness_error.startswith("ROLLBACK")
    assert rolled.merge is not None
    assert "ROLLBACK" in {f.code for r in rolled.merge.results for f in r.findings
                          if f.node == "n1"}
    assert not [p for p in rolled.problems if not p.startswith("n1:")]
    write_jobs(site, "n1", 400, 8)                   # ... and the node writes on from there
    forked = nightly(site)
    n1 = forked.node("n1")
    assert n1.kind == "segment" and n1.rows > 0
    assert n1.witness_error is not None and n1.witness_error.startswith("FORK")
    assert forked.merge is not None
    assert "FORK" in {f.code for r in forked.merge.results for f in r.findings
                      if f.node == "n1"}
    assert forked.node("n2").witness == "unchanged"


def test_a_key_rotation_is_followed_from_the_segment(site: Path) -> None:
    assert nightly(site).ok
    with node_ledger(site, "n1") as led:
        led.rotate_signing_key(Ed25519PrivateKey.generate())
        write_job(led, ManualClock(), "n1", "301", [0], {0: 5})
        rotated = led.checkpoint()
    report = nightly(site)
    assert report.ok, report.problems
    assert report.node("n1").kind == "segment" and report.node("n1").witness == "accepted"
    assert witnessed_size(site, "n1") == rotated.size


def test_a_witness_only_run_ships_what_the_witness_has_not_seen(site: Path) -> None:
    def cosign_only() -> CollectReport:
        return collect(["n1"], transport(site), site / "collect", keys_dir=site / "trust",
                       witness_state=site / "witness", cosign=True)

    first = cosign_only()
    assert first.ok and first.node("n1").kind == "ledger"
    seen = witnessed_size(site, "n1")
    grown = write_jobs(site, "n1", 300, 1)
    again = cosign_only()
    n1 = again.node("n1")
    assert again.ok, again.problems
    assert (n1.kind, n1.after, n1.rows, n1.witness) == ("segment", seen - 1, grown - seen,
                                                        "accepted")
