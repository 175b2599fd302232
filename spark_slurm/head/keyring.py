"""The head node's trust store: each node's public key and, optionally, its HMAC K[0].

A directory of `<node>.pub` (Ed25519 SubjectPublicKeyInfo PEM, the node's
`node.pub`) and `<node>.hmac` (the node's `hmac.key`, mode 0600). A node with
neither file is unknown to the head node, and its records are not merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spark_slurm.errors import HeadDbError
from spark_slurm.ledger.keys import load_hmac_key, load_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass
class KeyRing:
    directory: Path
    _public: dict[str, Ed25519PublicKey | None] = field(default_factory=dict)
    _hmac: dict[str, bytes | None] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> KeyRing:
        if not directory.is_dir():
            raise HeadDbError(f"{directory}: keys directory does not exist")
        return cls(directory)

    def knows(self, node: str) -> bool:
        return (self.directory / f"{node}.pub").exists() or \
            (self.directory / f"{node}.hmac").exists()

    def public(self, node: str) -> Ed25519PublicKey | None:
        """The node's Ed25519 public key, or None when the directory has none."""
        if node not in self._public:
            path = self.directory / f"{node}.pub"
            self._public[node] = load_public_key(path) if path.exists() else None
        return self._public[node]

    def hmac(self, node: str) -> bytes | None:
        """The node's HMAC K[0], or None when the directory has none."""
        if node not in self._hmac:
            path = self.directory / f"{node}.hmac"
            self._hmac[node] = load_hmac_key(path) if path.exists() else None
        return self._hmac[node]
