"""``callcap record`` on exactly known captures: the WAV holds what was sent, where it was sent.

Each test scripts a call (tests/callgen.py), runs the real command line on the pcap, and
asserts on samples and sidecar fields: placement on the shared timeline, silence for loss,
reordering and duplicates absorbed, late packets counted, SSRC changes, comfort noise, DTMF,
codecs that are not decoded, early media, media moving, NAT, failures and timeouts.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
from callgen import CALLEE_IP, CALLER_IP, PTIME, RATE, T0, Call, sdp, tone, udp_frame, write_pcap

from callcap.codecs.g711 import decode_alaw, decode_ulaw
from callcap.storage.lock import LOCK_FILE
from callcap.storage.sidecar import validate_sidecar


def record(
    tmp: Path, *captures: Path, config: str = "", expect: int = 0
) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "callcap",
        "record",
        *map(str, captures),
        "--out",
        str(tmp / "out"),
    ]
    if config:
        cfg = tmp / "callcap.yaml"
        cfg.write_text(config, encoding="utf-8")
        args += ["--config", str(cfg)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def outputs(tmp: Path) -> list[tuple[dict[str, Any], npt.NDArray[np.int16] | None]]:
    found = []
    for sidecar in sorted((tmp / "out").rglob("*.json")):
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        validate_sidecar(doc)
        wav = sidecar.with_suffix(".wav")
        audio = soundfile.read(str(wav), dtype="int16")[0] if wav.exists() else None
        found.append((doc, audio))
    return found


def one_call(tmp: Path) -> tuple[dict[str, Any], npt.NDArray[np.int16]]:
    ((doc, audio),) = outputs(tmp)
    assert audio is not None
    return doc, audio


def stream_of(doc: dict[str, Any], side: str) -> dict[str, Any]:
    (s,) = [s for s in doc["streams"] if s["side"] == side]
    return s


def basic(tmp: Path, **kw: Any) -> tuple[Call, npt.NDArray[np.int16], npt.NDArray[np.int16], float]:
    """Caller speaks from answer+0.02 s for 3 s; callee from 0.5 s later for 2 s."""
    call = Call()
    answer = call.setup(T0)
    a = tone(440, 3.0)
    b = tone(1000, 2.0)
    wire_a = call.stream(answer + 0.02, a, from_caller=True, **kw)
    wire_b = call.stream(answer + 0.52, b, from_caller=False, seq0=65500, ts0=0xFFFFFE00)
    call.bye(answer + 4.0)
    return call, decode_ulaw(wire_a), decode_ulaw(wire_b), answer


def test_both_sides_land_on_one_timeline_sample_exact(tmp_path: Path) -> None:
    call, ref_a, ref_b, _answer = basic(tmp_path)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert audio.shape[1] == 2
    # sample 0 = the first media packet (the caller's, at answer + 20 ms)
    assert doc["audio"]["start"] == "2023-11-14T22:13:21.020Z"
    assert np.array_equal(audio[: len(ref_a), 0], ref_a)
    assert not audio[len(ref_a) :, 0].any()
    off = 4000  # the callee started 0.5 s after the caller
    assert np.array_equal(audio[off : off + len(ref_b), 1], ref_b)
    assert not audio[:off, 1].any() and not audio[off + len(ref_b) :, 1].any()
    # the file runs to the BYE: 4.0 - 0.02 s
    assert len(audio) == round(3.98 * RATE)
    assert doc["end_reason"] == "bye_caller"
    assert (
        doc["answer"] == "2023-11-14T22:13:21.000Z" and doc["start"] == "2023-11-14T22:13:20.000Z"
    )
    assert doc["duration_s"] == 5.0 and doc["talk_s"] == 4.0
    for side, n in (("caller", 150), ("callee", 100)):
        s = stream_of(doc, side)
        assert (s["packets"], s["lost"], s["duplicates"], s["reordered"], s["late"]) == (
            n,
            0,
            0,
            0,
            0,
        )
        assert s["codec"] == "PCMU" and s["decoded"] and not s["encrypted"]
    assert stream_of(doc, "caller")["src"] == f"{CALLER_IP}:40000"
    assert doc["gaps"] == [] and doc["dtmf"] == []
    assert doc["consent"] == {
        "mode": "one_party",
        "rule": None,
        "status": "not_required",
        "evidence": None,
        "action": "kept",
    }
    assert (
        doc["retention"]["keep"] == "90d"
        and doc["retention"]["delete_after"] == "2024-02-12T22:13:25.000Z"
    )


def test_lost_packets_become_silence_of_their_length_and_a_gap(tmp_path: Path) -> None:
    call, ref_a, _ref_b, _answer = basic(tmp_path, skip=(10, 11, 12))
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    hole = slice(10 * PTIME, 13 * PTIME)
    assert not audio[hole, 0].any()
    expected = ref_a.copy()
    expected[hole] = 0
    assert np.array_equal(audio[: len(ref_a), 0], expected)  # never time-compressed
    assert stream_of(doc, "caller")["lost"] == 3
    # loss on the network, not in the sensor
    assert doc["gaps"] == [{"side": "caller", "from_s": 0.2, "to_s": 0.26, "capture_loss": False}]
    assert doc["capture_loss"] == []
    assert stream_of(doc, "caller")["capture_loss"] is False


def test_reordered_and_duplicated_packets_change_nothing_in_the_audio(tmp_path: Path) -> None:
    call, ref_a, _ref_b, _answer = basic(tmp_path)
    caller_rtp = [
        i
        for i, (_ts, f) in enumerate(call.records)
        if f[34:36] == struct.pack("!H", 40000) and len(f) > 100
    ]
    i, j = caller_rtp[20], caller_rtp[21]
    (ti, fi), (tj, fj) = call.records[i], call.records[j]
    call.records[i], call.records[j] = (tj + 0.005, fi), (ti, fj)  # 21 overtakes 20
    call.records.append((call.records[caller_rtp[30]][0] + 0.001, call.records[caller_rtp[30]][1]))
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[: len(ref_a), 0], ref_a)
    s = stream_of(doc, "caller")
    assert (s["reordered"], s["duplicates"], s["lost"], s["packets"]) == (1, 1, 0, 151)


def test_packet_later_than_the_jitter_window_is_counted_late_and_shown_as_gap(
    tmp_path: Path,
) -> None:
    call, ref_a, _ref_b, _answer = basic(tmp_path)
    caller_rtp = [
        i
        for i, (_ts, f) in enumerate(call.records)
        if f[34:36] == struct.pack("!H", 40000) and len(f) > 100
    ]
    k = caller_rtp[50]
    ts, frame = call.records[k]
    call.records[k] = (ts + 2.0, frame)  # two seconds late
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert not audio[50 * PTIME : 51 * PTIME, 0].any()
    assert np.array_equal(audio[: 50 * PTIME, 0], ref_a[: 50 * PTIME])
    assert stream_of(doc, "caller")["late"] == 1
    assert {"side": "caller", "from_s": 1.0, "to_s": 1.02, "capture_loss": False} in doc["gaps"]


def _delay_caller_rtp(call: Call, delay: Callable[[int], float]) -> None:
    """Move the caller's i-th RTP packet ``delay(i)`` seconds later on the wire."""
    moved = []
    i = 0
    for ts, frame in call.records:
        late = 0.0
        if frame[34:36] == struct.pack("!H", 40000) and len(frame) > 100:
            late = delay(i)
            i += 1
        moved.append((ts + late, frame))
    call.records[:] = sorted(moved, key=lambda r: r[0])


