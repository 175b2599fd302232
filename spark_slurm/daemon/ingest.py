"""Ingest of the two append-only JSON Lines files other programs leave for sparkd.

The hook's fallback journal (requests made while the daemon was unreachable) and
the controller's denial spool (job_submit.lua rejections) are read from a
byte-offset cursor kept in the state dir with the file's inode, so rotation or
truncation starts over and nothing is read twice. Each PER carries the line's
inode and offset; on start the ledger's newest such PER wins over a cursor file
that a crash left behind, which makes ingest idempotent. A torn last line waits
for its newline; a malformed line becomes a `reject` PER and ingest goes on.
The hook starts every entry with a newline, so a line torn by a full disk ends
before the next entry (it is recorded as malformed) and blank lines are skipped.
The hook's reserve journal (reserve.py) is read the same way, up to its first
NUL byte, under its lock.

A journaled prolog applies its cap late only when the job can still be running
here: not when the hook failed closed (Slurm requeued the job, it did not run),
not when the job's epilog is journaled too, and not when the ledger already
holds the job's restore. Each of those is a `reject` PER instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from spark_slurm.daemon.contracts import LedgerLike
from spark_slurm.daemon.diskspace import is_disk_full
from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.pipeline import Origin
from spark_slurm.daemon.requests import Request, request_from
from spark_slurm.daemon.reserve import Reserve, content_end
from spark_slurm.daemon.state import last_action
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import BadRequest

log = logging.getLogger("sparkd.ingest")

MAX_LINE = 1 << 20

Handle = Callable[[Request, Peer, Origin], dict[str, Any]]
HookFailed = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Cursor:
    inode: int
    offset: int


class CursorFile:
    """A (inode, offset) pair, replaced atomically; `secure` gives a new file its mode."""

    def __init__(self, path: Path, secure: Callable[[Path], None] | None = None) -> None:
        self.path = path
        self.secure = secure

    def load(self) -> Cursor | None:
        try:
            data = json.loads(self.path.read_text())
            return Cursor(int(data["inode"]), int(data["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, cursor: Cursor) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"inode": cursor.inode, "offset": cursor.offset}))
        if self.secure is not None:
            self.secure(tmp)
        os.replace(tmp, self.path)


def ledger_cursor(ledger: LedgerLike, source: str, kinds: list[str],
                  path: Path | None = None) -> Cursor | None:
    """The end of the last line already recorded from `source` (from the file at
    `path`, when given: the journal and its reserve share a source), per the ledger:
    its newest PER from that source, which the ledger keeps a pointer to (start-up
    must not read a year of history to find it).

    When that PER came from the other file of the source, None: files are ingested
    one after the other and each line's cursor is saved once its PER is durable, so
    only the file of the newest PER can have a cursor file that lags the ledger."""
    record = ledger.latest_ingested(source)
    if record is None or record.kind not in kinds:
        return None
    body = record.body
    if body.get("source") != source or not isinstance(body.get(source), dict):
        return None
    where = body[source]
    if path is not None and where.get("path") not in (None, str(path)):
        return None
    if "inode" in where and "end" in where:
        return Cursor(int(where["inode"]), int(where["end"]))
    return None


class LineFile:
    """Reads complete new lines of one JSON Lines file from its cursor."""

    def __init__(self, path: Path, cursor_file: CursorFile, start: Cursor | None) -> None:
        self.path = path
        self.cursor_file = cursor_file
        saved = cursor_file.load()
        if start is not None and (saved is None or saved.inode != start.inode
                                  or saved.offset < start.offset):
            saved = start
        self.cursor = saved

    def _start(self, inode: int, size: int) -> int:
        """Where to read from: the cursor, or the top of a rotated/truncated file."""
        if self.cursor is not None and self.cursor.inode == inode and self.cursor.offset <= size:
            return self.cursor.offset
        if self.cursor is not None:
            log.warning("%s was rotated or truncated; reading from the start", self.path)
        return 0

    def lines(self) -> list[tuple[int, int, int, bytes]]:
        """(inode, offset, end, line) for each complete line past the cursor."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as fh:
            return self._scan(fh, os.fstat(fh.fileno()))

    def _scan(self, fh: BinaryIO, st: os.stat_result) -> list[tuple[int, int, int, bytes]]:
        offset = self._start(st.st_ino, st.st_size)
        fh.seek(offset)
        out = []
        while True:
            line = fh.readline(MAX_LINE)
            if not line or not line.endswith(b"\n"):
                if len(line) >= MAX_LINE:  # an absurd line: skip past it as one record
                    out.append((st.st_ino, offset, offset + len(line), line))
                    offset += len(line)
                    continue
                break  # torn last line: wait for the writer to finish it
            out.append((st.st_ino, offset, offset + len(line), line.rstrip(b"\n")))
            offset += len(line)
        return out

    def advance(self, inode: int, end: int) -> None:
        self.cursor = Cursor(inode, end)
        self.cursor_file.save(self.cursor)


