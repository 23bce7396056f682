"""PCI pause: card digits keyed while the recording is paused reach no file, the paused span is
digital silence in both channels to the sample, and the audio around it is untouched."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from callgen import RATE, T0, Call, write_pcap
from test_recording_pipeline import one_call
from test_recording_pipeline import record as run_record

from callcap.codecs.g711 import decode_ulaw
from callcap.codecs.inband import HIGH_GROUP, KEYS, LOW_GROUP, InbandDtmfDetector

CARD = "4111111111111111"
EVENT_CODES = {d: i for i, d in enumerate("0123456789*#ABCD")}


def key_tone(digit: str, seconds: float, amplitude: float = 5000.0) -> npt.NDArray[np.float64]:
    i = KEYS.index(digit)
    t = np.arange(round(seconds * RATE)) / RATE
    return amplitude * (
        np.sin(2 * np.pi * LOW_GROUP[i // 4] * t) + np.sin(2 * np.pi * HIGH_GROUP[i % 4] * t)
    )


def voice(seconds: float, f0: float) -> npt.NDArray[np.float64]:
    """A stand-in for speech: a few harmonics with a slow vibrato (no keypad pair)."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = 2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * 3 * t)
    return sum(2500 / k * np.sin(k * phase) for k in (1, 2, 3, 5))  # type: ignore[return-value]


def place(audio: npt.NDArray[np.float64], at: float, part: npt.NDArray[np.float64]) -> None:
    i = round(at * RATE)
    audio[i : i + len(part)] = part


def events(
    call: Call, start: float, digits: list[tuple[float, str]], *, from_caller: bool = False
) -> None:
    """RFC 4733 events from the callee (or the caller), on their own SSRC, 100 ms each, the
    end packet three times."""
    seq = 7000
    for at, digit in digits:
        ts = 80_000 + round(at * RATE)
        for k in range(5):
            end = k == 4
            body = struct.pack("!BBH", EVENT_CODES[digit], (0x80 if end else 0) | 10, (k + 1) * 160)
            for _ in range(3 if end else 1):
                call.rtp(
                    start + at + k * 0.02,
                    from_caller=from_caller,
                    seq=seq,
                    rtp_ts=ts,
                    payload=body,
                    pt=101,
                    ssrc=0xD7D7D7D7 if from_caller else 0xE7E7E7E7,
                    marker=k == 0,
                )
            seq += 1


def record(tmp: Path, pcap: Path, config: str = "") -> tuple[dict[str, Any], npt.NDArray[np.int16]]:
    """``callcap record`` on one call's capture (agent: the callee, keypad tones detected);
    its sidecar and audio."""
    run_record(tmp, pcap, config=config or "pci: {agent_side: callee}\ndtmf: {inband: true}\n")
    return one_call(tmp)


def two_sided_call(
    agent_audio: npt.NDArray[np.float64], seconds: float
) -> tuple[Call, float, npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    """Both sides start sending at the same instant (timeline sample 0)."""
    call = Call()
    answer = call.setup(T0)
    start = answer + 0.1
    caller = np.clip(voice(seconds, 180), -32768, 32767).astype(np.int16)
    agent = np.clip(agent_audio, -32768, 32767).astype(np.int16)
    wire_a = call.stream(start, caller, from_caller=True)
    wire_b = call.stream(start, agent, from_caller=False, seq0=900, ts0=5000)
    return call, start, decode_ulaw(wire_a), decode_ulaw(wire_b)


def assert_paused_exactly(
    audio: npt.NDArray[np.int16],
    refs: tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]],
    spans: list[tuple[int, int]],
) -> None:
    """Zero inside every span in both channels, the sent audio sample for sample elsewhere."""
    for ch, ref in enumerate(refs):
        expected = ref[: len(audio)].copy()
        for a, b in spans:
            expected[a:b] = 0
        got = audio[: len(expected), ch]
        assert np.array_equal(got, expected), f"channel {ch}"
        for a, b in spans:
            assert not got[a:b].any()
            assert ref[a:b].any()  # there was sound to remove


def tones_in(channel: npt.NDArray[np.int16]) -> str:
    det = InbandDtmfDetector()
    return "".join(d.digit for d in det.feed(channel) + det.flush())


