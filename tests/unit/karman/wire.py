"""A hand-written protobuf wire encoder/decoder, independent of the generated bindings.

Interop tests build frames with this from the published field numbers and check
that our subscriber reads every field, and decode our frames with it.
"""

from __future__ import annotations

import struct
from typing import Any


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def field_float(num: int, value: float) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<f", value)


def field_bytes(num: int, data: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(data)) + data


def phase(*, seconds: int, nanos: int, seq: int | None, v_rms: float, v_dc: float,
          i_rms: float, i_dc: float, real: float, apparent: float, reactive: float,
          pf: float) -> bytes:
    ts = field_varint(1, seconds) + field_varint(2, nanos)
    prov = field_bytes(1, ts) + (field_varint(2, seq) if seq is not None else b"")
    volt = field_float(1, v_rms) + field_float(2, v_dc)
    amp = field_float(1, i_rms) + field_float(2, i_dc)
    power = (field_float(1, real) + field_float(2, apparent) + field_float(3, reactive)
             + field_float(4, pf))
    return (field_bytes(1, prov) + field_bytes(2, volt) + field_bytes(3, amp)
            + field_bytes(4, power))


def wrapper(name: str, phase_a: bytes, phase_b: bytes | None) -> bytes:
    two = field_bytes(1, phase_a) + (field_bytes(2, phase_b) if phase_b is not None else b"")
    return field_bytes(1, name.encode()) + field_bytes(2, two)


def joined(*wrappers: bytes) -> bytes:
    return b"".join(field_bytes(1, w) for w in wrappers)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def parse(data: bytes) -> list[tuple[int, Any]]:
    """Fields of one message as (number, value): ints, floats (fixed32) or raw bytes."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        num, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(data, pos)
            out.append((num, value))
        elif kind == 5:
            out.append((num, struct.unpack_from("<f", data, pos)[0]))
            pos += 4
        elif kind == 2:
            size, pos = _read_varint(data, pos)
            out.append((num, data[pos:pos + size]))
            pos += size
        else:
            raise ValueError(f"unexpected wire type {kind}")
    return out


def get(data: bytes, *path: int) -> list[Any]:
    """Every value at a field-number path, e.g. get(msg, 1, 2, 1, 4, 1)."""
    values: list[Any] = [data]
    for num in path:
        values = [v for d in values for n, v in parse(d) if n == num]
    return values
