"""The benchmark workload generator writes exactly the calls its ground truth describes.

The benchmark's numbers are only meaningful if its input is a real capture: other tools
(scapy, tshark) must read it cleanly, and what it contains — dialogs, streams, packet counts,
sequence numbers, tones — must match the :class:`WorkloadInfo` the generator returns, so
that recording tests can assert on it.  The file is read back here with a plain ``struct``
walk over the pcap records, independent of the generator's own code.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callcap.codecs.g711 import decode_alaw, decode_ulaw

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load_workload() -> ModuleType:
    spec = importlib.util.spec_from_file_location("callcap_bench_workload", BENCH / "workload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


wl = _load_workload()

_REC = struct.Struct("<IIII")
_RTP = struct.Struct("!BBHII")


@dataclass(frozen=True)
class Packet:
    time: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def _ip(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def read_packets(data: bytes) -> list[Packet]:
    """Walk a little-endian µs pcap of Ethernet/IPv4/UDP frames (what the generator writes)."""
    assert struct.unpack_from("<IHHiIII", data) == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    out, off = [], 24
    while off < len(data):
        sec, usec, incl, orig = _REC.unpack_from(data, off)
        frame = data[off + 16 : off + 16 + incl]
        assert incl == orig == len(frame)
        assert frame[12:14] == b"\x08\x00" and frame[14] == 0x45 and frame[23] == 17
        ip_len, udp_len = (
            struct.unpack_from("!H", frame, 16)[0],
            struct.unpack_from("!H", frame, 38)[0],
        )
        assert ip_len == len(frame) - 14 and udp_len == ip_len - 20
        sport, dport = struct.unpack_from("!HH", frame, 34)
        out.append(
            Packet(sec + usec / 1e6, _ip(frame[26:30]), sport, _ip(frame[30:34]), dport, frame[42:])
        )
        off += 16 + incl
    assert off == len(data)
    return out


def rtp_by_stream(
    packets: list[Packet],
) -> dict[tuple[str, int], list[tuple[float, int, int, int, int, bytes]]]:
    """(src, sport) → [(time, marker+pt, seq, ts, ssrc, payload)] in file order."""
    streams: dict[tuple[str, int], list[tuple[float, int, int, int, int, bytes]]] = defaultdict(
        list
    )
    for p in packets:
        if p.sport != wl.SIP_PORT:
            b0, mpt, seq, ts, ssrc = _RTP.unpack_from(p.payload)
            assert b0 == 0x80
            streams[(p.src, p.sport)].append((p.time, mpt, seq, ts, ssrc, p.payload[12:]))
    return streams


def _method_or_status(sip: bytes) -> bytes:
    words = sip.split(b"\r\n", 1)[0].split(b" ")
    return words[1] if words[0] == b"SIP/2.0" else words[0]


def _streams(info: Any) -> Iterator[Any]:
    for call in info.calls:
        yield call.caller
        yield call.callee


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[Packet]]:
    path = tmp_path_factory.mktemp("workload") / "small.pcap"
    info = wl.write_workload(path, calls=3, seconds=2, seed=7, codec="mixed")
    return path, info, read_packets(path.read_bytes())


def test_scapy_and_tshark_read_every_record_without_complaint(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    from scapy.layers.inet import UDP
    from scapy.utils import rdpcap

    path, info, _ = small
    packets = rdpcap(str(path))
    assert len(packets) == info.total_packets
    assert all(UDP in p for p in packets)
    proc = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number", "-e", "_ws.expert"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == info.total_packets
    assert "cut short" not in proc.stderr and "damaged" not in proc.stderr
    assert all(line.split("\t")[1] == "" for line in lines)  # no malformed-packet expert info


def test_tshark_sees_one_invite_per_call_and_every_rtp_stream(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    path, info, _ = small
    invites = subprocess.run(
        [
            "tshark",
            "-r",
            str(path),
            "-Y",
            'sip.Method == "INVITE"',
            "-T",
            "fields",
            "-e",
            "sip.Call-ID",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(invites) == sorted(c.call_id for c in info.calls)
    report = subprocess.run(
        ["tshark", "-r", str(path), "-o", "rtp.heuristic_rtp:TRUE", "-q", "-z", "rtp,streams"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen: dict[int, tuple[str, int]] = {}
    for line in report.splitlines():
        tokens = line.split()
        ssrc_at = next((i for i, t in enumerate(tokens) if t.startswith("0x")), None)
        if ssrc_at is not None:
            seen[int(tokens[ssrc_at], 16)] = (tokens[ssrc_at + 1], int(tokens[ssrc_at + 2]))
    expected = {
        s.ssrc: ("g711U" if s.payload_type == 0 else "g711A", s.packets) for s in _streams(info)
    }
    assert seen == expected


def test_each_direction_has_exactly_the_packets_the_info_promises(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    _, info, packets = small
    streams = rtp_by_stream(packets)
    assert len(streams) == 2 * len(info.calls)
    for call in info.calls:
        assert len(streams[(call.caller_ip, call.caller.src_port)]) == call.caller_packets
        assert len(streams[(call.callee_ip, call.callee.src_port)]) == call.callee_packets
        assert call.caller_packets == call.caller.packets_sent > 40
        assert call.callee.dst_port == call.caller.src_port
    sip = [p for p in packets if p.sport == wl.SIP_PORT]
    assert len(sip) == info.sip_packets == 7 * len(info.calls)
    assert len(packets) == info.total_packets == info.sip_packets + info.rtp_packets


def test_dialogs_run_invite_to_bye_and_the_right_side_hangs_up(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    _, info, packets = small
    streams = rtp_by_stream(packets)
    for call in info.calls:
        msgs = [p for p in packets if p.sport == wl.SIP_PORT and call.call_id.encode() in p.payload]
        assert [_method_or_status(m.payload) for m in msgs] == [
            b"INVITE", b"100", b"180", b"200", b"ACK", b"BYE", b"200"
        ]  # fmt: skip
        assert msgs[0].time == pytest.approx(call.start_time, abs=1e-6)
        assert msgs[3].time == pytest.approx(call.answer_time, abs=1e-6)
        assert msgs[5].time == pytest.approx(call.end_time, abs=1e-6)
        bye_src = call.caller_ip if call.bye_from == "caller" else call.callee_ip
        assert msgs[5].src == bye_src
        assert call.bye_from == ("caller" if call.index % 2 == 0 else "callee")
        assert b"m=audio %d RTP/AVP 0 8 101" % call.caller.src_port in msgs[0].payload
        assert b"a=sendrecv" in msgs[0].payload
        answer_pt = wl.PAYLOAD_TYPES[call.codec]
        assert b"m=audio %d RTP/AVP %d 101" % (call.callee.src_port, answer_pt) in msgs[3].payload
        for s in (call.caller, call.callee):
            times = [row[0] for row in streams[(s.src_ip, s.src_port)]]
            assert call.answer_time < min(times) and max(times) < call.end_time


def test_rtp_headers_are_continuous_and_some_streams_wrap(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    _, info, packets = small
    streams = rtp_by_stream(packets)
    wrapped_seq = wrapped_ts = 0
    for s in _streams(info):
        rows = streams[(s.src_ip, s.src_port)]
        seqs = np.array([r[2] for r in rows])
        tss = np.array([r[3] for r in rows])
        assert {r[4] for r in rows} == {s.ssrc}
        assert [r[1] for r in rows] == [0x80 | s.payload_type] + [s.payload_type] * (len(rows) - 1)
        assert seqs[0] == s.first_seq and tss[0] == s.first_timestamp
        assert np.all(np.diff(seqs) % 65536 == 1)
        assert np.all(np.diff(tss) % 2**32 == 160)
        assert np.allclose(np.diff([r[0] for r in rows]), 0.02, rtol=0, atol=1e-6)
        wrapped_seq += bool(np.any(np.diff(seqs) < 0))
        wrapped_ts += bool(np.any(np.diff(tss) < 0))
    assert wrapped_seq >= 1 and wrapped_ts >= 1


def test_capture_time_never_goes_backwards_without_jitter(
    small: tuple[Path, Any, list[Packet]],
) -> None:
    _, info, packets = small
    times = np.array([p.time for p in packets])
    assert np.all(np.diff(times) >= 0)
    assert times[0] == pytest.approx(info.start_time + 0.001)
    assert times[-1] == pytest.approx(info.end_time) and info.end_time < info.start_time + 2


def test_each_side_plays_its_own_tone(small: tuple[Path, Any, list[Packet]]) -> None:
    _, info, packets = small
    streams = rtp_by_stream(packets)
    for call in info.calls:
        decode = decode_ulaw if call.codec == "PCMU" else decode_alaw
        for s, hz in ((call.caller, call.caller_tone_hz), (call.callee, call.callee_tone_hz)):
            rows = sorted(
                streams[(s.src_ip, s.src_port)], key=lambda r: (r[2] - s.first_seq) % 65536
            )
            pcm = decode(b"".join(r[5] for r in rows)).astype(np.float64)
            spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
            peak = np.argmax(spectrum) * wl.RATE / len(pcm)
            assert peak == pytest.approx(hz, abs=1.0)
            assert s.tone_hz == hz and 300 <= hz <= 3400
            assert np.sqrt(np.mean(pcm**2)) == pytest.approx(0.3 * 32767 / np.sqrt(2), rel=0.05)
    tones = [t for c in info.calls for t in (c.caller_tone_hz, c.callee_tone_hz)]
    assert len(set(tones)) == len(tones)


def test_loss_drops_about_the_requested_fraction_and_info_counts_survivors(tmp_path: Path) -> None:
    path = tmp_path / "lossy.pcap"
    info = wl.write_workload(path, calls=4, seconds=10, seed=3, loss=0.1)
    streams = rtp_by_stream(read_packets(path.read_bytes()))
    sent = sum(s.packets_sent for s in _streams(info))
    kept = sum(s.packets for s in _streams(info))
    assert kept == info.rtp_packets
    assert 1 - kept / sent == pytest.approx(0.1, abs=0.02)
    for s in _streams(info):
        seqs = [r[2] for r in streams[(s.src_ip, s.src_port)]]
        assert len(seqs) == s.packets
        assert all(d % 65536 >= 1 for d in np.diff(seqs))  # gaps, never reordering
    assert info.sip_packets == 28  # signalling is never dropped


def test_jitter_reorders_within_a_stream_but_capture_time_stays_monotonic(tmp_path: Path) -> None:
    path = tmp_path / "jitter.pcap"
    info = wl.write_workload(path, calls=2, seconds=5, seed=5, jitter_ms=60)
    packets = read_packets(path.read_bytes())
    assert np.all(np.diff([p.time for p in packets]) >= 0)
    streams = rtp_by_stream(packets)
    reordered = 0
    for s in _streams(info):
        rows = streams[(s.src_ip, s.src_port)]
        pos = np.array([(r[2] - s.first_seq) % 65536 for r in rows])
        assert sorted(pos) == list(range(s.packets_sent))  # nothing lost, nothing added
        reordered += int(np.sum(np.diff(pos) < 0))
        displacement = np.array([r[0] for r in rows]) - (s.first_time + 0.02 * pos)
        assert displacement.min() >= -1e-6 and displacement.max() <= 0.060 + 1e-6
    assert reordered > 10


def test_duplicates_repeat_existing_packets(tmp_path: Path) -> None:
    path = tmp_path / "dup.pcap"
    info = wl.write_workload(path, calls=2, seconds=10, seed=9, duplicate=0.05)
    streams = rtp_by_stream(read_packets(path.read_bytes()))
    extra = 0
    for s in _streams(info):
        counts = Counter((r[2], r[3]) for r in streams[(s.src_ip, s.src_port)])
        assert len(counts) == s.packets_sent
        assert s.packets == sum(counts.values())
        extra += s.packets - s.packets_sent
    sent = sum(s.packets_sent for s in _streams(info))
    assert extra / sent == pytest.approx(0.05, abs=0.015)


def test_same_seed_same_bytes_and_the_cli_streams_them_to_stdout(tmp_path: Path) -> None:
    one, two = io.BytesIO(), io.BytesIO()
    wl.write_workload(one, calls=2, seconds=3, seed=11, codec="pcma")
    wl.write_workload(two, calls=2, seconds=3, seed=11, codec="pcma")
    assert one.getvalue() == two.getvalue()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "workload.py"), "--calls", "2", "--seconds", "3",
         "--seed", "11", "--codec", "pcma", "--out", "-", "--info", str(tmp_path / "info.json")],
        capture_output=True,
        check=True,
    )  # fmt: skip
    assert proc.stdout == one.getvalue()
    assert b'"call_id"' in (tmp_path / "info.json").read_bytes()
    different = io.BytesIO()
    wl.write_workload(different, calls=2, seconds=3, seed=12, codec="pcma")
    assert different.getvalue() != one.getvalue()


def test_bad_parameters_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    for kwargs in (
        {"calls": 0},
        {"seconds": 0.5},
        {"codec": "g729"},
        {"loss": 1.0},
        {"jitter_ms": -1},
    ):
        args: dict[str, Any] = {"calls": 1, "seconds": 2, **kwargs}
        with pytest.raises(ValueError):
            wl.write_workload(tmp_path / "x.pcap", **args)
    assert not (tmp_path / "x.pcap").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_an_hour_long_call_needs_no_more_memory_than_ten_minutes() -> None:
    # The high-water mark is read inside a fresh child: its own ru_maxrss would include the
    # RSS of this (forking) test process, VmHWM of its own address space does not.
    script = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('w', {str(BENCH / 'workload.py')!r})\n"
        "w = importlib.util.module_from_spec(spec); sys.modules['w'] = w; spec.loader.exec_module(w)\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'): return int(line.split()[1])\n"
        "with open(os.devnull, 'wb') as f:\n"
        "    w.write_workload(f, calls=1, seconds=600)\n"
        "    a = hwm()\n"
        "    info = w.write_workload(f, calls=1, seconds=3600)\n"
        "    print(a, hwm(), info.total_packets)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ten_min_kib, hour_kib, packets = map(int, out.stdout.split())
    assert packets > 355_000
    assert hour_kib - ten_min_kib < 2 * 1024, (ten_min_kib, hour_kib)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.integers(1, 4),
    seconds=st.floats(1.0, 3.0),
    seed=st.integers(0, 2**32),
    codec=st.sampled_from(["pcmu", "pcma", "mixed"]),
    loss=st.sampled_from([0.0, 0.2]),
    jitter_ms=st.sampled_from([0.0, 35.0]),
    duplicate=st.sampled_from([0.0, 0.1]),
)
def test_any_parameters_give_a_capture_matching_its_ground_truth(
    calls: int,
    seconds: float,
    seed: int,
    codec: str,
    loss: float,
    jitter_ms: float,
    duplicate: float,
) -> None:
    buf = io.BytesIO()
    info = wl.write_workload(
        buf, calls=calls, seconds=seconds, seed=seed, codec=codec, loss=loss,
        jitter_ms=jitter_ms, duplicate=duplicate,
    )  # fmt: skip
    packets = read_packets(buf.getvalue())
    assert len(packets) == info.total_packets
    assert np.all(np.diff([p.time for p in packets]) >= 0)
    streams = rtp_by_stream(packets)
    for s in _streams(info):
        assert len(streams.get((s.src_ip, s.src_port), [])) == s.packets
