"""Peer identity comes from the kernel; authority from uid, SlurmUser and the admin group."""

from __future__ import annotations

import grp
import os
import socket
from pathlib import Path

from spark_slurm.daemon.peers import Authority, Peer, peer_of, supplementary_groups


def test_so_peercred_reports_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_of(a)
    assert (peer.uid, peer.gid, peer.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert peer.groups == frozenset(os.getgroups())


def test_supplementary_groups_from_proc(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text("Name:\tx\nGroups:\t10 20 \nUid:\t1\n")
    assert supplementary_groups(77, tmp_path) == frozenset({10, 20})
    assert supplementary_groups(78, tmp_path) == frozenset()


def test_authority_rules() -> None:
    group = grp.getgrgid(os.getgid()).gr_name  # a group that surely exists
    gid = grp.getgrnam(group).gr_gid
    auth = Authority(slurm_uid=64030, admin_group=group)
    assert auth.is_scheduler(Peer(0, 0, 1))
    assert auth.is_scheduler(Peer(64030, 64030, 1))
    assert not auth.is_scheduler(Peer(1000, 1000, 1))
    assert auth.is_admin(Peer(0, 0, 1))
    assert auth.is_admin(Peer(1000, 1000, 1, frozenset({gid})))
    assert auth.is_admin(Peer(1000, gid, 1))
    assert not auth.is_admin(Peer(1000, 123456, 1))
    assert not Authority(admin_group="no-such-group-here").is_admin(Peer(1000, 1000, 1))
    assert not Authority().is_admin(Peer(1000, 1000, 1))

