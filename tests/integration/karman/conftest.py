"""Real ZeroMQ publishers on free loopback ports, and a known CSV to publish."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spark_slurm.karman.csvfile import COLUMNS, Recording, read_recording
from spark_slurm.karman.publisher import PublishStats, replay
from spark_slurm.karman.transport import Publisher

STREAMS = ("karman1", "karman2", "karman3")  # as the reference recordings name them


def write_known_csv(path: Path, cycles: int = 30, step_ms: int = 185, *,
                    phase_b: bool = True, sequence: bool = True) -> Path:
    """A recording whose every value is a simple function of (cycle, stream, phase).

    `phase_b=False, sequence=False` is the reference recordings' layout.
    """
    lines = [",".join(COLUMNS) + (",sequence_number" if sequence else "")]
    phases = ("phase_a", "phase_b") if phase_b else ("phase_a",)
    for i in range(cycles):
        t = 1_700_000_000_000 + i * step_ms
        for k, stream in enumerate(STREAMS):
            for p, phase in enumerate(phases):
                real = 1000 + 37 * ((i * 7 + k * 3 + p) % 11) + 0.5 * k
                volts = 119 + 0.25 * ((i + k + p) % 5)
                pf = 0.97 + 0.005 * ((i + p) % 4)
                apparent = round(real / pf, 2)
                amps = round(apparent / volts, 3)
                lines.append(f"{t},{stream},{phase},{volts},0.01,{amps},0.0,{real},"
                             f"{apparent},{round(apparent * 0.2, 2)},{pf}"
                             + (f",{i}" if sequence else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def known_csv(tmp_path: Path) -> Path:
    """Two-phase rows with distinct phase_b values, and sequence numbers."""
    return write_known_csv(tmp_path / "known.csv")


@pytest.fixture
def reference_csv(tmp_path: Path) -> Path:
    """The reference layout: karman1..3, phase_a rows only, no sequence_number column."""
    return write_known_csv(tmp_path / "reference.csv", 60, 17, phase_b=False, sequence=False)


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    pub = Publisher("tcp://127.0.0.1:*")
    yield pub
    pub.close()


def start_replay(pub: Publisher, rec: Recording, stop: threading.Event,
                 **kw: object) -> tuple[threading.Thread, list[PublishStats]]:
    """Replay in a thread once a subscriber has joined; the stats land in the list."""
    out: list[PublishStats] = []

    def go() -> None:
        if pub.wait_for_subscriber(10):
            out.append(replay(rec, pub, stop=stop, **kw))  # type: ignore[arg-type]

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def replayer(publisher: Publisher) -> Iterator[
        Callable[..., tuple[threading.Thread, list[PublishStats]]]]:
    """Starts replays on the publisher; stops and joins them before it closes."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(csv: Path, **kw: object) -> tuple[threading.Thread, list[PublishStats]]:
        thread, out = start_replay(publisher, read_recording(csv), stop, **kw)
        threads.append(thread)
        return thread, out

    yield run
    stop.set()
    for thread in threads:
        thread.join(15)
