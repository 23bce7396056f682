"""The fast lane (known RTP flows queued and placed as whole runs) must change nothing.

Every result of ``Pipeline.run`` — audio, stream statistics, gaps, DTMF — must be what the
general path gives packet by packet through ``Pipeline.feed``; and ``place_runs`` must leave a
stream exactly as ``RtpStream.push`` would, or untouched when it turns a run down.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import structlog
from callgen import CALLEE_IP, CALLER_IP, T0, Call, sdp, tone, write_pcap
from workload import write_workload

import callcap.fastlane
from callcap.capture.block import batched
from callcap.capture.link import (
    DLT_EN10MB,
    DLT_LINUX_SLL,
    DLT_LINUX_SLL2,
    DLT_RAW,
    DLT_RAW_12,
    DLT_RAW_14,
    ETH_IPV4,
    ETH_IPV6,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
)
from callcap.capture.pcapfile import CaptureReader
from callcap.capture.stream import RtpStream, place_runs
from callcap.config.loader import load_config
from callcap.fastlane import FastLane
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
    return pipeline, _outputs(out)


def _outputs(out: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    """Every recording under ``out``: Call-ID → (sidecar, audio bytes)."""
    result = {}
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text())
        audio, _rate = soundfile.read(sidecar.with_suffix(".wav"), dtype="int16")
        result[doc["call_id"]] = (doc, audio.tobytes())
    return result


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


@pytest.mark.parametrize("piece", [1, 16, 64])
def test_a_drain_placed_in_pieces_gives_what_feed_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """A drain is placed a few whole flows at a time (bounded arrays): on calls with loss,
    reordering, re-INVITEs, SSRC changes and DTMF the result is what feed gives."""
    monkeypatch.setattr(callcap.fastlane, "_PLACE_FRAMES", piece)
    cuts: list[int] = []  # pieces per drain
    groups = callcap.fastlane._Frames.groups

    def counting(self: Any, limit: int) -> Any:
        pieces = groups(self, limit)
        cuts.append(len(pieces))
        return pieces

    monkeypatch.setattr(callcap.fastlane._Frames, "groups", counting)
    capture = tmp_path / "w.pcap"
    write_workload(capture, calls=12, seconds=8, seed=3, codec="mixed", loss=0.01, jitter_ms=8.0)
    for source, name in ((capture, "workload"), (_eventful_calls(tmp_path / "e.pcap"), "eventful")):
        cuts.clear()
        fast_pipeline, fast = _record(source, tmp_path / f"fast-{name}", fast=True)
        _slow, slow = _record(source, tmp_path / f"slow-{name}", fast=False)
        assert fast_pipeline.counters["rtp_placed_in_runs"] > 0
        assert max(cuts) > 1, name  # drains really were cut
        assert set(fast) == set(slow)
        for call_id, (doc, audio) in slow.items():
            fdoc, faudio = fast[call_id]
            assert faudio == audio, (name, call_id)
            for key in ("streams", "gaps", "dtmf", "warnings", "audio"):
                assert fdoc[key] == doc[key], (name, call_id, key)


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


@pytest.mark.parametrize("seed", range(4))
def test_place_runs_after_a_loss_equals_push_one_by_one(seed: int) -> None:
    """A run that follows lost packets opens their gap itself (a lossy stream, or a sensor
    that overran, stays on the run path instead of going packet by packet)."""
    rng = random.Random(100 + seed)
    packets = _packets(rng, 600, 65536 - rng.randrange(1, 300), rng.randrange(2**32), 500.0)
    lost = set(rng.sample(range(5, 600), 90))  # 15 % loss, bursts of one to a few
    lost |= {i + 1 for i in lost if rng.random() < 0.3} - {600}
    kept = [p for i, p in enumerate(packets) if i not in lost]
    reference = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=499.0)
    batched = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=499.0)
    expected = [reference.push(a, q, t, 0, PTIME) for a, q, t in kept]
    got: list[int | None] = [batched.push(a, q, t, 0, PTIME) for a, q, t in kept[:3]]
    # runs of packets in sequence, cut where a packet is missing, one call each
    runs: list[list[tuple[float, int, int]]] = []
    for packet in kept[3:]:
        if runs and (packet[1] - runs[-1][-1][1]) & 0xFFFF == 1:
            runs[-1].append(packet)
        else:
            runs.append([packet])
    taken_after_loss = 0
    for run in runs:
        placed = _place_one(batched, run)
        assert placed is not None  # every run is taken, gap or not
        taken_after_loss += 1
        got.extend(placed.tolist())
    assert taken_after_loss > 50
    assert got == expected
    batched.finish()
    reference.finish()
    assert _state(batched) == _state(reference)
    trailing = sum(
        1 for i in range(599, 0, -1) if i in lost and all(j in lost for j in range(i, 600))
    )
    assert batched.lost == reference.lost == len(lost) - trailing  # never followed: not lost yet
    assert batched.closed_gaps and len(batched.closed_gaps) == len(reference.closed_gaps)
    assert batched.jitter == pytest.approx(reference.jitter, rel=1e-9)


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
        s.push(1000.0 + i * 0.02 + 0.15, i, i * PTIME, 0, PTIME)
    before = _state(s)
    # the next packets arrive 150 ms *earlier* than the anchor says, past the drift limit
    # (100 ms) even inside a talk spurt: a re-anchor
    run = [(1000.0 + i * 0.02, i, i * PTIME) for i in range(5, 10)]
    assert _place_one(s, run) is None and _state(s) == before


def test_place_runs_keeps_the_rtp_clock_inside_a_talk_spurt() -> None:
    """40 ms early is a step of the anchor at a spurt's boundary, not inside the spurt: the
    run is placed straight on from where the stream was, as push places it."""
    s = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    ref = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    for stream in (s, ref):
        for i in range(5):
            stream.push(1000.0 + i * 0.02 + 0.05, i, i * PTIME, 0, PTIME)
    run = [(1000.0 + i * 0.02, i, i * PTIME) for i in range(5, 10)]
    placed = _place_one(s, run)
    assert placed is not None
    assert placed.tolist() == [ref.push(a, q, t, 0, PTIME) for a, q, t in run]
    assert placed.tolist() == [ref.position(0) + i * PTIME for i in range(5, 10)]  # contiguous
    assert s.stats.reanchors == ref.stats.reanchors == 0
    # After silence (the timestamp jumps past the spurt's end) a lead or lag moves the
    # anchor: here the next spurt arrives 100 ms later than its media time says.
    for stream in (s, ref):
        stream.end_window()  # a flush came between
    after = [(1000.9 + i * 0.02, i, (i + 20) * PTIME) for i in range(10, 15)]
    assert _place_one(s, after) is None
    a, q, ts = after[0]
    assert ref.push(a, q, ts, 0, PTIME) == round((a - 999.0) * 8000)
    assert ref.stats.reanchors == 1


def test_a_sender_paced_by_a_lagging_clock_keeps_its_speech_whole() -> None:
    """Packets that arrive 2 % slower than their media time (a replay tool's pacing, a
    sender's timer) are placed back to back by their RTP clock inside a talk spurt: no
    holes in the speech, until the lag passes the drift limit, and then one step."""
    s = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    positions = []
    for i in range(500):
        positions.append(s.push(1000.0 + i * 0.02 * 1.02, i, i * PTIME, 0, PTIME))
        if i % 50 == 49:
            s.end_window()  # the recorder's flush, once a second
    steps = np.diff(np.array(positions))
    assert (steps == PTIME).sum() >= 497  # 10 s of speech: at most a couple of steps
    assert s.stats.reanchors <= 2
    # and placement never falls more than the drift limit (plus a packet) behind arrival
    lag = [(1000.0 + i * 0.02 * 1.02 - 999.0) * 8000 - p for i, p in enumerate(positions)]
    assert max(lag) <= s.drift_limit + 2 * PTIME
    # each step opened a hole in the speech, and each hole is a gap
    holes = [(p + PTIME, q) for p, q in itertools.pairwise(positions) if q != p + PTIME]
    assert holes and [(g.from_pos, g.to_pos) for g in s.closed_gaps] == holes


def test_place_runs_after_a_loss_judges_a_move_of_the_anchor_as_push_does() -> None:
    """The anchor moved forward at a window's end, and the next packets follow a loss:
    place_runs takes that run (a loss is a spurt's boundary) and must judge the move as
    push does: the loss's gap then spans the move's hole too, and nothing else is listed."""
    s = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    ref = RtpStream(src=("a", 1), dst=("b", 2), ssrc=1, side="caller", origin=999.0)
    late = 0.15  # from packet 50 on, every packet comes 150 ms later: a window's end follows
    for stream in (s, ref):
        for i in range(100):
            stream.push(1000.0 + i * 0.02 + (late if i >= 50 else 0.0), i, i * PTIME, 0, PTIME)
            if i % 50 == 49:
                stream.end_window()
    run = [(1000.0 + i * 0.02 + late, i, i * PTIME) for i in range(103, 110)]  # 100-102 lost
    placed = _place_one(s, run)
    assert placed is not None
    assert placed.tolist() == [ref.push(a, q, t, 0, PTIME) for a, q, t in run]
    for stream in (s, ref):
        stream.finish()
    assert _state(s) == _state(ref)
    gaps = [(g.from_pos, g.to_pos) for g in s.closed_gaps]
    hole = 8000 + 100 * PTIME  # origin is 1 s before the first packet
    # the loss's gap spans the three lost packets and the move's hole before them
    assert gaps == [(hole, hole + round(late * 8000) + 3 * PTIME)]


def test_a_bug_in_the_lane_hands_the_block_to_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while a block is classified costs a counted internal error; the block's
    frames then go through ``feed`` and the recordings are exactly feed's."""
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


# -- other link layers, IPv6 -----------------------------------------------------------------------
#
# The captures above are untagged Ethernet / IPv4.  The lane also reads VLAN tags (one or two),
# Linux cooked headers (SLL, SLL2), raw IP and IPv6: the same calls rewritten to each must be
# recorded exactly as ``feed`` records them, and mostly by the lane.

_MACS = bytes.fromhex("020000000002020000000001")  # destination, source
_SLL_ADDRESS = _MACS[6:] + bytes(2)  # the sender's MAC padded to SLL's 8 address bytes
_PCAP_UNITS = {b"\xd4\xc3\xb2\xa1": 10**6, b"\x4d\x3c\xb2\xa1": 10**9}  # little-endian magics
_IPV4_TEXT = re.compile(rb"\b10\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")

# An IP packet (with its EtherType-space protocol) → the frame carrying it on a link
Wrap = Callable[[int, bytes], bytes]
# An Ethernet frame's IPv4 packet → (protocol, the packet to carry instead)
Convert = Callable[[bytes], tuple[int, bytes]]


def _tagged(*tpids: int) -> Wrap:
    """Ethernet with a VLAN tag per TPID, outermost first."""
    tags = b"".join(struct.pack("!HH", tpid, 100 + i) for i, tpid in enumerate(tpids))
    return lambda etype, ip: _MACS + tags + struct.pack("!H", etype) + ip


def _sll(etype: int, ip: bytes) -> bytes:
    # packet type (0: to us), ARPHRD_ETHER, address length, address, protocol
    return struct.pack("!HHH8sH", 0, 1, 6, _SLL_ADDRESS, etype) + ip


def _sll2(etype: int, ip: bytes) -> bytes:
    # protocol, reserved, interface index, ARPHRD_ETHER, packet type, address length, address
    return struct.pack("!HHIHBB8s", etype, 0, 3, 1, 0, 6, _SLL_ADDRESS) + ip


def _bare(etype: int, ip: bytes) -> bytes:
    return ip


# name → (link type for IPv4, link type for IPv6, wrapper)
_LINKS: dict[str, tuple[int, int, Wrap]] = {
    "ethernet": (DLT_EN10MB, DLT_EN10MB, _tagged()),
    "vlan": (DLT_EN10MB, DLT_EN10MB, _tagged(0x8100)),
    "qinq": (DLT_EN10MB, DLT_EN10MB, _tagged(0x88A8, 0x8100)),
    "qinq-9100": (DLT_EN10MB, DLT_EN10MB, _tagged(0x9100, 0x9200)),
    "sll": (DLT_LINUX_SLL, DLT_LINUX_SLL, _sll),
    "sll2": (DLT_LINUX_SLL2, DLT_LINUX_SLL2, _sll2),
    "raw": (DLT_RAW, DLT_RAW, _bare),
    "raw12": (DLT_RAW_12, DLT_RAW_12, _bare),
    "raw14": (DLT_RAW_14, DLT_RAW_14, _bare),
    "raw-family": (LINKTYPE_IPV4, LINKTYPE_IPV6, _bare),  # 228 / 229
}


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _v6(addr: bytes) -> ipaddress.IPv6Address:
    """10.a.b.c → fd00::a:b:c."""
    assert len(addr) == 4 and addr[0] == 10
    return ipaddress.IPv6Address(b"\xfd\x00" + bytes(8) + struct.pack("!HHH", *addr[1:]))


def _v6_text(match: re.Match[bytes]) -> bytes:
    return str(_v6(bytes(int(part) for part in match[0].split(b".")))).encode()


def _sip_to_ipv6(text: bytes) -> bytes:
    """A SIP message as it would be over IPv6: SDP ``c=``/``o=`` lines ``IN IP6``, addresses
    in the start line and headers (Via, Contact, From, To) as IPv6 references (RFC 3261
    §25.1), Content-Length fixed.  The Call-ID stays as it is (it only looks like an address)."""
    head, sep, body = text.partition(b"\r\n\r\n")
    body = re.sub(rb"IN IP4 (\S+)", lambda m: b"IN IP6 " + _IPV4_TEXT.sub(_v6_text, m[1]), body)
    assert not _IPV4_TEXT.search(body)
    lines = []
    for line in head.split(b"\r\n"):
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"content-length":
            lines.append(b"Content-Length: %d" % len(body))
        elif name in (b"call-id", b"i"):
            lines.append(line)
        else:
            lines.append(_IPV4_TEXT.sub(lambda m: b"[" + _v6_text(m) + b"]", line))
    return b"\r\n".join(lines) + sep + body


def _same_ip(ip: bytes) -> tuple[int, bytes]:
    return ETH_IPV4, ip


def _ipv6(ip: bytes) -> tuple[int, bytes]:
    """An IPv4/UDP packet (no options) as IPv6/UDP: addresses mapped, SIP rewritten, lengths
    fixed; the UDP checksum stays 0 (callcap does not check it)."""
    assert ip[0] == 0x45 and ip[9] == 17
    (total,) = struct.unpack_from("!H", ip, 2)
    sport, dport, ulen, _sum = struct.unpack_from("!HHHH", ip, 20)
    payload = ip[28 : 20 + ulen]
    assert 20 + ulen <= total
    if 5060 in (sport, dport):
        payload = _sip_to_ipv6(payload)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    src, dst = _v6(ip[12:16]).packed, _v6(ip[16:20]).packed
    return ETH_IPV6, struct.pack("!IHBB16s16s", 0x6000_0000, len(udp), 17, 64, src, dst) + udp


def _ipv4_options(ip: bytes) -> tuple[int, bytes]:
    """IHL 6: a Router Alert option (RFC 2113) before the UDP header."""
    assert ip[0] == 0x45
    (total,) = struct.unpack_from("!H", ip, 2)
    head = bytearray(ip[:20] + b"\x94\x04\x00\x00")
    head[0] = 0x46
    struct.pack_into("!HH", head, 2, total + 4, 0)
    head[10:12] = b"\x00\x00"
    struct.pack_into("!H", head, 10, _checksum(bytes(head)))
    return ETH_IPV4, bytes(head) + ip[20:total]


def _ipv6_hop_by_hop(ip: bytes) -> tuple[int, bytes]:
    """IPv6 with a hop-by-hop options header (RFC 8200 §4.3: one PadN option) before UDP."""
    etype, packet = _ipv6(ip)
    (plen,) = struct.unpack_from("!H", packet, 4)
    head = packet[:4] + struct.pack("!HB", plen + 8, 0) + packet[7:40]
    return etype, head + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + packet[40:]


def _rewrite(capture: Path, out: Path, link: str, convert: Convert = _same_ip) -> Path:
    """``capture`` (Ethernet, untagged IPv4) with every frame's IP packet converted and put
    on ``link``: a classic pcap of the same timestamp format, the frames' times unchanged."""
    v4_type, v6_type, wrap = _LINKS[link]
    with capture.open("rb") as f:
        magic = f.read(4)
    unit = _PCAP_UNITS[magic]
    records = []
    families = set()
    with CaptureReader(capture) as reader:
        for ts, linktype, frame in reader:
            assert linktype == DLT_EN10MB and frame[12:14] == b"\x08\x00"
            etype, packet = convert(frame[14:])
            families.add(etype)
            new = wrap(etype, packet)
            sec = int(ts)
            frac = round((ts - sec) * unit)
            if frac == unit:
                sec, frac = sec + 1, 0
            records.append(struct.pack("<IIII", sec, frac, len(new), len(new)) + new)
    (family,) = families
    linktype = v6_type if family == ETH_IPV6 else v4_type
    with out.open("wb") as f:
        f.write(magic + struct.pack("<HHiIII", 2, 4, 0, 0, 262144, linktype))
        f.write(b"".join(records))
    with CaptureReader(capture) as before, CaptureReader(out) as after:
        assert after.linktype == linktype
        assert [ts for ts, _l, _f in after] == [ts for ts, _l, _f in before]
    return out


@dataclass
class _Source:
    """A capture of untagged Ethernet / IPv4 and what the lane made of it."""

    path: Path
    calls: int
    rtp: int  # RTP packets recorded
    placed: int  # of them, placed in runs by the lane
    recordings: dict[str, tuple[dict[str, Any], bytes]]  # feed's


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Source]:
    base = tmp_path_factory.mktemp("sources")
    workload = base / "workload.pcap"
    info = write_workload(workload, calls=8, seconds=10, seed=11, loss=0.005, jitter_ms=4)
    found = {}
    for name, path, calls in (
        ("workload", workload, len(info.calls)),
        ("eventful", _eventful_calls(base / "eventful.pcap"), 3),
    ):
        fast_pipeline, fast = _record(path, base / f"{name}-fast", fast=True)
        _slow_pipeline, slow = _record(path, base / f"{name}-slow", fast=False)
        _same_recordings(fast, slow, calls)
        found[name] = _Source(
            path=path,
            calls=calls,
            rtp=fast_pipeline.rtp_packets,
            placed=fast_pipeline.counters["rtp_placed_in_runs"],
            recordings=slow,
        )
    # the lane carried most of the workload and a good part of the eventful calls
    assert found["workload"].placed > 0.9 * found["workload"].rtp
    assert found["eventful"].placed > 0.3 * found["eventful"].rtp
    return found


_COMPARED = ("streams", "gaps", "dtmf", "warnings", "audio")


def _same_recordings(
    fast: dict[str, tuple[dict[str, Any], bytes]],
    slow: dict[str, tuple[dict[str, Any], bytes]],
    calls: int,
) -> None:
    """The lane's recordings are feed's, and there is something in them."""
    assert len(slow) == calls
    assert fast.keys() == slow.keys()
    for call_id, (doc, audio) in slow.items():
        fdoc, faudio = fast[call_id]
        assert faudio == audio, call_id
        for key in _COMPARED:
            assert fdoc[key] == doc[key], (call_id, key)
        assert np.abs(np.frombuffer(audio, dtype=np.int16)).max() > 1000, call_id  # not silent


def _record_both(
    capture: Path, out: Path, calls: int, fast: bool | int = True
) -> tuple[Pipeline, dict[str, tuple[dict[str, Any], bytes]]]:
    """Record ``capture`` through blocks and through feed; check they agree → the lane's."""
    fast_pipeline, fast_result = _record(capture, out / "fast", fast=fast)
    slow_pipeline, slow_result = _record(capture, out / "slow", fast=False)
    assert slow_pipeline.counters["rtp_placed_in_runs"] == 0
    assert fast_pipeline.rtp_packets == slow_pipeline.rtp_packets
    _same_recordings(fast_result, slow_result, calls)
    return fast_pipeline, fast_result


@pytest.mark.parametrize("source", ["workload", "eventful"])
@pytest.mark.parametrize(
    "link", ["vlan", "qinq", "qinq-9100", "sll", "sll2", "raw", "raw12", "raw14", "raw-family"]
)
def test_other_link_layers_take_the_lane_and_give_what_feed_gives(
    tmp_path: Path, sources: dict[str, _Source], link: str, source: str
) -> None:
    src = sources[source]
    capture = _rewrite(src.path, tmp_path / f"{link}.pcap", link)
    pipeline, result = _record_both(capture, tmp_path, src.calls)
    # the same calls as on untagged Ethernet, and the lane carried exactly as much of them
    assert {k: (d["streams"], a) for k, (d, a) in result.items()} == {
        k: (d["streams"], a) for k, (d, a) in src.recordings.items()
    }
    assert pipeline.rtp_packets == src.rtp
    assert pipeline.counters["rtp_placed_in_runs"] == src.placed


@pytest.mark.parametrize("source", ["workload", "eventful"])
@pytest.mark.parametrize("link", ["ethernet", "vlan", "qinq", "sll2", "sll", "raw", "raw-family"])
def test_ipv6_takes_the_lane_and_gives_what_feed_gives(
    tmp_path: Path, sources: dict[str, _Source], link: str, source: str
) -> None:
    src = sources[source]
    capture = _rewrite(src.path, tmp_path / f"{link}6.pcap", link, _ipv6)
    pipeline, result = _record_both(capture, tmp_path, src.calls)
    # the calls of the IPv4 capture, with their media over IPv6: as many packets, and as
    # many of them in runs
    assert pipeline.rtp_packets == src.rtp
    assert pipeline.counters["rtp_placed_in_runs"] == src.placed
    for call_id, (doc, audio) in result.items():
        before, before_audio = src.recordings[call_id]
        assert audio == before_audio, call_id
        assert ipaddress.ip_address(doc["caller_ip"]).version == 6
        assert [s["src"] for s in doc["streams"]] == [
            f"[{_v6(ipaddress.IPv4Address(s['src'].split(':')[0]).packed)}]:"
            + s["src"].split(":")[1]
            for s in before["streams"]
        ]
        strip = ("src", "dst")
        assert [{k: v for k, v in s.items() if k not in strip} for s in doc["streams"]] == [
            {k: v for k, v in s.items() if k not in strip} for s in before["streams"]
        ]


@pytest.mark.parametrize("blocks", [1, 7, 64])
@pytest.mark.parametrize(("link", "convert"), [("qinq", _same_ip), ("sll2", _ipv6), ("raw", _ipv6)])
def test_blocks_cut_anywhere_give_what_feed_gives_on_other_links(
    tmp_path: Path, sources: dict[str, _Source], link: str, convert: Convert, blocks: int
) -> None:
    src = sources["eventful"]
    capture = _rewrite(src.path, tmp_path / "calls.pcap", link, convert)
    pipeline, _result = _record_both(capture, tmp_path, src.calls, fast=blocks)
    assert pipeline.counters["rtp_placed_in_runs"] > 0 or blocks == 1


@pytest.mark.parametrize("source", ["workload", "eventful"])
@pytest.mark.parametrize("link", ["ethernet", "sll2", "raw"])
@pytest.mark.parametrize("convert", [_ipv4_options, _ipv6_hop_by_hop])
def test_ip_headers_the_lane_does_not_read_go_through_feed(
    tmp_path: Path, sources: dict[str, _Source], link: str, source: str, convert: Convert
) -> None:
    """IPv4 with options and IPv6 with an extension header never take the lane, and are
    recorded as feed records them."""
    src = sources[source]
    capture = _rewrite(src.path, tmp_path / "calls.pcap", link, convert)
    pipeline, result = _record_both(capture, tmp_path, src.calls)
    assert pipeline.counters["rtp_placed_in_runs"] == 0
    assert pipeline.rtp_packets == src.rtp
    assert {k: a for k, (_d, a) in result.items()} == {
        k: a for k, (_d, a) in src.recordings.items()
    }


Frame = tuple[float, int, bytes]


def _record_frames(
    frames: list[Frame], out: Path, *, fast: int
) -> tuple[Pipeline, dict[str, tuple[dict[str, Any], bytes]]]:
    """:func:`_record` for frames in memory (several link types in one block, as a pcapng
    capture of several interfaces or a live ``any`` capture gives them)."""
    pipeline = Pipeline(load_config(None), out, structlog.get_logger("test"))
    if fast:
        pipeline.run_blocks(batched(iter(frames), size=fast))
    else:
        for ts, linktype, frame in frames:
            pipeline.feed(ts, linktype, frame)
    pipeline.close("capture_end")
    return pipeline, _outputs(out)


def _tso(etype: int, ip: bytes) -> bytes:
    """The IP length field 0, as captured on a host with segmentation offload."""
    at = 4 if etype == ETH_IPV6 else 2
    return _MACS + struct.pack("!H", etype) + ip[:at] + b"\x00\x00" + ip[at + 2 :]


# Frames every link of a capture may carry besides the ones above: (linktype, wrapper) by
# family; None: the link type of the other family (a malformed frame both paths drop).
_ODD_LINKS: dict[str, tuple[int | None, Wrap]] = {
    "ethernet-padded": (
        DLT_EN10MB,
        lambda etype, ip: _MACS + struct.pack("!H", etype) + ip + bytes(4),
    ),
    "sll2-padded": (DLT_LINUX_SLL2, lambda etype, ip: _sll2(etype, ip) + b"\xff" * 3),
    "three-tags": (DLT_EN10MB, _tagged(0x88A8, 0x8100, 0x8100)),
    "sll-vlan": (DLT_LINUX_SLL, lambda etype, ip: _sll(0x8100, struct.pack("!HH", 7, etype) + ip)),
    "tso": (DLT_EN10MB, _tso),
    "wrong-family": (None, _bare),
}


@pytest.mark.parametrize("blocks", [7, 100_000])
@pytest.mark.parametrize("convert", [_same_ip, _ipv6])
def test_links_mixed_in_one_block_give_what_feed_gives(
    tmp_path: Path, sources: dict[str, _Source], convert: Convert, blocks: int
) -> None:
    """Every RTP frame of the eventful calls on another link than the one before it — the
    ones the lane reads, and odd ones it must leave to ``feed``: Ethernet padding, three
    VLAN tags, a VLAN tag left in an SLL frame, no IP length (segmentation offload), and an
    IPv6 packet on LINKTYPE_IPV4 or IPv4 on LINKTYPE_IPV6 (dropped by both)."""
    src = sources["eventful"]
    with CaptureReader(src.path) as reader:
        original = list(reader)
    links = [*_LINKS, *_ODD_LINKS]
    frames: list[Frame] = []
    rtp = 0
    for ts, _linktype, frame in original:
        etype, packet = convert(frame[14:])
        v6 = etype == ETH_IPV6
        if 5060 in struct.unpack_from("!HH", frame, 34):  # SIP: plain Ethernet
            frames.append((ts, DLT_EN10MB, _MACS + struct.pack("!H", etype) + packet))
            continue
        name = links[rtp % len(links)]
        rtp += 1
        if name in _LINKS:
            v4_type, v6_type, wrap = _LINKS[name]
            linktype = v6_type if v6 else v4_type
        else:
            odd, wrap = _ODD_LINKS[name]
            linktype = odd if odd is not None else LINKTYPE_IPV4 if v6 else LINKTYPE_IPV6
        frames.append((ts, linktype, wrap(etype, packet)))
    fast_pipeline, fast = _record_frames(frames, tmp_path / "fast", fast=blocks)
    slow_pipeline, slow = _record_frames(frames, tmp_path / "slow", fast=0)
    _same_recordings(fast, slow, src.calls)
    assert fast_pipeline.rtp_packets == slow_pipeline.rtp_packets
    assert fast_pipeline.rtp_packets < src.rtp  # the frames of the wrong family were dropped
    assert fast_pipeline.drops.totals == slow_pipeline.drops.totals
    assert fast_pipeline.counters["rtp_placed_in_runs"] > 0
