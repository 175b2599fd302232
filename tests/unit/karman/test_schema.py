"""Wire interop: frames from an independent encoder decode intact, and ours decode elsewhere."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

from spark_slurm.clock import ManualClock
from spark_slurm.karman.ring import CycleRing
from spark_slurm.karman.schema import (
    TWO_PHASE_PER_STREAM,
    Cycle,
    PhaseReading,
    StreamReading,
    decode_payload,
    encode_frame,
    encode_payload,
)
from spark_slurm.karman.subscriber import CycleDecoder
from tests.unit.karman import wire

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000
FULL_TYPE = "utilidata.karman.bibimbap.v1.CompositeJoinedCalculations"
# Values exactly representable as float32, so equality is exact.
VALUES_A = dict(v_rms=120.5, v_dc=0.125, i_rms=20.25, i_dc=-0.0625, real=2400.5,
                apparent=2450.0, reactive=300.25, pf=0.96875)
VALUES_B = dict(v_rms=119.75, v_dc=-0.25, i_rms=18.5, i_dc=0.03125, real=2200.25,
                apparent=2260.5, reactive=280.0, pf=0.9765625)


def _expected(values: dict[str, float]) -> PhaseReading:
    return PhaseReading(real_power_w=values["real"], apparent_power_va=values["apparent"],
                        reactive_power_var=values["reactive"], power_factor=values["pf"],
                        voltage_rms=values["v_rms"], voltage_dc_offset=values["v_dc"],
                        current_rms=values["i_rms"], current_dc_offset=values["i_dc"])


def _independent_payload() -> bytes:
    a = wire.phase(seconds=T0, nanos=250_000_000, seq=41, **VALUES_A)
    b = wire.phase(seconds=T0, nanos=250_000_000, seq=41, **VALUES_B)
    return wire.joined(wire.wrapper("threephase/karman1", a, b),
                       wire.wrapper("threephase/karman2", a, None))


def test_independently_encoded_frame_decodes_with_every_field() -> None:
    cycle = decode_payload(_independent_payload())
    assert cycle.time_ns == T0 * 1_000_000_000 + 250_000_000
    assert cycle.seq == 41
    assert [s.name for s in cycle.streams] == ["threephase/karman1", "threephase/karman2"]
    assert cycle.streams[0].phase_a == _expected(VALUES_A)
    assert cycle.streams[0].phase_b == _expected(VALUES_B)
    assert cycle.streams[1].phase_b is None


def test_independently_encoded_frame_through_subscriber_path() -> None:
    clock = ManualClock(start_ns=T0 * 1_000_000_000)
    ring = CycleRing(16)
    dec = CycleDecoder(ring, "cycle-aligned", clock)
    assert dec.feed(b"cycle-aligned" + _independent_payload())
    win = ring.window(0, 2**63 - 1)
    assert win.samples == 1
    assert win.mean_mw == round((2400.5 + 2400.5) * 1000)  # Σ phase_a: streams are phases
    assert win.streams == 2
    assert dec.counts["missing_phase_b"] == 1
    assert ring.latest_time() == T0 * 1_000_000_000 + 250_000_000
    two = CycleDecoder(CycleRing(16), "cycle-aligned", clock, phases=TWO_PHASE_PER_STREAM)
    assert two.feed(b"cycle-aligned" + _independent_payload())
    assert two.ring.window(0, 2**63 - 1).mean_mw == round((2400.5 + 2200.25 + 2400.5) * 1000)


def _sample_cycle() -> Cycle:
    a, b = _expected(VALUES_A), _expected(VALUES_B)
    return Cycle(T0 * 1_000_000_000 + 5, 7, (StreamReading("threephase/karman1", a, b),
                                             StreamReading("threephase/karman3", b, None)))


def test_our_frames_decode_with_independent_decoder() -> None:
    cycle = _sample_cycle()
    frame = encode_frame("cycle-aligned", cycle)
    assert frame.startswith(b"cycle-aligned")
    payload = frame[len(b"cycle-aligned"):]
    assert wire.get(payload, 1, 1) == [b"threephase/karman1", b"threephase/karman3"]
    assert wire.get(payload, 1, 2, 1, 4, 1) == [2400.5, 2200.25]  # phase_a real power
    assert wire.get(payload, 1, 2, 2, 4, 4) == [0.9765625]  # only stream 1 has phase_b
    assert wire.get(payload, 1, 2, 1, 2, 1) == [120.5, 119.75]  # voltage rms
    assert wire.get(payload, 1, 2, 1, 3, 2) == [-0.0625, 0.03125]  # current dc offset
    assert wire.get(payload, 1, 2, 1, 1, 1, 1) == [T0, T0]  # utc_time.seconds
    assert wire.get(payload, 1, 2, 1, 1, 1, 2) == [5, 5]  # utc_time.nanos
    assert wire.get(payload, 1, 2, 1, 1, 2) == [7, 7]  # generic_sequence_number


def test_our_frames_decode_with_protoc() -> None:
    payload = encode_payload(_sample_cycle())
    well_known = resources.files("grpc_tools") / "_proto"
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}",
         f"--decode={FULL_TYPE}", "karman.proto"],
        input=payload, capture_output=True, check=True)
    text = done.stdout.decode()
    assert 'calculation_name: "threephase/karman1"' in text
    assert "real_power_w: 2400.5" in text
    assert "power_factor: 0.9765625" in text
    assert "generic_sequence_number: 7" in text
    assert f"seconds: {T0}" in text
    assert text.count("phase_b {") == 1


def test_round_trip_keeps_absent_fields_absent() -> None:
    sparse = Cycle(10, None, (StreamReading("s", PhaseReading(real_power_w=5.0)),))
    back = decode_payload(encode_payload(sparse))
    assert back == sparse


def test_generated_bindings_are_not_stale() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_stale_bindings_are_detected(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(out),
                    "--force"], check=True)
    (out / "karman_pb2.py").write_text("# hand-edited\n")
    done = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check",
                           "--out", str(out)], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert "karman_pb2.py" in done.stderr
