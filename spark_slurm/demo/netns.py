"""Network, UTS and mount namespaces that make one host look like a small cluster.

Each member (the controller `ctl`, compute nodes `n1`..`nN`) gets its own network
namespace on a private Linux bridge, its own hostname (UTS namespace) and its
own mount namespace with a private tmpfs `/run`, a private `/etc/hosts` that
names the cluster, and bind mounts the caller asks for (e.g. the node's state
directory on `/run/spark`). A holder process (`sleep infinity`) pins the UTS
and mount namespaces, so daemons can be killed and restarted without losing the
node; every daemon is started with `nsenter` into the holder's namespaces.

`ip netns exec` is never used: it remounts /sys for the namespace, which hides
/sys/fs/cgroup, and slurmd 22.05 then refuses to start. Names (netns, bridge,
veths) carry a random token and the /24 subnet is picked, under a host-wide
lock, among those no route uses yet, so clusters of several users and tests
can run side by side on one host. `down()` (also from a saved description,
for `sparkctl demo --stop DIR`) kills every process in the namespaces, then
deletes the namespaces and links it made; the mounts live only in the private
mount namespaces and go with their last process.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.errors import ServiceError

LOCK = Path("/run/lock/spark-netns.lock")
PREFIX = "spk"
HOLDER_TIMEOUT_S = 10.0
# the holder: hostname, hosts file, private /run, bind mounts "SRC DEST" from argv, then sleep
_HOLDER = r"""
set -e
echo $$ > "$1"; hostname "$2"; mount --bind "$3" /etc/hosts
mount -t tmpfs -o mode=755 spark-run /run
mkdir -p /run/sshd /run/lock
shift 3
while [ $# -ge 2 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
exec sleep infinity
"""


def unavailable_reason() -> str | None:
    """Why this host cannot run a namespaced cluster (None when it can): the tools, ssh
    between the hosts, and a throwaway network namespace made and removed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare", "mount", "ssh", "ssh-keygen", "/usr/sbin/sshd"):
        if shutil.which(tool) is None:
            return (f"{tool} not installed (make system-deps installs iproute2, util-linux, "
                    "openssh-server and openssh-client)")
    probe = f"{PREFIX}probe{os.urandom(3).hex()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                         timeout=10, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip() or 'ip netns add failed'}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                         check=False)
    if check and res.returncode != 0:
        raise ServiceError("network", f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Serialises subnet choice and bridge set-up between clusters on this host."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = []
    for text in (_ip("-4", "-o", "route", "show", "table", "all", check=False).stdout,
                 _ip("-4", "-o", "addr", "show", check=False).stdout):
        for m in re.finditer(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", text):
            with contextlib.suppress(ValueError):
                out.append(ipaddress.IPv4Network(m.group(1), strict=False))
    return out


def pick_subnet(used: Sequence[ipaddress.IPv4Network], rng: random.Random | None = None
                ) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps none of `used` (random, so that parallel pickers
    rarely even try the same one)."""
    rng = rng or random.Random()  # noqa: S311 (spreads picks; nothing secret)
    for _ in range(500):
        net = ipaddress.IPv4Network(f"10.{rng.randint(128, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise ServiceError("network", "no free 10.x.y.0/24 subnet for a cluster bridge")


@dataclass
class Member:
    """One namespaced host: its name (hostname), address and network namespace."""

    name: str
    address: str
    netns: str
    veth: str
    holder_pid: int = 0


@dataclass
class Topology:
    """The bridge, subnet and namespaced members of one cluster instance."""

    root: Path
    names: Sequence[str]
    token: str = field(default_factory=lambda: os.urandom(3).hex())
    subnet: str = ""
    members: dict[str, Member] = field(default_factory=dict)
    binds: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = f"{PREFIX}{self.token}"
        self.bridge = f"{self.prefix}br"
        self.hosts_file = self.root / "hosts"
        self._holders: list[subprocess.Popen[bytes]] = []

    @property
    def host_address(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet)[1])

    def address(self, name: str) -> str:
        return self.members[name].address

    # --------------------------------------------------------------- bring-up
    def up(self) -> Topology:
        """Bridge, one veth pair and netns per member, hosts file, holders; all or nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with _host_lock():
                net = pick_subnet(_used_networks())
                self.subnet = str(net)
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{net[1]}/{net.prefixlen}", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                member = Member(name, str(net[10 + i]), f"{self.prefix}-{name}",
                                f"{self.prefix}h{i}")
                self.members[name] = member
                self._wire(member, net.prefixlen, f"{self.prefix}p{i}")
            self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
                f"{m.address} {m.name}\n" for m in self.members.values()))
            for member in self.members.values():
                self._start_holder(member)
            (self.root / "topology.json").write_text(json.dumps(self.to_json(), indent=2))
        except BaseException:
            self.down()
            raise
        return self

    def _wire(self, member: Member, prefixlen: int, peer: str) -> None:
        _ip("netns", "add", member.netns)
        _ip("link", "add", member.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", member.netns)
        _ip("link", "set", member.veth, "master", self.bridge, "up")
        ns = ("-n", member.netns)
        _ip(*ns, "link", "set", peer, "name", "eth0")
        _ip(*ns, "addr", "add", f"{member.address}/{prefixlen}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "route", "add", "default", "via", self.host_address)

    def _start_holder(self, member: Member) -> None:
        pidfile = self.root / f"{member.name}.holder.pid"
        pidfile.unlink(missing_ok=True)
        binds = [str(x) for src, dest in self.binds.get(member.name, []) for x in (src, dest)]
        log = (self.root / f"{member.name}.holder.log").open("ab")
        with log:
            # nsenter, unshare and sh each exec the next: this child is the holder itself
            self._holders.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{member.netns}", "unshare", "--uts", "--mount",
                 "--propagation", "private", "sh", "-c", _HOLDER, "holder", str(pidfile),
                 member.name, str(self.hosts_file), *binds],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + HOLDER_TIMEOUT_S
        while time.monotonic() < deadline:
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            if text.isdigit() and self._hostname(int(text)) == member.name \
                    and _comm(int(text)) == "sleep":
                member.holder_pid = int(text)
                return
            time.sleep(0.02)
        raise ServiceError(f"{member.name} namespaces", "holder did not start",
                           str(self.root / f"{member.name}.holder.log"))

    @staticmethod
    def _hostname(pid: int) -> str:
        res = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True,
                             text=True, timeout=10, check=False)
        return res.stdout.strip()

    # ---------------------------------------------------------------- running
    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside member `name`'s network, UTS and mount namespaces."""
        pid = self.members[name].holder_pid
        return ["nsenter", "-t", str(pid), "-n", "-u", "-m", "--", *argv]

    def set_link(self, name: str, up: bool) -> None:
        """Plug or unplug a member's cable (its veth on the bridge)."""
        _ip("link", "set", self.members[name].veth, "up" if up else "down")

    # --------------------------------------------------------------- teardown
    def down(self, timeout_s: float = 10.0) -> list[str]:
        """Kill every process in our namespaces, delete the namespaces and links.
        Safe to call twice and after a failed `up`; returns what it removed."""
        removed: list[str] = []
        namespaces = [m.netns for m in self.members.values()]
        killed = _kill_in(namespaces, timeout_s)
        for holder in self._holders:  # our own children: reap them
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(timeout=timeout_s)
        self._holders.clear()
        if killed:
            removed.append(f"{len(killed)} processes")
        for ns in namespaces:
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(f"netns {ns}")
        for link in [m.veth for m in self.members.values()] + [self.bridge]:
            if _ip("link", "del", link, check=False).returncode == 0:
                removed.append(f"link {link}")
        return removed

    def leftovers(self) -> list[str]:
        """Namespaces and links of this instance that still exist (for tests and --stop)."""
        left = [ns for ns in _ip("netns", "list", check=False).stdout.split()
                if ns.startswith(self.prefix)]
        links = _ip("-o", "link", "show", check=False).stdout
        left += sorted(set(re.findall(rf"\b({re.escape(self.prefix)}\w*)[@:]", links)))
        return left

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "token": self.token, "subnet": self.subnet,
                "members": [{"name": m.name, "address": m.address, "netns": m.netns,
                             "veth": m.veth, "holder_pid": m.holder_pid}
                            for m in self.members.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        members = [Member(str(m["name"]), str(m["address"]), str(m["netns"]), str(m["veth"]),
                          int(m.get("holder_pid", 0))) for m in data.get("members", [])]
        topo = cls(Path(str(data["root"])), [m.name for m in members], str(data["token"]),
                   str(data.get("subnet", "")))
        topo.members = {m.name: m for m in members}
        return topo


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids_in(namespaces: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for ns in namespaces:
        res = _ip("netns", "pids", ns, check=False)
        pids |= {int(p) for p in res.stdout.split() if p.isdigit()}
    return pids


def _kill_in(namespaces: Sequence[str], timeout_s: float) -> set[int]:
    """TERM, then KILL, every process whose network namespace is one of ours, and wait
    until they are gone (reaped, not left as zombies of ours)."""
    first = _pids_in(namespaces)
    for pid in first:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _live(_pids_in(namespaces)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _live(_pids_in(namespaces)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while _live(first) and time.monotonic() < deadline:
        time.sleep(0.05)
    return first


def _live(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.add(pid)
    return out

