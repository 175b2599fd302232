"""Forward-secure HMAC: one key per epoch, each derived from the last, old ones erased.

K[e+1] = HMAC-SHA256(K[e], "spark-ledger epoch"). The writer holds only the
current epoch's key, so a node compromised today cannot forge yesterday's MACs;
a verifier holding K[0] derives any K[e]. A record's MAC is
HMAC-SHA256(K[e], record hash (32 raw bytes)) and its key id is "<hmac id>:<e>".
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

EPOCH_LABEL = b"spark-ledger epoch"


def next_key(key: bytes) -> bytes:
    """The following epoch's key."""
    return hmac.digest(key, EPOCH_LABEL, "sha256")


def mac(key: bytes, record_hash: bytes) -> bytes:
    """MAC of one record: HMAC-SHA256 over its 32-byte hash."""
    return hmac.digest(key, record_hash, "sha256")


def key_id(hmac_id: str, epoch: int) -> str:
    return f"{hmac_id}:{epoch}"


def parse_key_id(value: str) -> tuple[str, int] | None:
    """Split "<hmac id>:<epoch>"; None when it is not that shape."""
    hid, sep, epoch = value.partition(":")
    if not sep or not hid or not epoch.isdigit() or (epoch != "0" and epoch.startswith("0")):
        return None
    return hid, int(epoch)


def reachable(epoch: int, seq: int) -> bool:
    """Whether a record at `seq` can be in `epoch`: every epoch after 0 begins after
    a seal record, so no record's epoch exceeds its seq. Checked before deriving an
    epoch key from a record's key id, which the hash does not cover: an edited id
    naming epoch 10**12 would otherwise cost 10**12 derivations."""
    return 0 <= epoch <= seq


class EpochKeys:
    """Derives epoch keys from K[0] on demand for a verifier, caching as it goes."""

    def __init__(self, k0: bytes) -> None:
        self._keys = [k0]

    def key(self, epoch: int) -> bytes:
        while len(self._keys) <= epoch:
            self._keys.append(next_key(self._keys[-1]))
        return self._keys[epoch]


def epoch_of(time_ns: int, origin_ns: int, epoch_ns: int) -> int:
    """Epoch number of an instant; time before the origin belongs to epoch 0."""
    return max(0, (time_ns - origin_ns) // epoch_ns)


def mac_function(key: bytes) -> Callable[[bytes], bytes]:
    """`mac` with the key fixed: the padded key blocks are hashed once, so each MAC
    is two short hash finishes instead of a full HMAC setup. Same bytes as `mac`."""
    block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def fixed(message: bytes) -> bytes:
        i = inner.copy()
        i.update(message)
        o = outer.copy()
        o.update(i.digest())
        return o.digest()

    return fixed
