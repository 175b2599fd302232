"""Who is on the other end of the socket, from the kernel and never from the request.

SO_PEERCRED gives the connecting process's uid/gid/pid; supplementary groups come
from /proc/<pid>/status and the group database. Authority decisions use only
these, while the request's own `user`/`uid` fields are recorded for the audit.
"""

from __future__ import annotations

import grp
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    """Kernel-reported identity of a connected client."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = frozenset()

    @property
    def user(self) -> str:
        return user_name(self.uid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def uid_of(name: str) -> int | None:
    """A user name (or numeric string) as a uid; None when unknown."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def supplementary_groups(pid: int, proc: Path = Path("/proc")) -> frozenset[int]:
    """The process's supplementary gids, read from /proc/<pid>/status."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    return frozenset()


def peer_of(conn: socket.socket, proc: Path = Path("/proc")) -> Peer:
    """Identity of the process connected to a unix stream socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(uid=uid, gid=gid, pid=pid, groups=supplementary_groups(pid, proc))


@dataclass(frozen=True, slots=True)
class Authority:
    """Who may do what on this node: root, the SlurmUser, and the admin group."""

    slurm_uid: int | None = None
    admin_group: str | None = None

    def is_scheduler(self, peer: Peer) -> bool:
        """prolog/epilog/ingest: only root or the configured SlurmUser."""
        return peer.uid == 0 or (self.slurm_uid is not None and peer.uid == self.slurm_uid)

    def is_admin(self, peer: Peer) -> bool:
        """Root, or a member of the policy's admin group (primary, listed or supplementary)."""
        if peer.uid == 0:
            return True
        if not self.admin_group:
            return False
        try:
            group = grp.getgrnam(self.admin_group)
        except KeyError:
            return False
        if peer.gid == group.gr_gid or group.gr_gid in peer.groups:
            return True
        return user_name(peer.uid) in group.gr_mem
