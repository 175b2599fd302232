"""A known CSV published over real ZeroMQ; the exporter's /metrics (over HTTP) must match it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.exporter import SUMMED
from spark_slurm.karman.publisher import PublishStats
from spark_slurm.karman.transport import Publisher

Replayer = Callable[..., tuple[threading.Thread, list[PublishStats]]]
FIELDS = {"real_power_w": "karman_real_power_watts", "voltage_rms": "karman_voltage_rms_volts",
          "current_rms": "karman_current_rms_amperes", "power_factor": "karman_power_factor_ratio",
          "apparent_power_va": "karman_apparent_power_voltamperes"}


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _start_exporter(endpoint: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spark_slurm.cli", "karman", "exporter", "--endpoint", endpoint,
         "--port", "0", "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("serving http://127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def test_metrics_match_values_computed_from_the_csv(publisher: Publisher, replayer: Replayer,
                                                    known_csv: Path) -> None:
    rec = read_recording(known_csv)
    proc, port = _start_exporter(publisher.endpoint)
    try:
        thread, stats = replayer(known_csv)  # 60 Hz, as the reference replay
        thread.join(30)
        assert stats and stats[0].sent == len(rec.cycles)
        deadline = time.monotonic() + 10
        metrics = _scrape(port)
        while metrics[("karman_decoded_total", ())] < len(rec.cycles):
            assert time.monotonic() < deadline, "exporter never saw every cycle"
            time.sleep(0.1)
            metrics = _scrape(port)
        # The window is the last 300 messages: all 30 of this recording.
        assert metrics[("karman_window_cycles", ())] == 30
        last = rec.cycles
        for field, metric in FIELDS.items():
            for stream in ("threephase/karman1", "threephase/karman3"):
                for phase in ("phase_a", "phase_b", "sum"):
                    if phase == "sum" and field not in SUMMED:
                        continue
                    series = []
                    for c in last:
                        s = next(x for x in c.streams if x.name == stream)
                        # streams are phases: a stream's "sum" is its phase_a
                        counted = [("phase_a", s.phase_a)] if phase == "sum" else s.phases()
                        values = [getattr(r, field) for p, r in counted
                                  if phase in (p, "sum")]
                        series.append(sum(values))
                    want = {"latest": series[-1], "peak": max(series),
                            "trough": min(series), "average": sum(series) / len(series)}
                    for stat, value in want.items():
                        key = (metric, (("phase", phase), ("stat", stat), ("stream", stream)))
                        assert metrics[key] == pytest.approx(value, rel=1e-6), key
        rack = [c.real_power_w() for c in last]
        key = ("karman_real_power_watts", (("phase", "sum"), ("stat", "peak"),
                                           ("stream", "rack")))
        assert metrics[key] == pytest.approx(max(rack), rel=1e-6)
        # The reference families beside ours: the same window, phase "a"/"b" labels.
        ref = ("real_power_peak", (("phase", "b"), ("stream", "threephase/karman3")))
        assert metrics[ref] == pytest.approx(
            max((c.streams[2].phase_b or c.streams[2].phase_a).real_power_w or 0 for c in last),
            rel=1e-6)
        three = ("real_power_three_phase_average", (("phase", "a"),
                                                    ("stream", "cycle-aligned")))
        assert metrics[three] == pytest.approx(sum(rack) / len(rack), rel=1e-6)
        assert metrics[("karman_frames_total", ())] == len(rec.cycles)
        assert metrics[("karman_bad_frames_total", ())] == 0
        assert metrics[("karman_dropped_total", ())] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
