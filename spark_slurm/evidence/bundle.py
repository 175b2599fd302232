"""The evidence bundle file: one small SQLite database a third party can check offline.

docs/evidence.md specifies it byte for byte; `contrib/verify-evidence.sh` checks
it with sqlite3, sha256sum and openssl only. Tables:

- `bundle`: format, version, job id, creation time, source, issuer key name;
- `record`: the job's PERs exactly as the node stored them (the hashed bytes);
- `proof`: each record's RFC 6962 inclusion proof, step by step;
- `checkpoint`: per node, the checkpoint note signed by the node and cosigned by
  the witness that the proofs lead to;
- `key`: the Ed25519 public keys (node, witness, issuer) by signed-note name;
- `policy`: the policy snapshot(s) the decisions name, as YAML text;
- `statement`: a signed note by the issuer listing every checkpoint, record
  (with its leaf hash) and policy in the bundle, so a dropped row is caught.
"""

from __future__ import annotations

import base64
import binascii
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.errors import EvidenceError, EvidenceInvalid
from spark_slurm.ledger.checkpoint import SIG_PREFIX, note_key_hash
from spark_slurm.ledger.schema import SQLITE_MAGIC

FORMAT = "spark-slurm-evidence"
VERSION = 1
STATEMENT_HEADER = "spark-evidence/v1"

DDL = """
CREATE TABLE bundle (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE record (
    node TEXT NOT NULL, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    job_id TEXT, body BLOB NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL,
    mac BLOB, key_id TEXT, PRIMARY KEY (node, seq));
CREATE TABLE proof (node TEXT NOT NULL, seq INTEGER NOT NULL, step INTEGER NOT NULL,
    hash BLOB NOT NULL, PRIMARY KEY (node, seq, step));
CREATE TABLE checkpoint (node TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE key (name TEXT PRIMARY KEY, role TEXT NOT NULL, node TEXT,
    public_key TEXT NOT NULL);
CREATE TABLE policy (sha256 TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE statement (id INTEGER PRIMARY KEY CHECK (id = 1), text TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class BundleRecord:
    """One PER row as the node ledger stores it (hashes and MAC raw)."""

    node: str
    seq: int
    time_ns: int
    kind: str
    job_id: str | None
    body: bytes
    prev_hash: bytes
    hash: bytes
    mac: bytes | None
    key_id: str | None


@dataclass(frozen=True, slots=True)
class BundleKey:
    """A public key under its signed-note name; role node, witness or issuer."""

    name: str
    role: str
    node: str | None
    public_b64: str


@dataclass(frozen=True, slots=True)
class Bundle:
    """Everything in a bundle file, as read (nothing verified yet)."""

    meta: dict[str, str]
    records: list[BundleRecord]
    proofs: dict[tuple[str, int], list[bytes]]
    checkpoints: dict[str, str]
    keys: list[BundleKey]
    policies: dict[str, str]
    statement: str

    @property
    def job_id(self) -> str:
        return self.meta.get("job_id", "")


@dataclass(frozen=True, slots=True)
class StatementCheckpoint:
    node: str
    origin: str
    size: int
    root_b64: str


@dataclass(frozen=True, slots=True)
class Statement:
    """The parsed body of the issuer's signed statement."""

    job_id: str
    created_ns: int
    checkpoints: list[StatementCheckpoint]
    records: list[tuple[str, int, str]]  # node, seq, leaf hash (hex)
    policies: list[str]


def statement_body(job_id: str, created_ns: int, checkpoints: list[StatementCheckpoint],
                   records: list[tuple[str, int, str]], policies: list[str]) -> str:
    """The statement's signed text: one fact per line, each ending in a newline."""
    lines = [STATEMENT_HEADER, f"job {job_id}", f"created {created_ns}"]
    lines += [f"checkpoint {c.node} {c.origin} {c.size} {c.root_b64}" for c in checkpoints]
    lines += [f"record {node} {seq} {leaf}" for node, seq, leaf in records]
    lines += [f"policy {sha}" for sha in policies]
    return "".join(line + "\n" for line in lines)


def sign_note(body: str, name: str, key: Ed25519PrivateKey) -> str:
    """A C2SP signed note: the body, a blank line, one Ed25519 signature line."""
    blob = note_key_hash(name, key.public_key()) + key.sign(body.encode())
    return f"{body}\n{SIG_PREFIX}{name} {base64.b64encode(blob).decode()}\n"


