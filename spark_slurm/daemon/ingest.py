"""Ingest of the two append-only JSON Lines files other programs leave for sparkd.

The hook's fallback journal (requests made while the daemon was unreachable) and
the controller's denial spool (job_submit.lua rejections) are read from a
byte-offset cursor kept in the state dir with the file's inode, so rotation or
truncation starts over and nothing is read twice. Each PER carries the line's
inode and offset; on start the ledger's newest such PER wins over a cursor file
that a crash left behind, which makes ingest idempotent. A torn last line waits
for its newline; a malformed line becomes a `reject` PER and ingest goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.daemon.contracts import LedgerLike
from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.pipeline import Origin
from spark_slurm.daemon.requests import Request, request_from
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import BadRequest

log = logging.getLogger("sparkd.ingest")

MAX_LINE = 1 << 20

Handle = Callable[[Request, Peer, Origin], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Cursor:
    inode: int
    offset: int


class CursorFile:
    """A (inode, offset) pair, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Cursor | None:
        try:
            data = json.loads(self.path.read_text())
            return Cursor(int(data["inode"]), int(data["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, cursor: Cursor) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"inode": cursor.inode, "offset": cursor.offset}))
        os.replace(tmp, self.path)


def ledger_cursor(ledger: LedgerLike, source: str, kinds: list[str]) -> Cursor | None:
    """The end of the last line already recorded from `source`, per the ledger: its
    newest PER from that source, which the ledger keeps a pointer to (start-up
    must not read a year of history to find it)."""
    record = ledger.latest_ingested(source)
    if record is None or record.kind not in kinds:
        return None
    body = record.body
    if body.get("source") != source or not isinstance(body.get(source), dict):
        return None
    where = body[source]
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

    def lines(self) -> list[tuple[int, int, int, bytes]]:
        """(inode, offset, end, line) for each complete line past the cursor."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            offset = 0
            if self.cursor is not None and self.cursor.inode == st.st_ino \
                    and self.cursor.offset <= st.st_size:
                offset = self.cursor.offset
            elif self.cursor is not None:
                log.warning("%s was rotated or truncated; reading from the start", self.path)
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


class Ingestor:
    """Brings the journal and the spool into the ledger; `run()` on start and on `ingest`."""

    def __init__(self, *, node: str, ledger: LedgerLike, writer: LedgerWriter, handle: Handle,
                 state_dir: Path, journal_path: Path | None, spool_path: Path | None) -> None:
        self.node = node
        self.writer = writer
        self.handle = handle
        self.journal = None if journal_path is None else LineFile(
            journal_path, CursorFile(state_dir / "journal.cursor"),
            ledger_cursor(ledger, "journal", ["cap", "restore", "reject"]))
        self.spool = None if spool_path is None else LineFile(
            spool_path, CursorFile(state_dir / "spool.cursor"),
            ledger_cursor(ledger, "spool", ["admission", "reject"]))

    def run(self) -> dict[str, Any]:
        return {"journal": self._journal(), "spool": self._spool()}

    def _reject(self, source: str, where: dict[str, Any], reason: str) -> None:
        self.writer.commit("reject", {
            "v": 1, "node": self.node, "source": source, source: where, "op": source,
            "code": "bad-request", "reason": reason,
            "requester": {"uid": 0, "user": "sparkd", "role": "unknown"}})

    def _journal(self) -> int:
        if self.journal is None:
            return 0
        pending = self.journal.lines()
        ended = set()
        for _, _, _, line in pending:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("op") == "epilog":
                ended.add(str(item.get("job_id")))
        count = 0
        for inode, offset, end, line in pending:
            where: dict[str, Any] = {"inode": inode, "offset": offset, "end": end,
                                     "path": str(self.journal.path)}
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise BadRequest("journal line is not a JSON object")
                for key in ("journaled_ns", "hook_exit", "error"):
                    if _plain(item.get(key)):
                        where[key] = item[key]
                request = request_from(item)
            except (ValueError, BadRequest) as exc:
                self._reject("journal", where, f"malformed journal line at byte {offset}: {exc}")
            else:
                if request.op == "prolog" and request.job_id in ended:
                    self._skip_prolog(request, where)
                else:
                    reply = self.handle(request, Peer(uid=0, gid=0, pid=0),
                                        Origin("journal", where))
                    log.info("journal %s job=%s at byte %d: ok=%s", request.op,
                             request.job_id, offset, reply.get("ok"))
            self.journal.advance(inode, end)
            count += 1
        return count

    def _skip_prolog(self, request: Request, where: dict[str, Any]) -> None:
        """A journaled prolog whose job's epilog is also journaled: no cap may be left."""
        self.writer.commit("reject", {
            "v": 1, "node": self.node, "source": "journal", "journal": where, "op": "prolog",
            "job_id": request.job_id, "code": "job-ended", "authority": "journal",
            "reason": "the job ended before its journaled prolog was ingested; no cap applied",
            "request": request.echo(),
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
