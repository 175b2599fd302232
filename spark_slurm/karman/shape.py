"""Frame-shape cache: read a Karman frame without walking protobuf objects.

A publisher sends the same message shape every cycle: same streams, same fields,
same tags and lengths; only the scalar values change. Walking upb message objects
costs ~3x the C parse itself, so the decoder learns a frame's shape once (from a
frame that upb has already parsed and the generic walk has read) and then reads
later frames of that shape with one masked compare and one `struct` unpack.

Why this is exact: a shape fixes every byte of the frame except float payloads
(any 4 bytes are a valid fixed32) and the low 7 bits of each varint value byte
(the continuation bits are fixed, so every varint keeps its length). A frame that
matches therefore has the very same tags, lengths, names and field presence as
the learned frame, which upb accepted, so upb would accept it too and read the
same tree with the new values. Anything unusual (unknown or repeated fields,
both oneof members, varints longer than 9 bytes, absent real power) is simply
not learned; such frames keep going through the generic path.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable
from operator import itemgetter
from typing import Any, cast

from spark_slurm.karman.ring import Layout, Summary

_VARINT, _LEN, _I32 = 0, 2, 5
_MAX_VALUE_VARINT = 9  # <= 63 bits: no 64-bit truncation to reproduce

# message -> field number -> (wire type, child message or value role)
_SCHEMA: dict[str, dict[int, tuple[int, str]]] = {
    "joined": {1: (_LEN, "wrapper")},
    "wrapper": {1: (_LEN, "name"), 2: (_LEN, "two"), 3: (_LEN, "fft")},
    "two": {1: (_LEN, "phase"), 2: (_LEN, "phase")},
    "phase": {1: (_LEN, "prov"), 2: (_LEN, "wave"), 3: (_LEN, "wave"), 4: (_LEN, "power")},
    "prov": {1: (_LEN, "ts"), 2: (_VARINT, "seq")},
    "ts": {1: (_VARINT, "sec"), 2: (_VARINT, "nanos")},
    "wave": {1: (_I32, "float"), 2: (_I32, "float")},
    "power": {1: (_I32, "real"), 2: (_I32, "float"), 3: (_I32, "float"), 4: (_I32, "float")},
}
_OPAQUE = ("name", "fft")  # compared byte for byte, never read here


class _Decline(Exception):
    """The frame is valid but not a shape this cache handles."""


# A parsed message: field -> (value offset, value length, child node or None).
Node = dict[int, tuple[int, int, Any]]


class _Scanner:
    """Parses one frame against _SCHEMA, noting where the variable bytes are."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.free: list[tuple[int, int, int]] = []  # (offset, length, mask byte)

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise _Decline
            byte = self.frame[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7

    def message(self, kind: str, pos: int, end: int) -> Node | list[Node]:
        schema = _SCHEMA[kind]
        node: Node = {}
        repeated: list[Node] = []
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if number not in schema or schema[number][0] != wire:
                raise _Decline
            child = schema[number][1]
            start = pos
            if wire == _VARINT:
                _, pos = self.varint(pos, end)
                if pos - start > _MAX_VALUE_VARINT:
                    raise _Decline
                self.free.append((start, pos - start, 0x80))
                value: Any = None
            elif wire == _I32:
                pos += 4
                self.free.append((start, 4, 0x00))
                value = None
            else:
                size, start = self.varint(pos, end)
                pos = start + size
                value = None if child in _OPAQUE else self.message(child, start, pos)
            if pos > end:
                raise _Decline
            if kind == "joined":
                assert isinstance(value, dict)
                repeated.append(value)
            elif number in node:
                raise _Decline  # repeated singular field: upb merges, we do not
            else:
                node[number] = (start, pos - start, value)
        return repeated if kind == "joined" else node


# Value bits of a 2-byte little-endian varint chunk: a varint is read as "H" pairs
# (plus a final "B") by the frame's Struct, then joined 14 bits at a time.
_PAIR = array("H", ((h & 0x7F) | (h >> 8 & 0x7F) << 7 for h in range(0x10000)))
Reader = Callable[[tuple[Any, ...]], int]


def _varint_reader(slot: int, size: int) -> Reader:
    """Reads a `size`-byte varint whose chunks start at `slot` in the unpacked tuple."""
    pair, s = _PAIR, slot
    if size == 1:
        return lambda got: got[s]
    if size == 2:
        return lambda got: pair[got[s]]
    if size == 3:
        return lambda got: pair[got[s]] + (got[s + 1] << 14)
    if size == 4:
        return lambda got: pair[got[s]] + (pair[got[s + 1]] << 14)
    if size == 5:
        return lambda got: (pair[got[s]] + (pair[got[s + 1]] << 14)
                            + (got[s + 2] << 28))

    def read(got: tuple[Any, ...]) -> int:
        value = 0
        for k in range(size // 2):
            value += pair[got[s + k]] << 14 * k
        if size % 2:
            value += got[s + size // 2] << 14 * (size // 2)
        return value
    return read


def _zero(got: tuple[Any, ...]) -> int:
    return 0


class Shape:
    """One learned frame shape: what must match, and where its values sit."""

    __slots__ = ("bits", "layout", "length", "mask", "missing_b", "nanos", "sec", "seq",
                 "single", "unpack", "values")

    def __init__(self, *, length: int, mask: int, bits: int,
                 unpack: Callable[[bytes], tuple[Any, ...]], sec: Reader, nanos: Reader,
                 seq: Reader | None, values: Callable[[tuple[Any, ...]], Any], single: bool,
                 layout: Layout, missing_b: int) -> None:
        self.length, self.mask, self.bits, self.unpack = length, mask, bits, unpack
        self.sec, self.nanos, self.seq = sec, nanos, seq  # seq None: no sequence number
        self.values, self.single = values, single  # single: `values` gives one float
        self.layout, self.missing_b = layout, missing_b

    def read(self, frame: bytes) -> tuple[int, int | None, Summary]:
        """(time_ns, seq, summary) of a frame known to match this shape."""
        got = self.unpack(frame)
        nanos = self.nanos(got) & 0xFFFFFFFF  # int32, as upb truncates it
        if nanos & 0x8000_0000:
            nanos -= 0x1_0000_0000
        seq = None if self.seq is None else self.seq(got)
        values = (self.values(got),) if self.single else self.values(got)
        total = sum(values)
        if not math.isfinite(total):  # any NaN/inf value makes the sum non-finite
            raise ValueError("non-finite real power")
        return (self.sec(got) * 1_000_000_000 + nanos, seq,
                (round(total * 1000), self.layout, values))

    def matches(self, frame: bytes) -> bool:
        """True when the frame has this shape (only its free value bits differ)."""
        return len(frame) == self.length and \
            int.from_bytes(frame, "little") & self.mask == self.bits


def _child(node: Node, number: int) -> Node:
    entry = node.get(number)
    return {} if entry is None else cast(Node, entry[2])


def learn(frame: bytes, offset: int, intern: Callable[[tuple[str, ...]], Layout],
          both_phases: bool = False) -> Shape | None:
    """The shape of a frame whose payload (from `offset`) upb has accepted; None if unsupported.

    The shape reads phase_a's real power of every stream, and phase_b's too when
    `both_phases` (two-phase meters); a phase that does not count is not read.
    """
    scan = _Scanner(frame)
    try:
        wrappers = scan.message("joined", offset, len(frame))
    except (_Decline, IndexError):
        return None
    assert isinstance(wrappers, list)
    try:
        return _semantics(frame, scan, wrappers, intern, both_phases)
    except (_Decline, UnicodeDecodeError):
        return None


def _semantics(frame: bytes, scan: _Scanner, wrappers: list[Node],
               intern: Callable[[tuple[str, ...]], Layout], both_phases: bool) -> Shape | None:
    """Which of the scanned values are time, sequence and real power, as upb would read them."""
    wanted: list[tuple[int, str]] = []  # (offset, struct code) of the values read
    names: list[str] = []
    reals: list[int] = []
    time_at: dict[str, int] = {}
    missing_b = 0
    for wrapper in wrappers:
        if 2 in wrapper and 3 in wrapper:
            return None  # both oneof members: the later one wins in upb
        if 2 not in wrapper:
            continue
        two = wrapper[2][2]
        phases = [two.get(1), two.get(2)]
        if phases[1] is None:
            missing_b += 1
        if not names:  # time and sequence come from the first stream's phase_a
            prov = _child(_child(two, 1), 1)  # absent messages read as empty
            ts = _child(prov, 1)
            for role, entry in (("sec", ts.get(1)), ("nanos", ts.get(2)), ("seq", prov.get(2))):
                if entry is not None:
                    time_at[role] = len(wanted)
                    wanted.append((entry[0], f"v{entry[1]}"))
        counted_b = both_phases and phases[1] is not None
        for k, phase in enumerate(phases):
            if k == 1 and not counted_b:
                continue
            power = phase[2].get(4) if phase is not None else None
            real = power[2].get(1) if power is not None else None
            if real is None:
                return None  # absent real power reads as 0.0; left to the generic path
            reals.append(len(wanted))
            wanted.append((real[0], "f"))
        name = wrapper.get(1)
        label = frame[name[0]:name[0] + name[1]].decode() if name is not None else ""
        names.append(label + "\0b" if counted_b else label)
    if not names:
        return None
    return _build(frame, scan.free, wanted=wanted, reals=reals, time_at=time_at,
                  layout=intern(tuple(names)), missing_b=missing_b)


def _build(frame: bytes, free: list[tuple[int, int, int]], *, wanted: list[tuple[int, str]],
           reals: list[int], time_at: dict[str, int], layout: Layout, missing_b: int) -> Shape:
    mask = bytearray(b"\xff" * len(frame))
    for start, size, keep in free:
        mask[start:start + size] = bytes([keep]) * size
    # Read the wanted values in offset order with one Struct, then reorder.
    order = sorted(range(len(wanted)), key=lambda i: wanted[i][0])
    fmt, pos = ["<"], 0
    slot: dict[int, int] = {}
    nslots = 0
    for i in order:
        start, code = wanted[i]
        slot[i] = nslots
        if code == "f":
            fmt.append(f"{start - pos}xf")
            pos, nslots = start + 4, nslots + 1
        else:
            size = int(code[1:])
            fmt.append(f"{start - pos}x" + "H" * (size // 2) + "B" * (size % 2))
            pos, nslots = start + size, nslots + (size + 1) // 2
    sizes = {role: int(wanted[i][1][1:]) for role, i in time_at.items()}

    def reader(role: str) -> Reader | None:
        return _varint_reader(slot[time_at[role]], sizes[role]) if role in time_at else None

    mask_int = int.from_bytes(mask, "little")
    return Shape(
        length=len(frame), mask=mask_int, bits=int.from_bytes(frame, "little") & mask_int,
        unpack=struct.Struct("".join(fmt)).unpack_from,
        sec=reader("sec") or _zero, nanos=reader("nanos") or _zero, seq=reader("seq"),
        values=itemgetter(*(slot[i] for i in reals)), single=len(reals) == 1,
        layout=layout, missing_b=missing_b)
