"""The fast lane (known RTP flows queued and placed as whole runs) must change nothing.

Every result of ``Pipeline.run`` — audio, stream statistics, gaps, DTMF — must be what the
general path gives packet by packet through ``Pipeline.feed``; and ``place_runs`` must leave a
stream exactly as ``RtpStream.push`` would, or untouched when it turns a run down.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import structlog
from callgen import CALLEE_IP, CALLER_IP, T0, Call, sdp, tone, write_pcap
from workload import write_workload

from callcap.capture.block import batched
from callcap.capture.pcapfile import CaptureReader
from callcap.capture.stream import RtpStream, place_runs
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline

PTIME = 160


def _record(
    capture: Path, out: Path, *, fast: bool | int
) -> tuple[Pipeline, dict[str, tuple[dict[str, Any], bytes]]]:
    """Record through ``feed`` frame by frame (``fast`` false), the capture's own blocks
    (true), or blocks of ``fast`` frames built from single frames (an int)."""
    pipeline = Pipeline(load_config(None), out, structlog.get_logger("test"))
    with CaptureReader(str(capture)) as reader:
        if fast is True:
            pipeline.run_blocks(reader.blocks())
        elif fast:
            pipeline.run_blocks(batched(iter(reader), size=fast))
        else:
            for ts, linktype, frame in reader:
                pipeline.feed(ts, linktype, frame)
    pipeline.close("capture_end")
    result = {}
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text())
        audio, _rate = soundfile.read(sidecar.with_suffix(".wav"), dtype="int16")
        result[doc["call_id"]] = (doc, audio.tobytes())
    return pipeline, result


@pytest.mark.parametrize(
    ("codec", "loss", "jitter_ms", "duplicate", "in_runs"),
    [
        ("pcmu", 0.0, 0.0, 0.0, 0.95),
        ("pcma", 0.005, 4.0, 0.0, 0.8),  # a fair network
        ("mixed", 0.03, 25.0, 0.02, 0.1),  # a bad one: reordering breaks most runs
    ],
)
def test_run_gives_what_feed_gives_packet_by_packet(
    tmp_path: Path, codec: str, loss: float, jitter_ms: float, duplicate: float, in_runs: float
) -> None:
    capture = tmp_path / "w.pcap"
    info = write_workload(
        capture,
        calls=12,
        seconds=20,
        seed=7,
        codec=codec,
        loss=loss,
        jitter_ms=jitter_ms,
        duplicate=duplicate,
    )
    fast_pipeline, fast = _record(capture, tmp_path / "fast", fast=True)
    slow_pipeline, slow = _record(capture, tmp_path / "slow", fast=False)
    # the fast lane really carried the audio (runs broken by loss go packet by packet)
    assert fast_pipeline.counters["rtp_placed_in_runs"] > in_runs * fast_pipeline.rtp_packets
    assert slow_pipeline.counters["rtp_placed_in_runs"] == 0
    assert fast_pipeline.rtp_packets == slow_pipeline.rtp_packets
    assert len(fast) == len(slow) == len(info.calls)
    for call_id, (doc, audio) in slow.items():
        fdoc, faudio = fast[call_id]
        assert faudio == audio
        assert fdoc["audio"]["sha256"] == doc["audio"]["sha256"]
        assert fdoc["streams"] == doc["streams"]
        assert fdoc["gaps"] == doc["gaps"]
        assert fdoc["dtmf"] == doc["dtmf"]
        assert any(s["packets"] > 500 for s in doc["streams"])  # real streams were compared


def _eventful_calls(path: Path) -> Path:
    """Three concurrent calls doing what moves the lane off its common case: media moved to
    a new port and codec by a re-INVITE mid-stream, an SSRC change, comfort noise, RFC 4733
    events, RTCP multiplexed on the RTP port, loss, reordering, a duplicate, a NAT'd source
    port, and calls ending while the others go on."""
    records: list[tuple[float, bytes]] = []
    one = Call(call_id="lane-1@10.20.0.1", caller_port=40000, callee_port=50000)
    answer = one.setup(T0)
    one.stream(answer + 0.1, tone(300, 2.0), from_caller=False, seq0=1, ts0=0)
    one.stream(answer + 0.1, tone(500, 4.0), from_caller=True, skip=[7, 40, 41])
    one.request(answer + 2.2, "INVITE", body=sdp(CALLER_IP, 40000))
    one.response(answer + 2.25, "200 OK", f"{one.cseq} INVITE", body=sdp(CALLEE_IP, 50002, "8"))
    one.request(answer + 2.26, "ACK")
    one.stream(answer + 2.3, tone(900, 1.5), from_caller=False, codec="PCMA", seq0=200, ts0=20000)
    one.records = [
        (ts, f[:34] + struct.pack("!H", 50002) + f[36:])
        if ts >= answer + 2.3 and len(f) > 100 and f[34:36] == struct.pack("!H", 50000)
        else (ts, f)
        for ts, f in one.records
    ]
    one.bye(answer + 4.5)
    records += one.records

    two = Call(call_id="lane-2@10.20.0.1", caller_port=40010, callee_port=50010)
    answer = two.setup(T0 + 0.3)
    two.stream(answer + 0.1, tone(700, 3.0), from_caller=True, seq0=65500, ts0=2**32 - 800)
    two.stream(answer + 0.1, tone(1100, 1.0), from_caller=False)
    two.stream(answer + 1.1, tone(1200, 2.0), from_caller=False, ssrc=0x0BADF00D, seq0=9, ts0=5)
    t = answer + 3.2
    two.rtp(
        t,
        from_caller=True,
        seq=65500 + 150,
        rtp_ts=(2**32 - 800 + 150 * 160) % 2**32,
        payload=b"\x40",
        pt=13,
    )
    for k in range(4):
        body = struct.pack("!BBH", 5, (0x80 if k == 3 else 0) | 10, (k + 1) * 160)
        two.rtp(
            t + 0.02 * (k + 1),
            from_caller=True,
            seq=65500 + 151 + k,
            rtp_ts=123456,
            payload=body,
            pt=101,
        )
    two.rtp(t + 0.2, from_caller=True, seq=0, rtp_ts=0, payload=bytes(20), pt=72)  # RTCP-mux SR
    two.bye(answer + 4.0, from_callee=True)
    records += two.records

    three = Call(call_id="lane-3@10.20.0.1", caller_port=40020, callee_port=50020)
    answer = three.setup(T0 + 0.6)
    for i in range(150):  # from a NAT'd port, with two packets swapped and one repeated
        j = {30: 31, 31: 30}.get(i, i)
        for again in (0.0, 0.005) if i == 60 else (0.0,):
            three.rtp(
                answer + 0.1 + i * 0.02 + again,
                from_caller=True,
                seq=j,
                rtp_ts=j * 160,
                payload=bytes([0x80 + (j % 64)]) * 160,
                src_port=61000,
            )
    three.stream(answer + 0.1, tone(1500, 3.0), from_caller=False)
    three.bye(answer + 6.0)
    records += three.records
    records.sort(key=lambda r: r[0])
    return write_pcap(path, records)


@pytest.mark.parametrize("blocks", [True, 1, 7, 64])
def test_blocks_cut_anywhere_give_what_feed_gives_on_eventful_calls(
    tmp_path: Path, blocks: bool | int
) -> None:
    capture = _eventful_calls(tmp_path / "calls.pcap")
    fast_pipeline, fast = _record(capture, tmp_path / "fast", fast=blocks)
    _slow_pipeline, slow = _record(capture, tmp_path / "slow", fast=False)
    assert len(slow) == 3
    assert fast_pipeline.counters["rtp_placed_in_runs"] > 0 or blocks == 1
    for call_id, (doc, audio) in slow.items():
        fdoc, faudio = fast[call_id]
        assert faudio == audio, call_id
        for key in ("streams", "gaps", "dtmf", "warnings", "audio"):
            assert fdoc[key] == doc[key], (call_id, key)
    docs = {call_id: doc for call_id, (doc, _a) in slow.items()}
    assert {s["codec"] for s in docs["lane-1@10.20.0.1"]["streams"]} == {"PCMU", "PCMA"}
    assert len(docs["lane-2@10.20.0.1"]["streams"]) == 3
    assert docs["lane-2@10.20.0.1"]["dtmf"]
    assert docs["lane-1@10.20.0.1"]["gaps"]


def _packets(
    rng: random.Random, n: int, seq0: int, ts0: int, t0: float
) -> list[tuple[float, int, int]]:
    """In-sequence 20 ms packets with arrival jitter: (arrival, seq, ts)."""
    return [
        (t0 + i * 0.02 + rng.uniform(0.0, 0.012), (seq0 + i) & 0xFFFF, (ts0 + i * PTIME) % 2**32)
        for i in range(n)
    ]


def _state(s: RtpStream) -> tuple[Any, ...]:
    st = s.stats
    return (
        s.received,
        s.lost,
        s.last_arrival,
        s.position(0),
        st.packets,
        dict(st.payload_types),
        st.duplicates,
        st.reordered,
        st.reanchors,
        [(g.from_pos, g.to_pos) for g in s.closed_gaps],
    )


def _place_one(stream: RtpStream, run: list[tuple[float, int, int]], pt: int = 0) -> Any:
    """One run of one stream through place_runs."""
    (placed,) = place_runs(
        [stream],
        np.array([0]),
        np.array([a for a, _, _ in run]),
        np.array([q for _, q, _ in run], dtype=np.uint16),
        np.array([t for _, _, t in run], dtype=np.uint32),
        [pt],
        [PTIME],
        np.array([True]),
    )
    return placed


@pytest.mark.parametrize("seed", range(6))
def test_place_runs_equals_push_one_by_one_across_wraps(seed: int) -> None:
    rng = random.Random(seed)
    # sequence numbers and timestamps that wrap inside the runs
    seq0, ts0 = 65536 - rng.randrange(1, 120), 2**32 - PTIME * rng.randrange(1, 150)
    packets = _packets(rng, 400, seq0, ts0, 1000.0)
    head, cuts = 7, sorted(rng.sample(range(8, 400), 3))
    reference = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    batched = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    expected = [reference.push(a, q, t, 0, PTIME) for a, q, t in packets]
    got: list[int | None] = [batched.push(a, q, t, 0, PTIME) for a, q, t in packets[:head]]
    # consecutive runs of one stream go in separate calls, as successive drains do
    for lo, hi in zip([head, *cuts], [*cuts, 400], strict=True):
        placed = _place_one(batched, packets[lo:hi])
        assert placed is not None
        got.extend(placed.tolist())
    assert got == expected
    assert _state(batched) == _state(reference)
    assert batched.jitter == pytest.approx(reference.jitter, rel=1e-9)
    assert batched.jitter_ms == pytest.approx(reference.jitter_ms, rel=1e-9)
    assert batched.jitter_mean_ms == pytest.approx(reference.jitter_mean_ms, rel=1e-9)


def test_place_runs_handles_several_streams_and_turns_down_only_the_bad_run() -> None:
    rng = random.Random(3)
    streams = [
        RtpStream(src=("a", i), dst=("b", 2), ssrc=i, side="caller", origin=999.0) for i in range(3)
    ]
    refs = [
        RtpStream(src=("a", i), dst=("b", 2), ssrc=i, side="caller", origin=999.0) for i in range(3)
    ]
    seqs0 = [100, 65530, 4000]
    all_packets = [_packets(rng, 60, seqs0[i], 1000 * i, 1000.0) for i in range(3)]
    for s, r, pk in zip(streams, refs, all_packets, strict=True):
        for a, q, t in pk[:5]:
            s.push(a, q, t, 8, PTIME)
            r.push(a, q, t, 8, PTIME)
    runs = [pk[5:] for pk in all_packets]
    runs[1] = runs[1][:10] + runs[1][11:]  # a lost packet: run 1 must be turned down
    before = _state(streams[1]), streams[1].jitter
    flat = [p for run in runs for p in run]
    starts = np.array([0, len(runs[0]), len(runs[0]) + len(runs[1])])
    placed = place_runs(
        streams,
        starts,
        np.array([a for a, _, _ in flat]),
        np.array([q for _, q, _ in flat], dtype=np.uint16),
        np.array([t for _, _, t in flat], dtype=np.uint32),
        [8, 8, 8],
        [PTIME] * 3,
        np.array([True, True, True]),
    )
    assert placed[1] is None
    assert (_state(streams[1]), streams[1].jitter) == before  # untouched
    for i in (0, 2):
        expected = [refs[i].push(a, q, t, 8, PTIME) for a, q, t in runs[i]]
        assert placed[i] is not None and placed[i].tolist() == expected
        assert _state(streams[i]) == _state(refs[i])
        assert streams[i].jitter == pytest.approx(refs[i].jitter, rel=1e-9)


def test_place_runs_turns_down_a_run_that_would_move_the_anchor() -> None:
    s = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    for i in range(5):
        s.push(1000.0 + i * 0.02 + 0.05, i, i * PTIME, 0, PTIME)
    before = _state(s)
    # the next packets arrive 40 ms *earlier* than the anchor allows: a re-anchor
    run = [(1000.0 + i * 0.02, i, i * PTIME) for i in range(5, 10)]
    assert _place_one(s, run) is None and _state(s) == before


def test_a_bug_in_the_lane_hands_the_block_to_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while a block is classified costs a counted internal error; the block's
    frames then go through ``feed`` and the recordings are exactly feed's."""
    import callcap.fastlane

    capture = _eventful_calls(tmp_path / "calls.pcap")
    _slow_pipeline, slow = _record(capture, tmp_path / "slow", fast=False)

    def broken(cls: Any, block: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(callcap.fastlane._BlockKeys, "of", classmethod(broken))
    fast_pipeline, fast = _record(capture, tmp_path / "fast", fast=True)
    assert fast_pipeline.drops.totals["internal_error"] >= 1
    assert fast_pipeline.counters["rtp_placed_in_runs"] == 0
    assert {k: (d["streams"], a) for k, (d, a) in fast.items()} == {
        k: (d["streams"], a) for k, (d, a) in slow.items()
    }


def test_a_bug_while_placing_costs_those_frames_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while queued frames are placed is a counted internal error; recording
    goes on and every call is still published."""
    from callcap.fastlane import FastLane

    capture = tmp_path / "w.pcap"
    info = write_workload(capture, calls=4, seconds=6, seed=3)
    calls = 0

    def broken(self: FastLane, parts: Any) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(FastLane, "_place", broken)
    pipeline, result = _record(capture, tmp_path / "out", fast=True)
    assert calls >= 1
    assert pipeline.drops.totals["internal_error"] == calls
    assert len(result) == len(info.calls)
    for doc, _audio in result.values():
        assert doc["audio"] is not None