def test_a_path_delay_that_grows_for_good_is_followed_and_its_hole_is_a_gap(
    tmp_path: Path,
) -> None:
    """From its 75th packet on, the caller's audio comes 150 ms later (a route change, a
    sender that stalled): more than half the jitter window, inside a talk spurt.  The
    timeline follows capture time, which opens 150 ms of silence in the caller's speech;
    the sidecar lists it as a gap, and not one sample of the speech is lost."""
    call, ref_a, _ref_b, _answer = basic(tmp_path)
    _delay_caller_rtp(call, lambda i: 0.15 if i >= 75 else 0.0)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    s = stream_of(doc, "caller")
    assert (s["packets"], s["lost"], s["late"]) == (150, 0, 0)
    (gap,) = [g for g in doc["gaps"] if g["side"] == "caller"]
    assert round(gap["to_s"] - gap["from_s"], 3) == 0.15
    cut = round(gap["from_s"] * RATE)
    assert cut % PTIME == 0 and 75 * PTIME <= cut <= 150 * PTIME  # at a window's end
    shift = round(0.15 * RATE)
    assert np.array_equal(audio[:cut, 0], ref_a[:cut])
    assert not audio[cut : cut + shift, 0].any()
    assert np.array_equal(audio[cut + shift : len(ref_a) + shift, 0], ref_a[cut:])