class ReserveLines(LineFile):
    """The reserve journal: its lines end at the first NUL byte (the unwritten rest)."""

    def _scan(self, fh: BinaryIO, st: os.stat_result) -> list[tuple[int, int, int, bytes]]:
        data = fh.read(MAX_LINE * 64)
        data = data[:content_end(data)]
        offset = self._start(st.st_ino, len(data))
        out: list[tuple[int, int, int, bytes]] = []
        while True:
            end = data.find(b"\n", offset)
            if end < 0:
                return out  # a torn line (a crash mid-write) waits like the journal's
            out.append((st.st_ino, offset, end + 1, data[offset:end]))
            offset = end + 1


class Ingestor:
    """Brings the journal and the spool into the ledger; `run()` on start and on `ingest`."""

    def __init__(self, *, node: str, ledger: LedgerLike, writer: LedgerWriter, handle: Handle,
                 state_dir: Path, journal_path: Path | None, spool_path: Path | None,
                 reserve: Reserve | None = None, hook_failed: HookFailed | None = None,
                 save_cursor: Callable[[Path], None] | None = None) -> None:
        self.node = node
        self.ledger = ledger
        self.writer = writer
        self.handle = handle
        self.hook_failed = hook_failed
        self.seen_ids: set[str] = set()  # request ids met in the journal (bounded by run)
        kinds = ["cap", "restore", "reject"]
        self.journal = None if journal_path is None else LineFile(
            journal_path, CursorFile(state_dir / "journal.cursor", save_cursor),
            ledger_cursor(ledger, "journal", kinds, journal_path))
        self.reserve = reserve
        self.reserve_lines = None if reserve is None else ReserveLines(
            reserve.path, CursorFile(state_dir / "reserve.cursor", save_cursor),
            ledger_cursor(ledger, "journal", kinds, reserve.path))
        self.spool = None if spool_path is None else LineFile(
            spool_path, CursorFile(state_dir / "spool.cursor", save_cursor),
            ledger_cursor(ledger, "spool", ["admission", "reject"]))

    def run(self) -> dict[str, Any]:
        self.seen_ids = set()
        counts = {"journal": self._journal(self.journal)}
        if self.reserve is not None and self.reserve_lines is not None:
            with self.reserve.locked() as present:
                if present:
                    counts["journal"] += self._journal(self.reserve_lines)
                    if self.reserve.used() and self.reserve.recycle():
                        log.info("reserve journal ingested and replaced")
        counts["spool"] = self._spool()
        return counts

    def _reject(self, source: str, where: dict[str, Any], reason: str,
                code: str = "bad-request") -> None:
        self.writer.commit("reject", {
            "v": 1, "node": self.node, "source": source, source: where, "op": source,
            "code": code, "reason": reason.encode("utf-8", "replace").decode("utf-8"),
            "requester": {"uid": 0, "user": "sparkd", "role": "unknown"}})

    def _journal(self, source: LineFile | None) -> int:
        if source is None:
            return 0
        pending = source.lines()
        ended = set()
        for _, _, _, line in pending:
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(item, dict) and item.get("op") == "epilog":
                ended.add(str(item.get("job_id")))
        count = 0
        for inode, offset, end, line in pending:
            if not line.strip():  # the newline each hook entry starts with
                source.advance(inode, end)
                continue
            where: dict[str, Any] = {"inode": inode, "offset": offset, "end": end,
                                     "path": str(source.path)}
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise BadRequest("journal line is not a JSON object")
                for key in ("journaled_ns", "hook_exit", "error"):
                    if _plain(item.get(key)):
                        where[key] = item[key]
                request = request_from(item)
            except (ValueError, RecursionError, BadRequest) as exc:
                self._reject("journal", where, f"malformed journal line at byte {offset}: {exc}")
            else:
                self._one(request, where, ended, offset)
            source.advance(inode, end)
            count += 1
        return count

    def _one(self, request: Request, where: dict[str, Any], ended: set[str],
             offset: int) -> None:
        if request.id is not None:
            self.seen_ids.add(str(request.id))
        failed_closed = where.get("hook_exit") == "fail_closed"
        if failed_closed and self.hook_failed is not None and \
                isinstance(where.get("journaled_ns"), int):
            self.hook_failed(where["journaled_ns"])
        if request.op == "prolog":
            why = None
            if failed_closed:
                why = ("failed-closed", "the hook failed closed, so Slurm requeued the job "
                       "instead of running it here; no cap applied")
            elif request.job_id in ended or self._restored(request.job_id):
                why = ("job-ended", "the job ended before its journaled prolog was ingested; "
                       "no cap applied")
            if why is not None:
                self._skip_prolog(request, where, *why)
                return
        try:
            reply = self.handle(request, Peer(uid=0, gid=0, pid=0), Origin("journal", where))
        except Exception as exc:
            if is_disk_full(exc):
                raise  # stop here: this line is read again once there is room
            log.exception("journal line at byte %d failed", offset)
            self._reject("journal", where, f"journal line at byte {offset} failed inside "
                         f"sparkd: {type(exc).__name__}: {exc}", "internal")
            return
        log.info("journal %s job=%s at byte %d: ok=%s", request.op, request.job_id, offset,
                 reply.get("ok"))

    def _restored(self, job_id: str | None) -> bool:
        last = None if job_id is None else last_action(self.ledger, job_id)
        return last is not None and last.kind == "restore"

    def _skip_prolog(self, request: Request, where: dict[str, Any], code: str,
                     reason: str) -> None:
        """A journaled prolog that must not cap anything now: recorded, not applied."""
        self.writer.commit("reject", {
            "v": 1, "node": self.node, "source": "journal", "journal": where, "op": "prolog",
            "job_id": request.job_id, "code": code, "authority": "journal",
            "reason": reason, "request": request.echo(),
            "requester": {"uid": 0, "user": "root", "role": "scheduler"}})

    def _spool(self) -> int:
        if self.spool is None:
            return 0
        count = 0
        for inode, offset, end, line in self.spool.lines():
            where = {"inode": inode, "offset": offset, "end": end, "path": str(self.spool.path)}
            try:
                body = admission_body(json.loads(line), self.node)
            except (ValueError, KeyError, TypeError) as exc:
                self._reject("spool", where, f"malformed spool line at byte {offset}: {exc}")
            else:
                body["spool"] = where
                try:
                    self.writer.commit("admission", body)
                except Exception as exc:  # e.g. a value canonical bytes refuse
                    self._reject("spool", where, f"spool line at byte {offset} not "
                                 f"recordable: {exc}")
            self.spool.advance(inode, end)
            count += 1
        return count


