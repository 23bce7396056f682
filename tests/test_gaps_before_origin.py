"""Gaps lie inside the recording, whatever order and timestamps the packets come with.

A late or reordered packet whose stream re-anchored since (its sender's timestamps jumped)
is placed by its old timestamp, which can be before the recording's first sample: it is
counted late, it leaves no gap outside the recording, and the hole it left where it was
expected is still listed.  Every sidecar must validate against its own schema, with every
gap inside ``[0, duration]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile
import structlog
from callgen import CALLEE_IP, CALLER_IP, PTIME, T0, Call, sdp, tone, write_pcap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callcap.capture.link import DLT_EN10MB
from callcap.codecs.g711 import decode_alaw, encode_alaw
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline
from callcap.storage.sidecar import validate_sidecar

#: A timestamp jump of ten seconds: the anchor moves down by as much at the next packet.
JUMP = 80_000


def _recordings(out: Path) -> list[tuple[dict[str, Any], npt.NDArray[np.int16] | None]]:
    found = []
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        wav = sidecar.with_suffix(".wav")
        audio = soundfile.read(str(wav), dtype="int16")[0] if wav.exists() else None
        found.append((doc, audio))
    return found


def _assert_gaps_inside(doc: dict[str, Any]) -> None:
    validate_sidecar(doc)
    length = doc["audio"]["duration_s"] if doc["audio"] is not None else None
    for gap in doc["gaps"]:
        assert 0 <= gap["from_s"] <= gap["to_s"], gap
        if length is not None:
            assert gap["to_s"] <= length, (gap, length)


def test_late_packets_placed_before_the_origin_are_late_not_gaps(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0, caller_sdp=sdp(CALLER_IP, 40000, "8 13 101"))
    start = answer + 0.02  # the caller's first packet: sample 0 of the timeline
    encoded = encode_alaw(tone(440, 1.0))
    delayed = range(5, 9)
    for i in range(len(encoded) // PTIME):
        # from packet 10 on the sender's timestamps run ten seconds ahead; packets 5-8
        # arrive after that, 0.25 s late: by their timestamps they are 10 s before sample 0
        call.rtp(
            start + i * 0.02 + (0.25 if i in delayed else 0.0),
            from_caller=True,
            seq=100 + i,
            rtp_ts=1000 + i * PTIME + (JUMP if i >= 10 else 0),
            payload=encoded[i * PTIME : (i + 1) * PTIME],
            pt=8,
        )
    callee = call.stream(start + 0.5, tone(1000, 0.5), from_caller=False, codec="PCMA")
    call.bye(start + 1.5)
    capture = write_pcap(tmp_path / "c.pcap", call.records)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "callcap", "record", str(capture), "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ((doc, audio),) = _recordings(out)
    assert audio is not None
    _assert_gaps_inside(doc)
    (caller,) = [s for s in doc["streams"] if s["side"] == "caller"]
    assert (caller["packets"], caller["reordered"], caller["late"]) == (50, 4, 4)
    # the hole they left is listed, nothing before it is
    assert doc["gaps"] == [{"side": "caller", "from_s": 0.1, "to_s": 0.18, "capture_loss": False}]
    expected = decode_alaw(encoded).copy()
    expected[5 * PTIME : 9 * PTIME] = 0
    assert len(audio) == doc["audio"]["frames"] == 12_000
    assert np.array_equal(audio[: len(expected), 0], expected)
    assert not audio[len(expected) :, 0].any()
    assert np.array_equal(audio[4000 : 4000 + len(callee), 1], decode_alaw(callee))


@dataclass(frozen=True)
class _Packet:
    """One caller or callee packet as it deviates from a steady 20 ms stream."""

    delay: float  # seconds after its slot it arrives (jitter, lateness, reordering)
    jump: int  # added to its timestamp and every later one's (a sender's clock jump)
    seq_skip: int  # added to its sequence number and every later one's (loss, restart)
    pt: int  # 8 (PCMA), 13 (comfort noise) or 100 (not offered)
    copies: int  # 1, or more for duplicates
    drop: bool


_packets = st.lists(
    st.builds(
        _Packet,
        delay=st.one_of(
            st.just(0.0),
            st.floats(0.0, 0.06),  # jitter: reordering inside the window
            st.floats(0.2, 3.0),  # late
        ),
        jump=st.one_of(
            st.just(0),
            st.sampled_from([-JUMP, JUMP, -PTIME, PTIME, 3 * PTIME, 1 << 31]),
            st.integers(-(1 << 20), 1 << 20),
        ),
        seq_skip=st.one_of(st.just(0), st.integers(1, 4), st.sampled_from([-3, 150, 5000])),
        pt=st.sampled_from([8, 8, 8, 8, 13, 100]),
        copies=st.sampled_from([1, 1, 1, 1, 2, 3]),
        drop=st.sampled_from([False, False, False, False, False, True]),
    ),
    min_size=1,
    max_size=80,
)


def _add_stream(call: Call, start: float, packets: list[_Packet], *, from_caller: bool) -> float:
    """Put one side's packets into the call; returns the last arrival."""
    payload = encode_alaw(tone(700 if from_caller else 1200, 0.02))
    seq, ts, last = 100, 1000, start
    for i, p in enumerate(packets):
        seq += p.seq_skip
        ts += p.jump
        if not p.drop:
            body = payload if p.pt == 8 else b"\x40" if p.pt == 13 else bytes(60)
            for copy in range(p.copies):
                arrival = start + i * 0.02 + p.delay + copy * 0.005
                call.rtp(
                    arrival,
                    from_caller=from_caller,
                    seq=seq,
                    rtp_ts=ts,
                    payload=body,
                    pt=p.pt,
                )
                last = max(last, arrival)
        seq += 1
        ts += PTIME
    return last


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    caller=_packets,
    callee=_packets,
    callee_after=st.floats(-0.5, 1.0),
    bye_after=st.floats(-0.5, 1.0),
)
def test_every_sidecar_keeps_its_gaps_inside_the_recording(
    caller: list[_Packet], callee: list[_Packet], callee_after: float, bye_after: float
) -> None:
    call = Call()
    answer = call.setup(
        T0,
        caller_sdp=sdp(CALLER_IP, 40000, "8 13 101"),
        callee_sdp=sdp(CALLEE_IP, 50000, "8 13 101"),
    )
    start = answer + 0.02
    last = _add_stream(call, start, caller, from_caller=True)
    last = max(last, _add_stream(call, start + callee_after, callee, from_caller=False))
    call.bye(max(answer + 0.05, last + bye_after))
    frames = [(ts, DLT_EN10MB, frame) for ts, frame in sorted(call.records, key=lambda r: r[0])]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pipeline = Pipeline(load_config(None), out, structlog.get_logger("test"))
        pipeline.run(frames)
        pipeline.close("capture_end")
        recordings = _recordings(out)
    assert recordings
    for doc, audio in recordings:
        _assert_gaps_inside(doc)
        if audio is not None:
            assert len(audio) == doc["audio"]["frames"]