def test_a_path_delay_that_shrinks_inside_a_spurt_shows_what_it_wrote_over(
    tmp_path: Path,
) -> None:
    """The caller's first 75 packets took 150 ms longer than the rest: the 76th overtakes
    seven of them, earlier than the timeline expects by more than half the jitter window,
    and the timeline steps back to capture time.  What the packets placed from then on
    wrote over — the last 150 ms of the 68 packets before — is listed as a gap of the
    caller, and everything else is the sender's audio, whole."""
    call, ref_a, _ref_b, _answer = basic(tmp_path)
    _delay_caller_rtp(call, lambda i: 0.15 if i < 75 else 0.0)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    s = stream_of(doc, "caller")
    assert (s["packets"], s["lost"], s["late"], s["reordered"]) == (150, 0, 0, 7)
    # sample 0 is the caller's first packet; the 76th came when the 68th was the newest
    assert [g for g in doc["gaps"] if g["side"] == "caller"] == [
        {"side": "caller", "from_s": 1.21, "to_s": 1.36, "capture_loss": False}
    ]
    cut, shift = 68 * PTIME - round(0.15 * RATE), round(0.15 * RATE)
    assert np.array_equal(audio[:cut, 0], ref_a[:cut])
    assert np.array_equal(audio[cut : len(ref_a) - shift, 0], ref_a[cut + shift :])


def test_ssrc_change_mid_call_continues_on_the_same_channel(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    first = call.stream(answer + 0.1, tone(500, 1.0), from_caller=True)
    second = call.stream(
        answer + 1.1, tone(700, 1.0), from_caller=True, ssrc=0x0BADF00D, seq0=30000, ts0=77_777_777
    )
    call.bye(answer + 2.5)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[:8000, 0], decode_ulaw(first))
    assert np.array_equal(audio[8000:16000, 0], decode_ulaw(second))
    assert sorted(s["ssrc"] for s in doc["streams"]) == ["0x0BADF00D", "0xCA11E500"]


def test_comfort_noise_is_silence_and_events_are_dtmf_not_audio(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    wire = call.stream(answer + 0.1, tone(500, 1.0), from_caller=True, seq0=1, ts0=0)
    t = answer + 1.1
    call.rtp(t, from_caller=True, seq=51, rtp_ts=8000, payload=b"\x40", pt=13)  # CN, RFC 3389
    for k in range(5):  # digit 7: updates, then the end packet three times
        end = k == 4
        body = struct.pack("!BBH", 7, (0x80 if end else 0) | 10, (k + 1) * 160)
        for _rep in range(3 if end else 1):
            call.rtp(
                t + 0.4 + k * 0.02,
                from_caller=True,
                seq=52 + k,
                rtp_ts=11200,
                payload=body,
                pt=101,
                marker=k == 0,
            )
    call.bye(answer + 2.5)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[:8000, 0], decode_ulaw(wire))
    assert not audio[8000:, 0].any()
    assert doc["dtmf"] == [
        {"digit": "7", "side": "caller", "source": "rfc4733", "at_s": 1.4, "duration_ms": 100}
    ]
    s = stream_of(doc, "caller")
    assert s["payload_types"] == {"0": 50, "13": 1, "101": 7}
    assert s["duplicates"] == 2


