"""The paths an installation's files refer to, and filling them into the templates.

A template names what differs between installations with `@NAME@` placeholders:
where the console scripts are (a venv's bin/, e.g. /opt/spark/bin), the
interpreter and the directory holding `spark_slurm/` (the hook wrappers run the
stdlib-only hook from there), the prefix's libexec and doc directories, and the
addresses sparkd may talk to besides localhost. `Layout.current()` reads them off
the running interpreter, so the files written agree with the package that wrote
them; an unknown placeholder is an error rather than text left in a unit.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from spark_slurm.errors import InputError

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# IPAddressAllow= keywords systemd accepts besides addresses and prefixes
_IP_KEYWORDS = ("localhost", "link-local", "multicast", "any")
HOOK_CONFIG = Path("/etc/spark/hook.json")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def allowed_address(text: str) -> str:
    """One IPAddressAllow= entry, checked: an address, a prefix, or a systemd keyword."""
    value = text.strip()
    if value in _IP_KEYWORDS:
        return value
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise InputError(f"--allow-ip {text!r}: not an IP address or prefix "
                         f"(nor one of {', '.join(_IP_KEYWORDS)})") from None


@dataclass(frozen=True, slots=True)
class Layout:
    """Absolute paths (as the installed host sees them) that templates are filled with."""

    bindir: Path
    python: Path
    pkgdir: Path
    prefix: Path = Path("/usr/local")
    hook_config: Path = HOOK_CONFIG
    allow_ips: tuple[str, ...] = ()

    @classmethod
    def current(cls, prefix: Path = Path("/usr/local"),
                allow_ips: tuple[str, ...] = ()) -> Layout:
        """This interpreter's environment: its scripts dir, itself, and our package's parent."""
        if not prefix.is_absolute():
            raise InputError(f"--prefix {prefix}: must be an absolute path")
        package = Path(__file__).resolve().parents[1]
        return cls(bindir=Path(sysconfig.get_path("scripts")), python=Path(sys.executable),
                   pkgdir=package.parent, prefix=prefix,
                   allow_ips=tuple(allowed_address(a) for a in allow_ips))

    @property
    def libexecdir(self) -> Path:
        return self.prefix / "libexec" / "spark"

    @property
    def sharedir(self) -> Path:
        return self.prefix / "share" / "spark-slurm"

    @property
    def docdir(self) -> Path:
        return self.prefix / "share" / "doc" / "spark-slurm"

    def values(self) -> dict[str, str]:
        """Placeholder name -> text."""
        return {
            "BINDIR": str(self.bindir),
            "SPARKD": str(self.bindir / "sparkd"),
            "SPARKCTL": str(self.bindir / "sparkctl"),
            "PATH": f"{self.bindir}:{SYSTEM_PATH}",
            "PYTHON": str(self.python),
            "PKGDIR": str(self.pkgdir),
            "HOOK_CONFIG": str(self.hook_config),
            "LIBEXECDIR": str(self.libexecdir),
            "DOCDIR": str(self.docdir),
            "IP_ALLOW": " ".join(("localhost", *self.allow_ips)),
        }

    def target(self, pattern: str) -> Path:
        """An entry's target as an absolute path on the installed host."""
        text = pattern.format(share=str(self.sharedir).lstrip("/"),
                              doc=str(self.docdir).lstrip("/"),
                              libexec=str(self.libexecdir).lstrip("/"))
        return Path("/") / text


def render(text: str, values: dict[str, str], name: str) -> str:
    """Fill every @NAME@ in `text`; an unknown one is an error naming the file."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if unknown:
        raise InputError(f"{name}: unknown install placeholder @{unknown[0]}@")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
