"""Fuzzing the real socket protocol: every line gets one reply and a PER, or is counted.

Hypothesis writes request lines of every kind (random bytes, random JSON, near-
valid requests with wrong values, integers past Python's int/str digit limit,
nesting past the recursion limit, lone surrogate escapes, empty lines) and sends
each to a real sparkd. The invariant: one JSON reply per line, with a boolean
`ok`; a reply carries the `seq`/`hash` of a PER that is in the ledger, unless it
is a read (`status`, `ingest`) or a counted answer (`rate-limited`, `busy`), and
the daemon keeps serving.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_slurm.daemon.requests import OPS
from tests.integration.daemon.conftest import OTHER_UID, Sparkd
from tests.integration.daemon.test_hardening import metric, metrics

COUNTED = ("rate-limited", "busy")

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=30),
    st.floats(allow_nan=True, allow_infinity=True))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
FIELDS = ["op", "id", "job_id", "user", "uid", "gid", "partition", "account", "qos", "gpus",
          "watts", "watts_per_gpu", "comment", "node", "class", "reason", "bogus"]


@st.composite
def near_requests(draw: st.DrawFn) -> bytes:
    """An object with a real (or almost real) op and some fields of any value."""
    obj: dict[str, Any] = {"op": draw(st.sampled_from([*OPS, "reboot", "", "PROLOG"]))}
    for key in draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=5, unique=True)):
        obj[key] = draw(st.one_of(json_value, st.sampled_from(["1", "77", [0], [0, 1], 300])))
    return json.dumps(obj).encode()


def _surrogate(text: str) -> bytes:
    return json.dumps({"op": "prolog", "job_id": "5", "user": text}).encode().replace(
        b"SURR", b"\\ud800")


lines = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    json_value.map(lambda v: json.dumps(v).encode()),
    near_requests(),
    st.integers(4000, 6000).map(
        lambda n: b'{"op": "cap", "job_id": "1", "watts_per_gpu": ' + b"9" * n + b"}"),
    st.integers(1, 32_000).map(lambda d: b"[" * d + b"]" * d),
    st.text(max_size=10).map(lambda t: _surrogate(t + "SURR")),
    st.sampled_from([b"", b" ", b"\t", b"\r"]),
)


def _exchange(path: str, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"no reply to {line[:80]!r}"
            data += chunk
    return data


def _check(reply_line: bytes, line: bytes, receipts: list[tuple[int, str]]) -> None:
    assert reply_line.count(b"\n") == 1, (line[:80], reply_line[:200])
    reply = json.loads(reply_line)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if "seq" in reply:
        receipts.append((reply["seq"], reply["hash"]))
        return
    if reply["ok"]:
        assert "gpus" in reply or "ingested" in reply, reply  # status / ingest: reads
        return
    assert reply["error"]["code"] in COUNTED, (line[:80], reply)


def _in_ledger(sparkd: Sparkd, receipts: list[tuple[int, str]]) -> None:
    conn = sqlite3.connect(f"file:{sparkd.state_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        stored = {seq: bytes(h).hex() for seq, h in conn.execute("SELECT seq, hash FROM per")}
    finally:
        conn.close()
    missing = [(seq, h) for seq, h in receipts if stored.get(seq) != h]
    assert not missing, f"replies naming PERs the ledger does not hold: {missing[:5]}"


def test_every_line_from_root_gets_a_reply_and_a_per(sparkd: Sparkd) -> None:
    sparkd.add_job("1", gpus=[0, 1])
    sparkd.add_job("77", gpus=[2])
    sparkd.start()
    receipts: list[tuple[int, str]] = []

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(line=lines)
    def one(line: bytes) -> None:
        _check(_exchange(str(sparkd.socket), line), line, receipts)

    one()
    assert len(receipts) > 100
    _in_ledger(sparkd, receipts)
    assert sparkd.request({"op": "status"})["ok"]
    log = sparkd.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]


# run as another uid: one connection per line, every reply printed as it came
_SEND_EACH = r"""
import json, socket, sys
out = []
for line in json.load(sys.stdin):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
    try:
        s.sendall(line.encode("latin-1") + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # turned away busy before the line went out: the answer is still there
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out.append(data.decode("utf-8", "replace"))
print(json.dumps(out))
"""


def test_every_line_from_a_user_gets_a_per_or_is_counted(sparkd: Sparkd) -> None:
    sparkd.config.write_text(sparkd.config.read_text()
                             + "refusal_limit: {rate_per_s: 1, burst: 15}\n")
    sparkd.start()
    receipts: list[tuple[int, str]] = []
    sent = [0]

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(lines, min_size=1, max_size=6))
    def one(batch: list[bytes]) -> None:
        out = subprocess.run(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             sys.executable, "-I", "-S", "-c", _SEND_EACH, str(sparkd.socket)],
            input=json.dumps([b.decode("latin-1") for b in batch]), capture_output=True,
            text=True, timeout=120, check=False, cwd="/")
        assert out.returncode == 0, out.stderr
        replies = json.loads(out.stdout)
        for line, reply in zip(batch, replies, strict=True):
            _check(reply.encode(), line, receipts)
        sent[0] += len(batch)

    one()
    _in_ledger(sparkd, receipts)
    text = metrics(sparkd)
    counted = metric(text, "spark_requests_rate_limited_total") + \
        metric(text, "spark_connections_refused_total") + \
        metric(text, "spark_requests_read_total")
    assert len(receipts) + counted >= sent[0]  # every line recorded or counted
    assert counted > 0  # the budget ran out: counted, not recorded one by one
