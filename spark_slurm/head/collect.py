"""Collection on the head node: fetch what is new of every node's ledger over ssh,
witness, merge.

Per node, in parallel (bounded), the head node reads the node daemon's clock
(`sparkctl status --json` over ssh, bracketed by its own clock: the skew is the
node's time minus the midpoint, give or take half the round trip), then pulls
what it lacks on the same kind of channel: `sparkctl ledger export LEDGER
--after SEQ --proof-from SIZE --out -` runs on the node (read-only, one read
snapshot: the daemon is never disturbed) and streams back a segment into
`DEST/<node>.db`. SEQ is the head's position for the node (what the cluster
ledger holds; for a witness-only run, the size the witness last cosigned, less
one), SIZE what the witness last cosigned, so the segment holds the rows since
the last merge, the node's newest checkpoint, the consistency proof from SIZE to
it and the node's key records: what is shipped follows what is new, not the
ledger's length. Only a node the head holds nothing of (and a plain fetch, with
neither witness nor merge) is shipped whole, as an SQLite online backup
(`sparkctl ledger snapshot`). The authentication is ssh's: key-based, BatchMode,
the node's host key known to the head node.

The copy is written under a temporary name and renamed, so a failed fetch
leaves the last good copy in place. A node that cannot be reached is reported
with ssh's reason and the others are collected anyway. Then each fresh copy's
newest signed checkpoint goes to the witness (a segment's with the proof and
key records it carries: the witness never needs the node's history), and all
fresh copies are merged (`NODE=PATH`, so a copy must belong to the node it came
from); merge proves a segment's first row continues the chain it holds. A node
rolled back below the witnessed size shows it in its newest checkpoint (the
witness names the ROLLBACK) and in the size the segment reports (so does
merge); one that forked ships rows that do not link to the held head (merge:
FORK) and a checkpoint no proof from the witnessed root reaches (witness: FORK).

Transports: `SshTransport` (what a site runs; the slurmctld host is collected
like any node: its ledger holds the submit-time denials) and `SharedTransport`
(each node leaves its own whole snapshot in a shared directory).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.errors import FetchError, InputError, LedgerError, SparkError
from spark_slurm.head.merge import MergeSummary, merge_ledgers, positions
from spark_slurm.head.source import open_read_only
from spark_slurm.head.witness import node_of, witness_file, witness_segment, witnessed
from spark_slurm.ledger.reader import latest_checkpoint
from spark_slurm.ledger.segment import SEGMENT_FORMAT

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_MAX_SKEW_S = 2.0
DEFAULT_PARALLEL = 16


@dataclass(frozen=True, slots=True)
class ClockReading:
    """A node daemon's clock against the head node's: node minus head, and the bound."""

    offset_ns: int
    uncertainty_ns: int

    def beyond(self, max_skew_ns: int) -> bool:
        """Skewed by more than `max_skew_ns` even at the edge of the uncertainty."""
        return abs(self.offset_ns) - self.uncertainty_ns > max_skew_ns

    def text(self) -> str:
        return f"{self.offset_ns / 1e9:+.1f} s (±{self.uncertainty_ns / 1e9:.1f} s)"


class Transport(Protocol):
    """How the head node reaches a node's ledger and daemon."""

    def fetch(self, node: str, dest: Path, after: int | None = None,
              proof_from: int | None = None) -> None:
        """Write a consistent copy of `node`'s ledger to `dest`, or with `after` a segment
        of the records past that seq (what the head lacks; a transport may still ship
        the whole ledger), carrying a consistency proof from tree size `proof_from`
        when given; FetchError when neither can be had."""
        ...

    def clock(self, node: str) -> ClockReading | None:
        """The node daemon's clock against ours; None when this transport cannot tell."""
        ...