def test_unsupported_codec_is_reported_and_its_channel_is_silent(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(
        T0, caller_sdp=sdp(CALLER_IP, 40000, "18 0"), callee_sdp=sdp(CALLEE_IP, 50000, "18")
    )
    for i in range(50):
        call.rtp(
            answer + 0.1 + i * 0.02,
            from_caller=True,
            seq=i,
            rtp_ts=i * 160,
            payload=bytes(range(20)),
            pt=18,
        )
    call.bye(answer + 2)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert not audio.any()
    assert any(w["code"] == "unsupported_codec" and "G729" in w["detail"] for w in doc["warnings"])
    s = stream_of(doc, "caller")
    assert s["codec"] == "G729" and not s["decoded"] and s["packets"] == 50


def test_early_media_before_answer_is_recorded(tmp_path: Path) -> None:
    call = Call()
    call.request(T0, "INVITE", body=sdp(CALLER_IP, 40000), to_tag=False)
    call.response(T0 + 0.5, "183 Session Progress", body=sdp(CALLEE_IP, 50000))
    ringback = call.stream(T0 + 0.6, tone(425, 1.0), from_caller=False)
    call.response(T0 + 2.0, "200 OK", body=sdp(CALLEE_IP, 50000))
    call.request(T0 + 2.01, "ACK")
    call.bye(T0 + 3.0)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert doc["audio"]["start"] == "2023-11-14T22:13:20.600Z"
    assert np.array_equal(audio[:8000, 1], decode_ulaw(ringback))


def test_reinvite_moving_media_to_a_new_port_keeps_recording(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    one = call.stream(answer + 0.1, tone(300, 1.0), from_caller=False, seq0=1, ts0=0)
    call.request(answer + 1.2, "INVITE", body=sdp(CALLER_IP, 40000))
    call.response(answer + 1.25, "200 OK", f"{call.cseq} INVITE", body=sdp(CALLEE_IP, 50002, "8"))
    call.request(answer + 1.26, "ACK")
    two = call.stream(
        answer + 1.3, tone(900, 1.0), from_caller=False, codec="PCMA", seq0=60, ts0=9600
    )
    # after the move the callee also sends from the new port
    moved = [r for r in call.records if r[0] >= answer + 1.3 and len(r[1]) > 100]
    call.records = [r for r in call.records if r not in moved] + [
        (ts, f[:34] + struct.pack("!H", 50002) + f[36:]) for ts, f in moved
    ]
    call.bye(answer + 3.0)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[:8000, 1], decode_ulaw(one))
    assert np.array_equal(audio[9600:17600, 1], decode_alaw(two))
    assert sorted(s["codec"] for s in doc["streams"]) == ["PCMA", "PCMU"]


def test_nat_source_port_differs_from_sdp(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    for i in range(50):
        payload = bytes([0x80 + (i % 16)]) * 160
        call.rtp(
            answer + 0.1 + i * 0.02,
            from_caller=True,
            seq=i,
            rtp_ts=i * 160,
            payload=payload,
            src_port=61000,
        )
        call.rtp(
            answer + 0.1 + i * 0.02,
            from_caller=False,
            seq=i,
            rtp_ts=i * 160,
            payload=payload,
            dst_port=61000,
        )
    call.bye(answer + 2)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    doc, audio = one_call(tmp_path)
    assert {s["side"] for s in doc["streams"]} == {"caller", "callee"}
    assert audio[:, 0].any() and audio[:, 1].any()
    assert stream_of(doc, "caller")["src"] == f"{CALLER_IP}:61000"


def test_failed_call_gets_no_files_unless_configured(tmp_path: Path) -> None:
    call = Call()
    call.request(T0, "INVITE", body=sdp(CALLER_IP, 40000), to_tag=False)
    call.response(T0 + 0.5, "486 Busy Here")
    call.request(T0 + 0.51, "ACK")
    pcap = write_pcap(tmp_path / "c.pcap", call.records)
    record(tmp_path, pcap)
    assert not [p for p in (tmp_path / "out").rglob("*.*") if p.name != LOCK_FILE]
    record(tmp_path, pcap, config="recording:\n  record_failed_calls: true\n")
    ((doc, audio),) = outputs(tmp_path)
    assert audio is None and doc["audio"] is None
    assert (doc["end_reason"], doc["final_status"], doc["answer"]) == ("rejected_486", 486, None)


def test_call_without_bye_ends_by_inactivity_or_at_capture_end(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    call.stream(answer + 0.1, tone(500, 1.0), from_caller=True)
    other = Call(call_id="second-call@10.20.0.1", caller_port=40010, callee_port=50010)
    other.setup(T0 + 200)  # keeps the capture going long after the first call went quiet
    pcap = write_pcap(tmp_path / "c.pcap", call.records + other.records)
    record(tmp_path, pcap, config="calls:\n  inactivity_timeout_s: 30\n")
    docs = {doc["call_id"]: doc for doc, _ in outputs(tmp_path)}
    first = docs["test-call-1@10.20.0.1"]
    assert first["end_reason"] == "timeout"
    assert first["end"] == "2023-11-14T22:13:22.080Z"  # the last RTP packet
    assert docs["second-call@10.20.0.1"]["end_reason"] == "capture_end"


def test_hostile_call_id_never_reaches_a_path(tmp_path: Path) -> None:
    evil = "../../../etc/passwd\x00" + "A" * 10_000
    call = Call(call_id=evil)
    answer = call.setup(T0)
    call.stream(answer + 0.1, tone(500, 0.5), from_caller=True)
    call.bye(answer + 1)
    record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    (sidecar,) = (tmp_path / "out").rglob("*.json")
    assert sidecar.parent.parent.parent.parent == tmp_path / "out"
    assert len(sidecar.name) < 40
    doc = json.loads(sidecar.read_text(encoding="utf-8"))
    assert "\x00" not in doc["call_id"] and len(doc["call_id"]) < 700


def test_unreadable_capture_is_one_line_error_exit_2_and_others_still_recorded(
    tmp_path: Path,
) -> None:
    call, _a, _b, _ans = basic(tmp_path)
    good = write_pcap(tmp_path / "good.pcap", call.records)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture file at all")
    missing = tmp_path / "missing.pcap"
    proc = record(tmp_path, bad, missing, good, expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("callcap: error:")]
    assert len(errors) == 2
    assert str(bad) in errors[0] and str(missing) in errors[1]
    assert len(outputs(tmp_path)) == 1


def test_truncated_capture_keeps_everything_before_the_cut(tmp_path: Path) -> None:
    call, ref_a, _b, _ans = basic(tmp_path)
    pcap = write_pcap(tmp_path / "c.pcap", call.records)
    data = pcap.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 2 // 3 + 7])
    proc = record(tmp_path, cut)
    assert "capture_truncated" in proc.stderr
    doc, audio = one_call(tmp_path)
    assert doc["end_reason"] == "capture_end"
    assert [w["code"] for w in doc["warnings"]] == ["capture_truncated"]
    n = min(len(ref_a), len(audio)) - 2000
    assert np.array_equal(audio[:n, 0], ref_a[:n])


def test_vlan_tagged_trunk_traffic_is_recorded(tmp_path: Path) -> None:
    call, ref_a, _b, _ans = basic(tmp_path)
    tagged = [(ts, f[:12] + struct.pack("!HH", 0x8100, 42) + f[12:]) for ts, f in call.records]
    record(tmp_path, write_pcap(tmp_path / "c.pcap", tagged))
    _doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[: len(ref_a), 0], ref_a)


def test_rtp_for_unknown_addresses_and_garbage_are_ignored_without_harm(tmp_path: Path) -> None:
    call, ref_a, _b, _ans = basic(tmp_path)
    junk = [
        (T0 + 1.5, udp_frame("10.9.9.9", 5060, CALLEE_IP, 5060, b"INVITE garbage\r\n\r\n")),
        (T0 + 1.6, udp_frame("10.9.9.9", 7000, "10.9.9.8", 7002, b"\x80\x00" + b"\x00" * 170)),
        (T0 + 1.7, udp_frame(CALLEE_IP, 50000, CALLER_IP, 40000, b"\x80")),  # truncated RTP
        (T0 + 1.8, b"\x00" * 20),
    ]
    proc = record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records + junk))
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    reasons = {e.get("reason") for e in events if e["event"] == "packet_dropped"}
    assert {"sip_bad_start_line", "rtp_short"} <= reasons
    _doc, audio = one_call(tmp_path)
    assert np.array_equal(audio[: len(ref_a), 0], ref_a)