def test_card_digits_keyed_while_paused_are_in_no_file(tmp_path: Path) -> None:
    seconds = 7.0
    agent = voice(seconds, 120) * 0.6
    agent[round(1.0 * RATE) : round(4.8 * RATE)] = 0  # the agent is silent while keying
    place(agent, 1.0, key_tone("*", 0.1))
    place(agent, 1.2, key_tone("7", 0.1))  # pause sequence, in-band
    card_at = [1.6 + 0.15 * i for i in range(len(CARD))]
    for at, digit in zip(card_at, CARD, strict=True):
        place(agent, at, key_tone(digit, 0.08))  # card digits, in-band ...
    call, start, ref_a, ref_b = two_sided_call(agent, seconds)
    events(
        call, start, [*zip(card_at, CARD, strict=True), (4.3, "*"), (4.5, "8")]
    )  # ... and RFC 4733
    call.bye(start + seconds + 0.3)
    doc, audio = record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))

    (pause,) = doc["pauses"]
    assert pause["by"] == "dtmf"
    assert abs(pause["from_s"] - 1.3) <= 0.01  # the end of the in-band 7
    assert pause["to_s"] == 4.6  # the end of the RFC 4733 8 (4.5 s + 100 ms)
    a, b = round(pause["from_s"] * RATE), round(pause["to_s"] * RATE)
    assert pause["from_s"] * RATE == a and pause["to_s"] * RATE == b
    assert_paused_exactly(audio, (ref_a, ref_b), [(a, b)])

    # the pause sequence is listed; nothing keyed during the pause is
    assert [(d["digit"], d["side"], d["source"]) for d in doc["dtmf"]] == [
        ("*", "callee", "inband"),
        ("7", "callee", "inband"),
    ]
    assert abs(doc["dtmf"][0]["at_s"] - 1.0) <= 0.005
    # no tone of the card survives in the published audio
    assert tones_in(audio[:, 1]) == "*7"
    assert tones_in(audio[:, 0]) == ""
    out = tmp_path / "out"
    assert not [p for p in (out / ".spool").rglob("*") if p.is_file()]
    # the audit log records the pause (with the same span) before the recording itself
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in audit] == ["pause", "recording_published"]
    assert audit[0]["fields"] == {
        "call_uid": doc["call_uid"],
        "from_s": pause["from_s"],
        "to_s": pause["to_s"],
        "by": "dtmf",
    }
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CARD.encode() not in data and CARD[:6].encode() not in data, path


def test_signalled_keys_pause_and_resume_and_inband_copies_are_listed_once(
    tmp_path: Path,
) -> None:
    seconds = 6.0
    agent = voice(seconds, 140) * 0.5
    agent[round(0.9 * RATE) : round(1.5 * RATE)] = 0
    # the phone sends both: a tone in the audio and the RFC 4733 event, for '*' and '7'
    place(agent, 1.0, key_tone("*", 0.1))
    place(agent, 1.2, key_tone("7", 0.1))
    call, start, ref_a, ref_b = two_sided_call(agent, seconds)
    events(call, start, [(1.0, "*"), (1.2, "7"), (2.0, "5"), (3.0, "*"), (3.2, "8"), (4.0, "9")])
    call.bye(start + seconds + 0.3)
    doc, audio = record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    (pause,) = doc["pauses"]
    # the tone is heard first and opens the pause at its measured end (within 5 ms)
    assert abs(pause["from_s"] - 1.3) <= 0.005
    assert pause["to_s"] == 3.3
    assert pause["by"] == "dtmf"
    assert [(d["digit"], d["source"], d["at_s"]) for d in doc["dtmf"]] == [
        ("*", "rfc4733", 1.0),
        ("7", "rfc4733", 1.2),
        ("9", "rfc4733", 4.0),
    ]
    assert_paused_exactly(audio, (ref_a, ref_b), [(round(pause["from_s"] * RATE), 26400)])


def test_sip_header_and_info_pause_and_a_call_ending_paused_closes_the_pause(
    tmp_path: Path,
) -> None:
    seconds = 5.0
    call, start, ref_a, ref_b = two_sided_call(voice(seconds, 130), seconds)
    pause_hdr = "X-Recording-Pause: on\r\n"
    # a re-INVITE from the callee's PBX carrying the header (no SDP change)
    call.sip(
        start + 1.0,
        "INVITE sip:alice@10.20.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.20.0.2:5060;branch=z9hG4bKre1\r\n"
        'From: <sip:bob@10.20.0.2>;tag=tt1\r\nTo: "Alice" <sip:alice@10.20.0.1>;tag=ft1\r\n'
        f"Call-ID: {call.call_id}\r\nCSeq: 5 INVITE\r\n{pause_hdr}Content-Length: 0\r\n\r\n",
        from_caller=False,
    )
    call.request(
        start + 2.0, "INFO", body="off", ctype="application/x-callcap-pause", from_callee=True
    )
    call.request(start + 3.0, "INFO", body="on\r\n", ctype="application/x-callcap-pause")
    relay = "Signal=5\r\nDuration=160\r\n"
    call.request(start + 1.5, "INFO", body=relay, ctype="application/dtmf-relay", from_callee=True)
    call.request(start + 2.5, "INFO", body="9", ctype="application/dtmf", from_callee=True)
    call.request(start + 3.5, "INFO", body="3", ctype="application/dtmf", from_callee=True)
    call.bye(start + seconds + 0.3)
    doc, audio = record(tmp_path, write_pcap(tmp_path / "c.pcap", call.records))
    frames = len(audio)
    assert doc["pauses"] == [
        {"from_s": 1.0, "to_s": 2.0, "by": "sip_header"},
        {"from_s": 3.0, "to_s": frames / RATE, "by": "sip_info"},
    ]
    assert_paused_exactly(audio, (ref_a, ref_b), [(8000, 16000), (24000, frames)])
    # SIP INFO keys: the one between the pauses is listed, those inside them are not
    assert [(d["digit"], d["source"], d["at_s"]) for d in doc["dtmf"]] == [("9", "sip_info", 2.5)]


def test_a_bad_pause_sequence_is_a_located_config_error(tmp_path: Path) -> None:
    pcap = write_pcap(tmp_path / "empty.pcap", [])
    config = "pci:\n  agent_side: callee\n  pause_dtmf: '*x'\n"
    proc = run_record(tmp_path, pcap, config=config, expect=2)
    assert "callcap.yaml:3: pci.pause_dtmf: must be 1 to 8 DTMF keys" in proc.stderr