def admission_body(item: Any, node: str) -> dict[str, Any]:
    """An `admission` PER body from one denial-spool line (format v1)."""
    if not isinstance(item, dict):
        raise TypeError("spool line is not a JSON object")
    if item.get("v") != 1:
        raise ValueError(f"unsupported spool format version {item.get('v')!r}")
    request = item.get("request")
    if not isinstance(request, dict):
        raise TypeError("'request' is not an object")
    for key in ("decision", "rule", "reason"):
        if not isinstance(item.get(key), str):
            raise TypeError(f"{key!r} is missing or not a string")
    time_ns = item.get("time_ns")
    if not isinstance(time_ns, int) or isinstance(time_ns, bool):
        raise TypeError("'time_ns' is not an integer")
    context = {k: item[k] for k in ("user", "user_id", "account", "partition", "job_name",
                                    "comment") if _plain(item.get(k))}
    if "user_id" in context:
        context["uid"] = context.pop("user_id")
    watts = request.get("watts")
    return {"v": 1, "node": node, "source": "spool", "decision": item["decision"],
            "rule": item["rule"], "reason": item["reason"], "time_ns": time_ns,
            "policy_sha256": str(item.get("policy_sha256") or ""),
            "request": {"gpus": request.get("gpus") if _plain(request.get("gpus")) else None,
                        "watts": watts if _plain(watts) else None,
                        "raw": {k: v for k, v in request.items() if _plain(v)}},
            "context": context, "requester": {"uid": context.get("uid"),
                                              "user": context.get("user"),
                                              "role": "scheduler"}}


def _plain(value: Any) -> bool:
    """A value canonical bytes accept as-is: a string or a (non-bool) integer."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