def parse_statement(text: str) -> Statement:
    """The statement's body as data; EvidenceInvalid("statement", ...) when malformed."""
    body, sep, _ = text.partition("\n\n")
    lines = body.split("\n")
    if not sep or not lines or lines[0] != STATEMENT_HEADER:
        raise EvidenceInvalid("statement", f"not a {STATEMENT_HEADER} signed note")
    job = created = None
    cps: list[StatementCheckpoint] = []
    records: list[tuple[str, int, str]] = []
    policies: list[str] = []
    for number, line in enumerate(lines[1:], 2):
        word, _, rest = line.partition(" ")
        parts = rest.split(" ")
        try:
            if word == "job" and len(parts) == 1:
                job = parts[0]
            elif word == "created" and len(parts) == 1:
                created = int(parts[0])
            elif word == "checkpoint" and len(parts) == 4:
                cps.append(StatementCheckpoint(parts[0], parts[1], int(parts[2]), parts[3]))
            elif word == "record" and len(parts) == 3 and len(parts[2]) == 64:
                records.append((parts[0], int(parts[1]), parts[2]))
            elif word == "policy" and len(parts) == 1 and len(parts[0]) == 64:
                policies.append(parts[0])
            else:
                raise ValueError(line)
        except ValueError:
            raise EvidenceInvalid("statement", f"line {number} is not understood: "
                                  f"{line[:80]!r}") from None
    if job is None or created is None:
        raise EvidenceInvalid("statement", "names no job or no creation time")
    return Statement(job, created, cps, records, policies)


def write_bundle(path: Path, bundle: Bundle) -> None:
    """Write a new bundle file at `path` (which must not exist)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.executescript(DDL)
            conn.executemany("INSERT INTO bundle VALUES (?, ?)", sorted(bundle.meta.items()))
            conn.executemany("INSERT INTO record VALUES (?,?,?,?,?,?,?,?,?,?)", [
                (r.node, r.seq, r.time_ns, r.kind, r.job_id, r.body, r.prev_hash, r.hash,
                 r.mac, r.key_id) for r in bundle.records])
            conn.executemany("INSERT INTO proof VALUES (?,?,?,?)", [
                (node, seq, step, h) for (node, seq), hashes in sorted(bundle.proofs.items())
                for step, h in enumerate(hashes)])
            conn.executemany("INSERT INTO checkpoint VALUES (?, ?)",
                             sorted(bundle.checkpoints.items()))
            conn.executemany("INSERT INTO key VALUES (?,?,?,?)", [
                (k.name, k.role, k.node, k.public_b64) for k in bundle.keys])
            conn.executemany("INSERT INTO policy VALUES (?, ?)", sorted(bundle.policies.items()))
            conn.execute("INSERT INTO statement VALUES (1, ?)", (bundle.statement,))
    finally:
        conn.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bundle(path: Path) -> Bundle:
    """Read a bundle file; EvidenceError when it is not one (nothing is verified here)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise EvidenceError(f"{path}: cannot read bundle: {exc.strerror or exc}") from None
    if magic != SQLITE_MAGIC:
        raise EvidenceError(f"{path}: not an evidence bundle (not an SQLite database)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM bundle").fetchall())
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise EvidenceError(f"{path}: not a version {VERSION} {FORMAT} bundle")
        records = [BundleRecord(str(n), int(s), int(t), str(k), j, bytes(b), bytes(p),
                                bytes(h), None if m is None else bytes(m), kid)
                   for n, s, t, k, j, b, p, h, m, kid in conn.execute(
                       "SELECT node, seq, time_ns, kind, job_id, body, prev_hash, hash, mac,"
                       " key_id FROM record ORDER BY node, seq")]
        proofs: dict[tuple[str, int], list[bytes]] = {}
        for node, seq, h in conn.execute("SELECT node, seq, hash FROM proof "
                                         "ORDER BY node, seq, step"):
            proofs.setdefault((str(node), int(seq)), []).append(bytes(h))
        checkpoints = {str(n): str(t) for n, t in conn.execute("SELECT node, text FROM "
                                                               "checkpoint")}
        keys = [BundleKey(str(n), str(r), d, str(p)) for n, r, d, p in conn.execute(
            "SELECT name, role, node, public_key FROM key ORDER BY name")]
        policies = {str(s): str(t) for s, t in conn.execute("SELECT sha256, text FROM policy")}
        row = conn.execute("SELECT text FROM statement WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise EvidenceError(f"{path}: not an evidence bundle ({exc})") from None
    finally:
        conn.close()
    if row is None:
        raise EvidenceError(f"{path}: bundle has no statement")
    return Bundle(meta, records, proofs, checkpoints, keys, policies, str(row[0]))


def key_raw(key: BundleKey) -> bytes:
    """The 32 raw bytes of a bundle key, or EvidenceInvalid naming the key."""
    try:
        raw = base64.b64decode(key.public_b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise EvidenceInvalid(f"key {key.name}", "not a base64 32-byte Ed25519 public key")
    return raw
