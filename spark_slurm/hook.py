"""spark-hook prolog|epilog|status: slurmd's client for sparkd.  STDLIB ONLY.

Runs for every job on every node, so it must start fast and never hang: it
imports nothing from the package (and nothing outside the standard library),
sends one JSON request line over the daemon's unix socket under a hard
deadline, and exits. A `busy` answer (every connection slot taken) or a full
listen queue is retried with a short backoff until the deadline. When the
daemon cannot be reached, or answers without a record (`disk-full`, no `seq`),
the hook appends the request to a local journal (O_APPEND + fsync; sparkd
ingests it on start and while it runs) and exits as the configured fail mode
says, so nothing is lost either way. If the journal's filesystem is full, the
line goes into the reserve sparkd set aside (`<journal>.reserve`, written in
place under an flock).

`status` asks the daemon whether it answers and is healthy (the node health
check uses it: a full disk, for instance, makes it fail with the reason).

Exit codes (Slurm drains the node and requeues/holds the job on non-zero):
  0  the daemon accepted the request (or, for an epilog, had already recorded
     the job's restore), or it was journaled under fail_open
  1  the daemon refused it (e.g. prolog denied by policy), it was journaled
     under fail_closed, or it could not even be journaled
  2  usage or configuration error (bad arguments, unreadable config, no job id)
"""

from __future__ import annotations

import _socket  # the C module: `socket` pulls in enum/selectors, ~5 ms at every start
import posix  # the C module under `os`: `os` (+ _collections_abc) costs ~1.5 ms CPU a start
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:   # typing costs milliseconds at start; the hook runs once per job
    from collections.abc import Mapping
    from typing import Any

USAGE = "usage: spark-hook prolog|epilog|status [--config PATH]"
DEFAULT_CONFIG = "/etc/spark/hook.json"
DEFAULTS: dict[str, Any] = {
    "socket": "/run/spark/sparkd-scheduler.sock",  # root's own: no user can crowd it
    "journal": "/var/lib/spark/journal.jsonl",
    "timeout_s": 5.0,
    "on_daemon_down": "fail_closed",
}
FAIL_MODES = ("fail_open", "fail_closed")
MAX_REPLY = 1 << 20
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


try:   # the C halves of `json`: `import json` pulls in `re`, ~15 ms at every start
    import _json

    class _Ctx:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int

        @staticmethod
        def parse_constant(name: str) -> object:
            raise ValueError(f"{name} is not allowed")

    _SCAN = _json.make_scanner(_Ctx())  # type: ignore[arg-type]
    _ENCODE = _json.make_encoder(None, repr, _json.encode_basestring_ascii, None, ":", ",",
                                 True, False, False)

    def dumps(obj: object) -> str:
        """Compact JSON, keys sorted (what `json.dumps` would write)."""
        return "".join(_ENCODE(obj, 0))

    def loads(text: str) -> Any:
        """Parse one JSON document; ValueError with the offset when it is not JSON."""
        start = len(text) - len(text.lstrip())
        try:
            value, end = _SCAN(text, start)
        except StopIteration as stop:
            raise ValueError(f"not JSON at offset {stop.value}") from None
        except ValueError as exc:   # the scanner's own JSONDecodeError (says where)
            raise ValueError(f"not JSON: {exc}") from None
        if text[end:].strip():
            raise ValueError(f"extra data at offset {end}")
        return value
