"""ssh between the hosts of a namespaced cluster: what the head node collects ledgers over.

Everything is made in the cluster's directory, nothing in /etc/ssh or ~/.ssh:
one Ed25519 host key per host, one head-node client key, an authorized_keys
file that lets only that key in (`restrict`: commands, no pty or forwarding), a
known_hosts file naming every host by name and address (so the client checks
host keys strictly), a client config for `ssh -F`, and one `sshd -D` per host,
listening on port 22 of its own network namespace.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from spark_slurm.demo.services import ServiceGroup, wait_for
from spark_slurm.errors import ServiceError

SSHD = "/usr/sbin/sshd"   # sshd refuses to run unless started by its absolute path


def _keygen(path: Path, comment: str) -> str:
    """A new Ed25519 key pair at `path` (+ .pub); returns the public key line."""
    if not path.exists():
        res = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                              "-f", str(path)], capture_output=True, text=True, timeout=30,
                             check=False)
        if res.returncode != 0:
            raise ServiceError("ssh-keygen", res.stderr.strip() or "failed")
    return path.with_name(path.name + ".pub").read_text().strip()


class ClusterSsh:
    """Keys, configs and sshd processes for the hosts `addresses` (name -> IP)."""

    def __init__(self, root: Path, addresses: Mapping[str, str]) -> None:
        self.root = root
        self.addresses = dict(addresses)
        self.head_key = root / "head_ed25519"
        self.authorized = root / "authorized_keys"
        self.known_hosts = root / "known_hosts"
        self.client_config = root / "ssh_config"

    @property
    def command(self) -> list[str]:
        """The ssh client command the head node's collection uses."""
        return ["ssh", "-F", str(self.client_config)]

    def host_dir(self, name: str) -> Path:
        return self.root / name

    def build(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        head = _keygen(self.head_key, "spark-head")
        self.authorized.write_text(f"restrict {head}\n")
        known = []
        for name, address in self.addresses.items():
            d = self.host_dir(name)
            d.mkdir(mode=0o700, exist_ok=True)
            host = _keygen(d / "ssh_host_ed25519_key", f"root@{name}")
            known.append(f"{name},{address} {' '.join(host.split()[:2])}\n")
            (d / "sshd_config").write_text("\n".join([
                "Port 22", f"ListenAddress {address}",
                f"HostKey {d / 'ssh_host_ed25519_key'}", f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {self.authorized}",
                "StrictModes no",   # the cluster dir sits under a world-writable /tmp
                "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password", "PrintMotd no", "PrintLastLog no",
                "UseDNS no", "LogLevel INFO", "Subsystem sftp internal-sftp", ""]))
        self.known_hosts.write_text("".join(known))
        self.client_config.write_text("\n".join([
            "Host *", "  User root", f"  IdentityFile {self.head_key}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}", "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes", "  BatchMode yes", "  ConnectTimeout 4",
            "  ServerAliveInterval 5", "  ServerAliveCountMax 2", "  LogLevel ERROR", ""]))

    def start(self, services: ServiceGroup, in_ns: Callable[[str, Sequence[str]], list[str]],
              names: Sequence[str] | None = None, timeout_s: float = 30.0) -> None:
        """One sshd per host, then wait until each accepts connections."""
        wanted = list(names or self.addresses)
        for name in wanted:
            services.start(f"sshd-{name}", in_ns(name, [
                SSHD, "-D", "-e", "-f", str(self.host_dir(name) / "sshd_config")]))
        for name in wanted:
            if not wait_for(lambda a=self.addresses[name]: _listening(a, 22),  # type: ignore[misc]
                            timeout_s, 0.05):
                raise ServiceError(f"sshd-{name}", f"not listening after {timeout_s:.0f}s",
                                   str(services.log_dir / f"sshd-{name}.log"))


def _listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0
