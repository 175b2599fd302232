"""End to end over real ZeroMQ sockets: replay → subscriber, tail, record."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.errors import KarmanError
from spark_slurm.karman import KarmanSubscriber
from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.publisher import PublishStats
from spark_slurm.karman.recorder import TABLE
from spark_slurm.karman.schema import Cycle, PhaseReading, StreamReading, encode_frame
from spark_slurm.karman.transport import Publisher
from tests.unit.karman import wire

Replayer = Callable[..., tuple[threading.Thread, list[PublishStats]]]


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_subscriber_windows_a_replayed_recording(publisher: Publisher, replayer: Replayer,
                                                 known_csv: Path) -> None:
    rec = read_recording(known_csv)
    with KarmanSubscriber(publisher.endpoint) as sub:
        start = time.time_ns()
        thread, stats = replayer(known_csv)
        thread.join(20)
        assert stats and stats[0].sent == len(rec.cycles)
        assert _wait(lambda: sub.stats()["decoded"] == len(rec.cycles))
        assert sub.wait_until(start, timeout_s=1)
        win = sub.window(start, time.time_ns())
        # streams are phases: the rack is Σ phase_a, phase_b (here different) is not read
        expected = [round(sum(round((s.phase_a.real_power_w or 0) * 1000)
                              for s in c.streams)) for c in rec.cycles]
        assert win.samples == len(rec.cycles)
        assert (win.min_mw, win.max_mw) == (min(expected), max(expected))
        assert abs(win.mean_mw - sum(expected) / len(expected)) <= 1
        assert win.streams == 3
        counts = sub.stats()
        assert counts["dropped"] == 0 and counts["bad_frames"] == 0
        assert counts["alive"] == 1
    assert not sub.wait_until(time.time_ns() + 10**9, timeout_s=0.1)


def test_bad_frames_other_topics_and_restarts_over_a_real_socket(known_csv: Path) -> None:
    rec = read_recording(known_csv)
    pub = Publisher("tcp://127.0.0.1:*")
    endpoint = pub.endpoint
    sub = KarmanSubscriber(endpoint)
    sub.start()
    try:
        assert pub.wait_for_subscriber(10)
        for i, cycle in enumerate(rec.cycles[:10]):
            pub.send(encode_frame("cycle-aligned", Cycle(time.time_ns(), 100 + i,
                                                         cycle.streams)))
        pub.send(b"cycle-aligned\x0a\xff\xff")  # truncated
        pub.send(b"other-topic" + b"\x00" * 10)
        assert _wait(lambda: sub.stats()["frames"] == 12)
        # The publisher restarts on the same port; its sequence starts over.
        pub.close()
        pub = Publisher(endpoint)
        assert pub.wait_for_subscriber(10)
        for i in range(5):
            pub.send(encode_frame("cycle-aligned",
                                  Cycle(time.time_ns(), i, rec.cycles[i].streams)))
        assert _wait(lambda: sub.stats()["decoded"] == 15)
        counts = sub.stats()
        assert counts["bad_frames"] == 1
        assert counts["other_topic"] == 1
        assert counts["publisher_restarts"] == 1
        assert counts["alive"] == 1
    finally:
        sub.stop()
        pub.close()


def test_slow_consumer_memory_stays_bounded(publisher: Publisher) -> None:
    a = PhaseReading(real_power_w=100.0)
    streams = (StreamReading("k", a, a),)
    sub = KarmanSubscriber(publisher.endpoint, buffer_seconds=1, max_rate_hz=50)
    sub.start()
    try:
        assert publisher.wait_for_subscriber(10)
        for i in range(2000):
            publisher.send(encode_frame("cycle-aligned", Cycle(time.time_ns(), i, streams)))
        assert _wait(lambda: sub.stats()["frames"] == 2000)
        counts = sub.stats()
        assert counts["buffered"] == 50  # capacity, not frames received
        assert counts["dropped"] == 0
    finally:
        sub.stop()


def test_tail_prints_json_lines(publisher: Publisher, replayer: Replayer,
                                known_csv: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spark_slurm.cli", "karman", "tail", "--endpoint",
         publisher.endpoint, "--count", "5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    replayer(known_csv, speed=5.0, loop=True, duration_s=30)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5
    assert lines[0]["phases"] == "streams-are-phases"
    assert lines[0]["real_power_w"] == pytest.approx(
        sum(s["phase_a"]["real_power_w"] for s in lines[0]["streams"]))
    assert [s["name"] for s in lines[0]["streams"]] == ["threephase/karman1",
                                                        "threephase/karman2",
                                                        "threephase/karman3"]
    assert lines[0]["streams"][0]["phase_a"]["real_power_w"] > 0
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs)


def test_record_writes_every_cycle_to_sqlite(publisher: Publisher, replayer: Replayer,
                                             known_csv: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "rec.db"
    thread, _ = replayer(known_csv, speed=5.0)
    code = run(["karman", "record", "--endpoint", publisher.endpoint, "--to", str(db),
                "--count", "30", "--duration", "30"])
    assert code == 0, capsys.readouterr().err
    con = sqlite3.connect(db)
    # streams are phases: one row per stream (its phase_a) per cycle
    assert con.execute(f"SELECT count(*), count(DISTINCT seq), count(DISTINCT phase) "
                       f"FROM {TABLE}").fetchone() == (90, 30, 1)
    real = con.execute(f"SELECT real_power_w FROM {TABLE} WHERE seq = 0 AND "
                       "stream = 'threephase/karman2' AND phase = 'phase_a'").fetchone()[0]
    assert real == pytest.approx(1000 + 37 * ((0 + 3 + 0) % 11) + 0.5, abs=1e-3)
    thread.join(10)
    both = tmp_path / "both.db"
    thread, _ = replayer(known_csv, speed=5.0, loop=True, duration_s=30)
    assert run(["karman", "record", "--endpoint", publisher.endpoint, "--to", str(both),
                "--count", "30", "--duration", "30", "--phases", "two-phase-per-stream"]) == 0
    seq, real = sqlite3.connect(both).execute(
        f"SELECT seq, real_power_w FROM {TABLE} WHERE stream = 'threephase/karman2' AND "
        "phase = 'phase_b' ORDER BY time_ns LIMIT 1").fetchone()
    assert real == pytest.approx(1000 + 37 * ((seq % 30 * 7 + 3 + 1) % 11) + 0.5, abs=1e-3)


def test_independent_encoder_frame_over_a_real_socket(publisher: Publisher) -> None:
    now = time.time_ns()
    values = dict(v_rms=121.5, v_dc=0.5, i_rms=10.25, i_dc=0.0, real=1234.5, apparent=1250.0,
                  reactive=190.5, pf=0.984375)
    a = wire.phase(seconds=now // 10**9, nanos=now % 10**9, seq=9, **values)
    payload = wire.joined(wire.wrapper("threephase/karman2", a, a))
    with KarmanSubscriber(publisher.endpoint) as sub:
        assert publisher.wait_for_subscriber(10)
        publisher.send(b"cycle-aligned" + payload)
        assert sub.wait_until(now, timeout_s=10)
        win = sub.window(now, now)
        cycle = sub.recent_cycles(1.0)[0]
    assert (win.samples, win.mean_mw, win.streams) == (1, 1_234_500, 1)  # phase_a only
    assert cycle.seq == 9
    reading = cycle.streams[0].phase_b
    assert reading is not None
    assert (reading.voltage_rms, reading.voltage_dc_offset, reading.current_rms,
            reading.apparent_power_va, reading.reactive_power_var, reading.power_factor) == (
        121.5, 0.5, 10.25, 1250.0, 190.5, 0.984375)


def test_tail_human_lines(publisher: Publisher, replayer: Replayer, known_csv: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    replayer(known_csv, speed=5.0, loop=True, duration_s=30)
    assert run(["karman", "tail", "--endpoint", publisher.endpoint, "--count", "2",
                "--duration", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "karman1.a" in lines[0] and " W " in lines[0] and "seq=" in lines[0]
    assert "karman1.b" not in lines[0]  # phase_b does not count: not shown


def test_bad_endpoint_is_a_clear_error() -> None:
    sub = KarmanSubscriber("bogus://nowhere")
    with pytest.raises(KarmanError, match="cannot connect to Karman endpoint bogus://nowhere"):
        sub.start()
    sub.stop()  # stopping a subscriber that never started is harmless
    assert sub.stats()["alive"] == 0