except ImportError:   # an interpreter without the C accelerator: same results, slower
    import json

    def dumps(obj: object) -> str:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)

    def loads(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON at offset {exc.pos}") from None


class HookError(Exception):
    """A usage or configuration problem: one line on stderr, exit 2."""


class Unreachable(Exception):
    """The daemon did not answer (missing socket, refused, timeout, garbled reply)."""


class Busy(Unreachable):
    """The daemon's listen queue is full: worth another try within the deadline."""


EAGAIN = 11
BACKOFF_S = (0.02, 0.05, 0.1, 0.2, 0.3)


def load_config(path: str) -> dict[str, Any]:
    """Read the JSON hook config; every key is optional and checked."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = loads(fh.read())
    except FileNotFoundError:
        raise HookError(f"config {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HookError(f"config {path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise HookError(f"config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise HookError(f"config {path}: expected a JSON object")
    cfg = dict(DEFAULTS)
    for key, value in data.items():
        if key not in DEFAULTS:
            raise HookError(f"config {path}: unknown key {key!r}")
        cfg[key] = value
    for key in ("socket", "journal"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise HookError(f"config {path}: {key!r} must be a non-empty path")
    timeout = cfg["timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= 300:
        raise HookError(f"config {path}: 'timeout_s' must be a number in (0, 300]")
    if cfg["on_daemon_down"] not in FAIL_MODES:
        raise HookError(f"config {path}: 'on_daemon_down' must be fail_open or fail_closed")
    return cfg


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise HookError(f"{name}={raw!r} is not a number")
    return int(raw)


def _gpu_list(raw: str) -> list[int] | None:
    """SLURM_JOB_GPUS (`0,1` or ranges `0-2`) -> indices; None when absent or unusable."""
    out: list[int] = []
    for part in raw.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return None   # e.g. a UUID list: let the daemon ask the controller
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return sorted(set(out)) or None


def build_request(op: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The daemon request from slurmd's prolog/epilog environment."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        raise HookError("SLURM_JOB_ID is not set (spark-hook runs as a Slurm prolog/epilog)")
    req: dict[str, Any] = {"op": op, "id": f"{op}-{job_id}-{posix.urandom(4).hex()}",
                           "job_id": job_id}
    text_vars = (("user", "SLURM_JOB_USER"), ("partition", "SLURM_JOB_PARTITION"),
                 ("account", "SLURM_JOB_ACCOUNT"), ("comment", "SLURM_JOB_COMMENT"),
                 ("node", "SLURMD_NODENAME"))
    for key, var in text_vars:
        value = env.get(var)
        if value:
            req[key] = value
    for key, var in (("uid", "SLURM_JOB_UID"), ("gid", "SLURM_JOB_GID")):
        num = _int_env(env, var)
        if num is not None:
            req[key] = num
    gpus = _gpu_list(env.get("SLURM_JOB_GPUS", ""))
    if gpus is not None:
        req["gpus"] = gpus
    return req


def ask_daemon(path: str, request: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Send one request line and read one reply line, all within timeout_s."""
    deadline = time.monotonic() + timeout_s
    line = (dumps(request) + "\n").encode()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(path)
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # turned away before our line arrived: its `busy` answer may be waiting
            lost: OSError | None = exc
        else:
            lost = None
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unreachable(f"no reply within {timeout_s:.3g}s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                if lost is not None:
                    raise lost
                raise Unreachable("daemon closed the connection without a reply")
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise Unreachable("reply larger than 1 MiB")
    except TimeoutError:
        raise Unreachable(f"no reply within {timeout_s:.3g}s") from None
    except BlockingIOError:  # connect(2) on a unix socket whose backlog is full
        raise Busy(f"socket {path}: listen queue full") from None
    except FileNotFoundError:
        raise Unreachable(f"socket {path} does not exist") from None
    except ConnectionRefusedError:
        raise Unreachable(f"connection to {path} refused") from None
    except OSError as exc:
        raise Unreachable(f"socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = loads(buf.split(b"\n", 1)[0].decode())
    except (UnicodeDecodeError, ValueError):
        raise Unreachable("reply is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise Unreachable("reply has no boolean 'ok'")
    return reply


def ask_until(path: str, request: Mapping[str, Any], deadline: float) -> dict[str, Any]:
    """ask_daemon, again after a short pause while the daemon says it is busy (or its
    listen queue is full), until the monotonic `deadline`; the last answer wins."""
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unreachable("no reply before the deadline")
        try:
            reply = ask_daemon(path, request, left)
        except Busy as exc:
            why = str(exc)
        else:
            error = reply.get("error")
            if reply["ok"] or not isinstance(error, dict) or error.get("code") != "busy":
                return reply
            why = f"busy: {error.get('message', '')}"
        pause = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        attempt += 1
        if time.monotonic() + pause >= deadline:
            raise Unreachable(f"{why} (retried {attempt} times within the deadline)")
        time.sleep(pause)


ENOSPC, EDQUOT = 28, 122


def journal(path: str, request: Mapping[str, Any], mode: str, error: str,
            now_ns: int) -> str:
    """Append the request durably (one line, O_APPEND, fsync) for sparkd to ingest;
    into the reserve when the journal's filesystem is full. Returns where it went."""
    entry = dict(request)
    entry.update({"journaled_ns": now_ns, "hook_exit": mode, "error": error})
    # the leading newline ends a line a full disk tore, so this entry parses whole
    data = ("\n" + dumps(entry) + "\n").encode()
    parent = path.rpartition("/")[0]
    if parent:
        import os  # noqa: PLC0415 (only the rare journal path needs makedirs)

        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = posix.open(path, posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT, 0o600)
        try:
            # one write() of one line: appends from many hooks never interleave
            if posix.write(fd, data) != len(data):
                raise OSError(ENOSPC, "short write: no space left on device")
            posix.fsync(fd)
        finally:
            posix.close(fd)
    except OSError as exc:
        if exc.errno not in (ENOSPC, EDQUOT):
            raise
        write_reserve(path + ".reserve", data)
        return path + ".reserve"
    return path


def write_reserve(path: str, data: bytes, tries: int = 3) -> None:
    """Write one line into the pre-allocated reserve, over its first NUL bytes."""
    import fcntl  # noqa: PLC0415 (only when the disk is full)

    for _ in range(tries):
        fd = posix.open(path, posix.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if posix.fstat(fd).st_ino != posix.stat(path).st_ino:
                continue  # sparkd swapped in a fresh reserve while we waited: use that
            size = posix.fstat(fd).st_size
            content = posix.pread(fd, size, 0)
            end = content.find(b"\0")
            if end < 0 or end + len(data) > size:
                raise OSError(ENOSPC, f"reserve {path} is full")
            if posix.pwrite(fd, data, end) != len(data):
                raise OSError(ENOSPC, f"short write to the reserve {path}")
            posix.fsync(fd)
            return
        finally:
            posix.close(fd)  # and the lock with it
    raise OSError(ENOSPC, f"reserve {path} kept being replaced")


def check_status(cfg: Mapping[str, Any], out: Any = sys.stdout) -> int:
    """Health check: 0 when sparkd answers a status request with ok and healthy,
    else 1 and why (the first line is what the health check drains with)."""
    try:
        reply = ask_until(cfg["socket"], {"op": "status", "id": "health"},
                          time.monotonic() + float(cfg["timeout_s"]))
    except Unreachable as exc:
        print(f"sparkd not answering: {exc}", file=out)
        return EXIT_FAIL
    if not reply["ok"]:
        print(f"sparkd unhealthy: {reply.get('error') or 'status not ok'}", file=out)
        return EXIT_FAIL
    if reply.get("healthy") is False:
        problems = reply.get("problems") or ["status says unhealthy"]
        print(f"sparkd unhealthy: {'; '.join(str(p) for p in problems)}", file=out)
        return EXIT_FAIL
    print("sparkd ok", file=out)
    return EXIT_OK


def run(op: str, env: Mapping[str, str], cfg: Mapping[str, Any],
        err: Any = sys.stderr) -> int:
    """One hook invocation; returns the exit code (see module docstring)."""
    if op == "status":
        return check_status(cfg, err)
    request = build_request(op, env)
    tag = f"spark-hook {op} job {request['job_id']}"
    try:
        reply = ask_until(cfg["socket"], request, time.monotonic() + float(cfg["timeout_s"]))
    except Unreachable as exc:
        return _journal_and_exit(cfg, request, tag, f"daemon unreachable ({exc})", str(exc),
                                 err=err)
    if reply["ok"]:
        return EXIT_OK
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if "seq" not in reply:  # answered, but nothing recorded: the journal must hold it
        text = f"{code}: {error.get('message', '')}" if isinstance(error, dict) \
            else str(error or "refused without a record")
        return _journal_and_exit(cfg, request, tag, f"not recorded by sparkd ({text})", text,
                                 err=err)
    if op == "epilog" and code == "already-restored":
        return EXIT_OK  # the job's end is recorded (and its GPUs restored) already
    print(f"{tag}: refused by sparkd: {error or 'no reason given'}", file=err)
    return EXIT_FAIL


def _journal_and_exit(cfg: Mapping[str, Any], request: Mapping[str, Any], tag: str,
                      what: str, error: str, *, err: Any) -> int:
    """Journal a request the daemon did not record, then exit as the fail mode says."""
    mode = str(cfg["on_daemon_down"])
    try:
        where = journal(cfg["journal"], request, mode, error, time.time_ns())
    except OSError as jexc:
        print(f"{tag}: {what} and journal {cfg['journal']} not writable "
              f"({jexc.strerror or jexc}); failing closed", file=err)
        return EXIT_FAIL
    print(f"{tag}: {what}; journaled to {where}, {mode}", file=err)
    return EXIT_OK if mode == "fail_open" else EXIT_FAIL


def environ() -> Mapping[str, str]:
    """The process environment, decoded as `os.environ` does (without importing `os`).

    Once anything has imported `os` (a test, an embedding program) its `environ` is
    the live one, which may have been changed since start: use it then.
    """
    mod = sys.modules.get("os")
    if mod is not None:
        live: Mapping[str, str] = mod.environ
        return live
    enc = sys.getfilesystemencoding()
    return {k.decode(enc, "surrogateescape"): v.decode(enc, "surrogateescape")
            for k, v in posix.environ.items()}


def main(argv: list[str] | None = None) -> int:
    """Entry point for `spark-hook` and `python -m spark_slurm.hook`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ if args else USAGE, file=sys.stdout if args else sys.stderr)
        return EXIT_OK if args else EXIT_USAGE
    op, rest = args[0], args[1:]
    env = environ()
    config = env.get("SPARK_HOOK_CONFIG", DEFAULT_CONFIG)
    try:
        if op not in ("prolog", "epilog", "status"):
            raise HookError(f"unknown operation {op!r}; {USAGE}")
        while rest:
            if rest[0] == "--config" and len(rest) >= 2:
                config, rest = rest[1], rest[2:]
            elif rest[0].startswith("--config="):
                config, rest = rest[0].split("=", 1)[1], rest[1:]
            else:
                raise HookError(f"unexpected argument {rest[0]!r}; {USAGE}")
        return run(op, env, load_config(config))
    except HookError as exc:
        print(f"spark-hook: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