@pytest.mark.parametrize("n_calls", [5])
def test_concurrent_calls_do_not_mix(tmp_path: Path, n_calls: int) -> None:
    records = []
    refs = {}
    for k in range(n_calls):
        call = Call(call_id=f"multi-{k}@test", caller_port=41000 + 2 * k, callee_port=51000 + 2 * k)
        answer = call.setup(T0 + k * 0.3)
        refs[call.call_id] = decode_ulaw(
            call.stream(answer + 0.1, tone(300 + 100 * k, 1.0), from_caller=True, ssrc=1000 + k)
        )
        call.bye(answer + 1.5)
        records += call.records
    record(tmp_path, write_pcap(tmp_path / "c.pcap", records))
    found = outputs(tmp_path)
    assert len(found) == n_calls
    for doc, audio in found:
        assert audio is not None
        assert np.array_equal(audio[:8000, 0], refs[doc["call_id"]])


def test_a_bug_on_one_call_is_a_counted_drop_and_other_calls_are_unharmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an unexpected exception in one call's media path costs only that packet."""
    import io

    from callcap.capture.pcapfile import CaptureReader
    from callcap.config.loader import load_config
    from callcap.logs import configure_logging, get_logger
    from callcap.pipeline import Pipeline
    from callcap.recorder import CallRecorder

    good = Call(call_id="good@test", caller_port=41000, callee_port=51000)
    answer = good.setup(T0)
    ref = decode_ulaw(good.stream(answer + 0.1, tone(600, 1.0), from_caller=True, ssrc=7))
    good.bye(answer + 1.5)
    bad = Call(call_id="bad@test", caller_port=42000, callee_port=52000)
    answer = bad.setup(T0)
    bad.stream(answer + 0.1, tone(800, 1.0), from_caller=True, ssrc=8)
    bad.bye(answer + 1.5)
    pcap = write_pcap(tmp_path / "c.pcap", good.records + bad.records)

    original = CallRecorder.push

    def flaky(
        self: CallRecorder, ctx: Any, arrival: float, pt: int, seq: int, ts: int, payload: bytes
    ) -> None:
        if self.call.call_id == "bad@test":
            raise RuntimeError("simulated bug")
        original(self, ctx, arrival, pt, seq, ts, payload)

    monkeypatch.setattr(CallRecorder, "push", flaky)
    log = io.StringIO()
    configure_logging("json", "info", stream=log)
    pipeline = Pipeline(load_config(None), tmp_path / "out", get_logger())
    with CaptureReader(pcap) as reader:
        pipeline.run(reader)
    pipeline.close("capture_end")
    assert pipeline.drops.totals["internal_error"] == 50
    docs = {doc["call_id"]: (doc, audio) for doc, audio in outputs(tmp_path)}
    good_audio = docs["good@test"][1]
    assert good_audio is not None and np.array_equal(good_audio[:8000, 0], ref)
    assert docs["bad@test"][0]["end_reason"] == "bye_caller"
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert any(e["event"] == "packet_dropped" and e["reason"] == "internal_error" for e in events)