@dataclass
class SshTransport:
    """Node ledgers over ssh: the remote side runs `sparkctl` on the node itself."""

    ssh: Sequence[str] = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
    ledger: str = "/var/lib/spark/ledger.db"
    sparkctl: str = "sparkctl"
    socket: str = "/run/spark/sparkd.sock"
    timeout_s: float = 600.0
    now_ns: Callable[[], int] = time.time_ns

    def _run(self, node: str, remote: str, stdout: Any, timeout_s: float
             ) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run([*self.ssh, node, remote], stdout=stdout,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise FetchError(node, f"no answer within {timeout_s:g} s", True) from None
        except OSError as exc:
            raise InputError(f"cannot run {self.ssh[0]}: {exc.strerror or exc}") from None

    def _failed(self, node: str, what: str, res: subprocess.CompletedProcess[bytes]
                ) -> FetchError:
        lines = res.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {res.returncode}"
        if res.returncode == 255:  # ssh's own failure: the node was never reached
            return FetchError(node, f"unreachable ({why})", True)
        return FetchError(node, f"{what} failed ({why})")

    def remote_fetch(self, after: int | None = None, proof_from: int | None = None) -> str:
        """The shell command run on the node: with `after`, export the records past it
        (and the witness's proof from `proof_from`) to stdout; without, snapshot the
        whole ledger to a private temp dir and stream it."""
        q = shlex.quote
        if after is not None:
            proof = "" if proof_from is None else f" --proof-from {int(proof_from)}"
            return (f"{q(self.sparkctl)} ledger export {q(self.ledger)} --after {int(after)}"
                    f"{proof} --out -")
        return (f'd=$(mktemp -d) || exit 1; trap \'rm -rf "$d"\' EXIT; '
                f'{q(self.sparkctl)} ledger snapshot {q(self.ledger)} "$d/ledger.db" '
                f'>/dev/null && cat "$d/ledger.db"')

    def fetch(self, node: str, dest: Path, after: int | None = None,
              proof_from: int | None = None) -> None:
        with dest.open("wb") as out:
            res = self._run(node, self.remote_fetch(after, proof_from), out, self.timeout_s)
        if res.returncode != 0:
            raise self._failed(node, "snapshot" if after is None else "export", res)

    def clock(self, node: str) -> ClockReading | None:
        remote = (f"{shlex.quote(self.sparkctl)} status --json --socket "
                  f"{shlex.quote(self.socket)}")
        before = self.now_ns()
        res = self._run(node, remote, subprocess.PIPE, min(self.timeout_s, 60.0))
        after = self.now_ns()
        if res.returncode != 0:
            raise self._failed(node, "reading sparkd's clock", res)
        try:
            node_ns = int(json.loads(res.stdout)["time_ns"])
        except (ValueError, KeyError, TypeError):
            raise FetchError(node, "sparkd's status carries no clock (time_ns)") from None
        return ClockReading(node_ns - (before + after) // 2, (after - before + 1) // 2)


@dataclass
class SharedTransport:
    """Each node writes its own snapshot to DIR/<node>.db (e.g. from its own timer)."""

    directory: Path

    def fetch(self, node: str, dest: Path, after: int | None = None,
              proof_from: int | None = None) -> None:
        try:
            shutil.copyfile(self.directory / f"{node}.db", dest)
        except OSError:
            raise FetchError(node, f"no snapshot in {self.directory}") from None

    def clock(self, node: str) -> ClockReading | None:
        return None


@dataclass
class NodeCollection:
    """What happened to one node in one collection."""

    node: str
    path: Path | None = None
    head_seq: int | None = None         # what the head node held before this collection
    after: int | None = None            # the cut asked for (None: the whole ledger)
    proof_from: int | None = None       # the witnessed size a proof was asked from
    kind: str | None = None             # what came back: "ledger" | "segment"
    rows: int = 0                       # records in what came back
    error: str | None = None
    unreachable: bool = False
    bytes: int = 0
    seconds: float = 0.0
    clock: ClockReading | None = None
    clock_error: str | None = None
    witness: str | None = None          # accepted | unchanged | no checkpoint yet
    witness_error: str | None = None

    @property
    def fetched(self) -> bool:
        return self.path is not None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "fetched": self.fetched, "path": str(self.path or "") or None,
                "head_seq": self.head_seq, "after": self.after, "proof_from": self.proof_from,
                "kind": self.kind, "rows": self.rows,
                "error": self.error, "unreachable": self.unreachable, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "clock": None if self.clock is None else {
                    "offset_ns": self.clock.offset_ns,
                    "uncertainty_ns": self.clock.uncertainty_ns},
                "clock_error": self.clock_error, "witness": self.witness,
                "witness_error": self.witness_error}


@dataclass
class CollectReport:
    """Every node's collection, plus the merge of the fresh copies (when asked for)."""

    nodes: list[NodeCollection]
    max_skew_ns: int
    merge: MergeSummary | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def node(self, name: str) -> NodeCollection:
        return next(n for n in self.nodes if n.node == name)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "max_skew_ns": self.max_skew_ns,
                "nodes": [n.to_json() for n in self.nodes],
                "merge": None if self.merge is None else self.merge.to_json()}


