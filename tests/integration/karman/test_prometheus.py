"""The reference dashboards' PromQL, run by a real Prometheus scraping our exporter.

A reference-layout recording is replayed over real ZeroMQ into
`sparkctl karman exporter`; Prometheus (the Debian package) scrapes it every
second, and every expression of the reference summary dashboard is evaluated
through Prometheus's HTTP API and compared with the value computed from the
CSV: the last 300 messages, phase_a, three-phase sums over the streams.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.publisher import PublishStats
from spark_slurm.karman.transport import Publisher
from tests.integration.daemon.conftest import _free_port
from tests.integration.karman.conftest import write_known_csv

Replayer = Callable[..., tuple[threading.Thread, list[PublishStats]]]
ROOT = Path(__file__).resolve().parents[3]
PROMQL = ROOT / "tests" / "data" / "karman" / "reference-summary-promql.txt"
BREAKER_A = 60  # the chart's breakerRatingAmps default
WINDOW = 300
STREAMS = ("threephase/karman1", "threephase/karman2", "threephase/karman3")


def _f32(x: float) -> float:
    """The value as it went over the wire (protobuf float)."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


class Prometheus:
    """A real Prometheus server in a temp dir, scraping one target every second."""

    def __init__(self, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("prometheus missing under CI (make system-deps)")
            pytest.skip("prometheus not installed (Debian package prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="karman-prom-"))
        self.port = _free_port()
        (self.dir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: karman\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = (self.dir / "log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def exporter(publisher: Publisher) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spark_slurm.cli", "karman", "exporter", "--endpoint",
         publisher.endpoint, "--port", "0", "--duration", "300"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("serving http://127.0.0.1:"), line
    try:
        yield int(line.rsplit(":", 1)[1].split("/")[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def _expected(csv: Path) -> dict[str, dict[str, list[float]]]:
    """Per stream (and the three-phase sums): each quantity's last 300 values."""
    rec = read_recording(csv)
    last = rec.cycles[-WINDOW:]
    out: dict[str, dict[str, list[float]]] = {s: {} for s in STREAMS}
    for name in STREAMS:
        for c in last:
            a = next(s for s in c.streams if s.name == name).phase_a
            for key, value in (("rms_current", a.current_rms), ("rms_voltage", a.voltage_rms),
                               ("power_factor", a.power_factor), ("real_power", a.real_power_w),
                               ("reactive_power", a.reactive_power_var)):
                assert value is not None
                out[name].setdefault(key, []).append(_f32(value))
    out["cycle-aligned"] = {
        "real_power_three_phase": [sum(out[s]["real_power"][i] for s in STREAMS)
                                   for i in range(WINDOW)],
        "reactive_power_three_phase": [sum(out[s]["reactive_power"][i] for s in STREAMS)
                                       for i in range(WINDOW)]}
    return out


def _stat(values: list[float], stat: str) -> float:
    return {"latest": values[-1], "peak": max(values), "trough": min(values),
            "average": sum(values) / len(values)}[stat]


def test_reference_dashboard_queries_against_a_real_prometheus(
        publisher: Publisher, replayer: Replayer, exporter: int, tmp_path: Path) -> None:
    # The reference layout (karman1..3, phase_a only, no sequence numbers), 6 s of cycles.
    csv = write_known_csv(tmp_path / "reference.csv", 360, 17, phase_b=False, sequence=False)
    prom = Prometheus(f"127.0.0.1:{exporter}")
    try:
        _wait(prom.ready, 60, "Prometheus ready")
        thread, stats = replayer(csv, speed=3.0)  # 180 Hz: 2 s
        thread.join(30)
        assert stats and stats[0].sent == 360
        # Prometheus has scraped the exporter after it saw every message.
        _wait(lambda: [float(r["value"][1]) for r in prom.query("karman_decoded_total")]
              == [360.0], 30, "a scrape after the whole replay")
        want = _expected(csv)
        cur = {s: want[s]["rms_current"] for s in STREAMS}
        peak = {s: max(v) for s, v in cur.items()}
        exprs = [line for line in PROMQL.read_text().splitlines()
                 if line and not line.startswith("#")]
        exprs = [e.replace("{{ .Values.breakerRatingAmps }}", str(BREAKER_A)) for e in exprs]
        expected = [
            max(peak.values()) / BREAKER_A * 100,
            sum(peak[s] / (sum(cur[s]) / WINDOW) for s in STREAMS) / 3,
            sum(want[s]["power_factor"][-1] for s in STREAMS) / 3,
            (BREAKER_A - max(peak.values())) / BREAKER_A * 100,
            peak[STREAMS[0]], peak[STREAMS[1]], peak[STREAMS[2]],
            sum(want[s]["rms_voltage"][-1] for s in STREAMS) / 3,
            sum(want[s]["power_factor"][-1] for s in STREAMS) / 3,
            want["cycle-aligned"]["real_power_three_phase"][-1],
            want["cycle-aligned"]["reactive_power_three_phase"][-1],
            max(want["cycle-aligned"]["real_power_three_phase"]),
            sum(want["cycle-aligned"]["real_power_three_phase"]) / WINDOW,
            min(want["cycle-aligned"]["real_power_three_phase"]),
        ]
        assert len(exprs) == len(expected) + 1
        for expr, value in zip(exprs, expected, strict=False):
            assert _value(prom.query(expr)) == pytest.approx(value, rel=1e-5), expr
        # The "All Metrics" table: each metric's stat summed over the threephase streams
        # and the three-phase sums, phase a.
        table = {(r["metric"]["metric"], r["metric"]["stat"]): float(r["value"][1])
                 for r in prom.query(exprs[-1])}
        assert len(table) == 11 * 4
        for stat in ("latest", "peak", "trough", "average"):
            for metric in ("real_power", "rms_current", "power_factor"):
                key = "real_power" if metric == "real_power" else metric
                total = sum(_stat(want[s][key], stat) for s in STREAMS)
                assert table[(metric, stat)] == pytest.approx(total, rel=1e-5)
            assert table[("active_power", stat)] == table[("real_power", stat)]
            assert table[("real_power_three_phase", stat)] == pytest.approx(
                _stat(want["cycle-aligned"]["real_power_three_phase"], stat), rel=1e-5)
        # phase b: the replay's copy of phase_a, exported as the reference does
        assert _value(prom.query('real_power_latest{stream="threephase/karman2", phase="b"}')
                      ) == pytest.approx(want[STREAMS[1]]["real_power"][-1], rel=1e-6)
    finally:
        prom.close()