def read_node_list(path: Path) -> list[str]:
    """Node names, one per line; blank lines and `#` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the node list: {exc.strerror}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    return [n for n in names if n]


def check_names(nodes: Sequence[str]) -> list[str]:
    """The names, refusing ones that are not plain host names (they reach a shell)."""
    bad = [n for n in nodes if not NODE_NAME.match(n)]
    if bad:
        raise InputError(f"not a node name: {bad[0]!r} (letters, digits, '.', '_', '-')")
    if not nodes:
        raise InputError("no nodes to collect")
    return list(dict.fromkeys(nodes))


def head_positions(into: Path | None, nodes: Sequence[str]) -> dict[str, int | None]:
    """The last seq the cluster ledger holds for each node (None: nothing yet)."""
    if into is None or not into.exists():
        return {n: None for n in nodes}
    return {state.name: state.head_seq for state in positions(into, nodes)}


def witnessed_sizes(state: Path | None, nodes: Sequence[str]) -> dict[str, int | None]:
    """The size the witness last cosigned for each node (None: nothing, or two origins
    claim the node's name and a proof from either could be the wrong one)."""
    sizes: dict[str, int | None] = {n: None for n in nodes}
    if state is None:
        return sizes
    seen: dict[str, list[int]] = {}
    for cp in witnessed(state):
        seen.setdefault(node_of(cp.origin), []).append(cp.size)
    for n in nodes:
        got = seen.get(n, [])
        sizes[n] = got[0] if len(got) == 1 else None
    return sizes


def _cut(held: int | None, witnessed_size: int | None, *, merging: bool, cosign: bool
         ) -> tuple[int | None, int | None]:
    """(after, proof_from) for one node: the records past the head's position, else past
    what the witness saw (a witness-only run), else the whole ledger (None)."""
    proof_from = witnessed_size if cosign else None
    if merging:
        return held, proof_from if held is not None else None
    if cosign and witnessed_size is not None:
        return witnessed_size - 1, proof_from
    return None, None


def _describe(node: str, path: Path) -> tuple[str, int]:
    """What a fetched copy is and how many records it holds (seq bounds: O(log n))."""
    try:
        conn = open_read_only(path)  # as merge will read it
    except LedgerError:
        raise FetchError(node, "what came back is not an SQLite ledger") from None
    try:
        fmt = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        lo, hi = conn.execute("SELECT min(seq), max(seq) FROM per").fetchone()
    except sqlite3.DatabaseError as exc:
        raise FetchError(node, f"what came back is not a ledger ({exc})") from None
    finally:
        conn.close()
    kind = "segment" if fmt is not None and fmt[0] == SEGMENT_FORMAT else "ledger"
    return kind, 0 if lo is None else int(hi) - int(lo) + 1


def _fetch_one(transport: Transport, node: str, dest_dir: Path, held: int | None,
               cut: tuple[int | None, int | None]) -> NodeCollection:
    result = NodeCollection(node, head_seq=held, after=cut[0], proof_from=cut[1])
    started = time.monotonic()
    part = dest_dir / f".{node}.db.part"
    try:
        try:
            result.clock = transport.clock(node)
        except FetchError as exc:
            if exc.unreachable:
                raise
            result.clock_error = exc.reason
        transport.fetch(node, part, *cut)
        with part.open("rb") as fh:
            if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise FetchError(node, "what came back is not an SQLite ledger")
        result.kind, result.rows = _describe(node, part)
        result.bytes = part.stat().st_size
        final = dest_dir / f"{node}.db"
        os.replace(part, final)
        result.path = final
    except FetchError as exc:
        result.error = exc.reason
        result.unreachable = exc.unreachable
        part.unlink(missing_ok=True)
    result.seconds = time.monotonic() - started
    return result


def _witness(result: NodeCollection, state: Path, keys_dir: Path | None) -> None:
    assert result.path is not None
    try:
        if result.kind == "segment":
            seg = witness_segment(state, result.path, keys_dir)
            result.witness = "no checkpoint yet" if seg is None else seg.status
            return
        cp = latest_checkpoint(result.path)
        if cp is None:
            result.witness = "no checkpoint yet"
            return
        note = result.path.with_suffix(".checkpoint")
        note.write_text(cp.text)
        result.witness = witness_file(state, note, keys_dir, None, result.path).status
    except SparkError as exc:
        result.witness_error = exc.message


def collect(nodes: Sequence[str], transport: Transport, dest: Path, *,
            keys_dir: Path | None = None, witness_state: Path | None = None,
            cosign: bool = False, into: Path | None = None,
            max_skew_s: float = DEFAULT_MAX_SKEW_S, parallel: int = DEFAULT_PARALLEL
            ) -> CollectReport:
    """Collect `nodes` into `dest`; with `cosign`, witness each fresh copy's newest
    checkpoint into `witness_state`; with `into`, merge the fresh copies there
    (checked against `witness_state` when given). With either, a node already known
    ships only its records since (a segment). Never raises for one node's failure:
    every problem is listed in the report."""
    names = check_names(nodes)
    dest.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(parallel, len(names)))
    held = head_positions(into, names)
    sizes = witnessed_sizes(witness_state if cosign else None, names)
    cuts = {n: _cut(held[n], sizes[n], merging=into is not None, cosign=cosign)
            for n in names}
    with ThreadPoolExecutor(workers, thread_name_prefix="collect") as pool:
        results = list(pool.map(lambda n: _fetch_one(transport, n, dest, held[n], cuts[n]),
                                names))
    report = CollectReport(results, int(max_skew_s * 1e9))
    for r in results:
        if r.error is not None:
            report.problems.append(f"{r.node}: {r.error}")
        if r.clock is not None and r.clock.beyond(report.max_skew_ns):
            report.problems.append(f"{r.node}: clock skew {r.clock.text()} against the head "
                                   f"node (more than {max_skew_s:g} s): its PER times are off")
    fetched = [r for r in results if r.path is not None]
    if cosign:
        if witness_state is None:
            raise InputError("witnessing needs a witness state directory")
        for r in fetched:
            _witness(r, witness_state, keys_dir)
            if r.witness_error is not None:
                report.problems.append(f"{r.node}: witness refused: {r.witness_error}")
    if into is not None and fetched:
        report.merge = merge_ledgers(into, [f"{r.node}={r.path}" for r in fetched],
                                     keys_dir=keys_dir, witness_state=witness_state)
        for res in report.merge.results:
            if res.error is not None:
                report.problems.append(f"{res.node}: merge error: {res.error}")
            for f in res.findings:
                seq = "-" if f.seq is None else f.seq
                report.problems.append(f"{f.node}: merge {f.code} seq {seq}: {f.detail}")
    return report
