"""All-party consent decided by the call's own evidence, on calls really recorded.

Calls are scripted with callgen (RFC 4733 events, SIP INFO, keypad tones in the audio, SIP
headers) or taken from the corpus, recorded by ``callcap record`` with a consent rule, and
the published files are checked: granted calls keep their audio sample for sample, refused
and missing (discard) calls leave no audio anywhere — not even in the spool — only a sidecar
with the decision, and the audit log says what was decided and discarded.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from callgen import RATE, T0, Call, tone, write_pcap
from conftest import corpus_dir
from recorded_archive import RETENTION_CONFIG, callcap
from test_pci_pause import EVENT_CODES, events, key_tone, place, voice
from test_recording_pipeline import outputs, record

from callcap.capture.pcapfile import CaptureReader
from callcap.codecs.g711 import decode_ulaw
from callcap.codecs.inband import InbandDtmfDetector
from callcap.config.loader import load_config_text
from callcap.logs import get_logger
from callcap.pipeline import Pipeline
from callcap.storage.lock import LOCK_FILE
from callcap.storage.spool import recover_spool

CORPUS = corpus_dir()

CALLER = "+4930123"


def rule(
    *,
    evidence: str = "[dtmf]",
    within_s: float = 30,
    on_missing: str = "discard",
    extra: str = "",
    mode: str = "all_party",
) -> str:
    return (
        "consent:\n"
        "  rules:\n"
        "    - name: eu-callers\n"
        '      match: {caller: ["+49*"]}\n'
        f"      mode: {mode}\n"
        f"      evidence: {evidence}\n"
        '      dtmf_digit: "1"\n'
        '      optout_digit: "2"\n'
        f"      within_s: {within_s}\n"
        f"      on_missing: {on_missing}\n"
        f"{extra}"
    )


def keys(
    call: Call, start: float, digits: list[tuple[float, str]], *, from_caller: bool = True
) -> None:
    """RFC 4733 events, by default the caller's (the party asked for consent)."""
    events(call, start, digits, from_caller=from_caller)


def consent(
    status: str,
    evidence: dict[str, Any] | None,
    action: str,
    *,
    mode: str = "all_party",
) -> dict[str, Any]:
    """The sidecar ``consent`` object expected under the ``eu-callers`` rule."""
    return {
        "mode": mode,
        "rule": "eu-callers",
        "status": status,
        "evidence": evidence,
        "action": action,
    }


def talking_call(
    seconds: float = 5.0, *, invite_extra: str = ""
) -> tuple[Call, float, npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    """Both sides send a tone from answer + 0.1 s (timeline sample 0) for ``seconds``."""
    call = Call(caller_user=CALLER, invite_extra=invite_extra)
    answer = call.setup(T0)
    start = answer + 0.1
    wire_a = call.stream(start, tone(440, seconds), from_caller=True)
    wire_b = call.stream(start, tone(1000, seconds), from_caller=False, seq0=900, ts0=5000)
    return call, start, decode_ulaw(wire_a), decode_ulaw(wire_b)


def run(tmp: Path, call: Call, config: str) -> subprocess.CompletedProcess[str]:
    return record(tmp, write_pcap(tmp / "c.pcap", call.records), config=config)


def audit(tmp: Path) -> list[dict[str, Any]]:
    lines = (tmp / "out" / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def log_events(proc: subprocess.CompletedProcess[str], name: str) -> list[dict[str, Any]]:
    found = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def assert_no_audio_kept(tmp: Path) -> None:
    out = tmp / "out"
    assert not list(out.rglob("*.wav")), "a WAV was published"
    assert not [p for p in out.rglob("*") if p.is_file() and ".spool" in p.parts]
    assert not [
        p
        for p in out.rglob("*")
        if p.is_file() and p.suffix not in (".json", ".jsonl") and p.name != LOCK_FILE
    ]


def test_key_1_from_the_caller_grants_consent_and_the_audio_is_published(
    tmp_path: Path,
) -> None:
    call, start, ref_a, ref_b = talking_call()
    keys(call, start, [(1.5, "1")])
    call.bye(start + 5.3)
    proc = run(tmp_path, call, rule())
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None
    assert np.array_equal(audio[: len(ref_a), 0], ref_a)
    assert np.array_equal(audio[: len(ref_b), 1], ref_b)
    assert doc["consent"] == consent(
        "granted", {"method": "dtmf", "digit": "1", "side": "caller", "at_s": 1.6}, "kept"
    )
    assert [(d["digit"], d["source"]) for d in doc["dtmf"]] == [("1", "rfc4733")]
    entries = audit(tmp_path)
    assert [e["event"] for e in entries] == ["consent_decided", "recording_published"]
    assert entries[0]["fields"] == {
        "call_uid": doc["call_uid"],
        "rule": "eu-callers",
        "status": "granted",
        "method": "dtmf",
        "action": "kept",
    }
    assert "wav" in entries[1]["files"]
    (logged,) = log_events(proc, "consent_decided")
    assert (logged["status"], logged["rule"], logged["method"]) == ("granted", "eu-callers", "dtmf")
    assert logged["call_uid"] == doc["call_uid"]


def test_key_2_refuses_and_no_audio_is_kept_anywhere(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    keys(call, start, [(0.5, "7"), (1.0, "2"), (2.0, "1")])  # 7 means nothing; 2 comes first
    call.bye(start + 5.3)
    run(tmp_path, call, rule() + RETENTION_CONFIG)
    assert_no_audio_kept(tmp_path)
    ((doc, audio),) = outputs(tmp_path)
    assert audio is None and doc["audio"] is None
    assert doc["consent"] == consent(
        "refused", {"method": "dtmf", "digit": "2", "side": "caller", "at_s": 1.1}, "discarded"
    )
    assert doc["dtmf"] == []  # no keypad content of a refused call is kept either
    assert doc["from"]["user"] == CALLER and doc["end_reason"] == "bye_caller"
    # the retention rule on the final consent status applies
    assert doc["retention"]["rule"] == "no-consent" and doc["retention"]["keep"] == "0d"
    entries = audit(tmp_path)
    assert [e["event"] for e in entries] == ["consent_decided", "recording_discarded"]
    assert entries[0]["fields"]["status"] == "refused"
    assert entries[0]["fields"]["method"] == "dtmf"
    assert set(entries[1]["files"]) == {"sidecar"}  # no audio hash: there is no audio
    assert entries[1]["fields"]["consent_status"] == "refused"
    assert callcap("verify", str(tmp_path / "out")).returncode == 0


@pytest.mark.parametrize(
    ("within_s", "at", "status"),
    [(2, 1.85, "granted"), (2, 3.0, "missing")],
    ids=["inside-the-window", "after-within_s"],
)
def test_a_digit_counts_only_within_s_after_the_answer(
    tmp_path: Path, within_s: float, at: float, status: str
) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    keys(call, start, [(at, "1")])
    call.bye(start + 5.3)
    run(tmp_path, call, rule(within_s=within_s))
    ((doc, audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == status
    if status == "granted":
        assert audio is not None and doc["consent"]["evidence"]["at_s"] == round(at + 0.1, 3)
    else:
        assert audio is None and doc["consent"]["action"] == "discarded"
        assert_no_audio_kept(tmp_path)


def _held_key(call: Call, start: float, at: float, seconds: float, digit: str = "1") -> None:
    """The caller holds ``digit`` down from ``at`` for ``seconds``: RFC 4733 updates every
    50 ms with a growing duration, the end packet (three times) when the key comes up."""
    ts = 80_000 + round(at * RATE)
    steps = round(seconds / 0.05)
    for k in range(steps + 1):
        end = k == steps
        flags = (0x80 if end else 0) | 10
        body = struct.pack("!BBH", EVENT_CODES[digit], flags, max(1, round(k * 0.05 * RATE)))
        for _ in range(3 if end else 1):
            call.rtp(
                start + at + k * 0.05,
                from_caller=True,
                seq=7000 + k,
                rtp_ts=ts,
                payload=body,
                pt=101,
                ssrc=0xD7D7D7D7,
                marker=k == 0,
            )


def test_a_key_pressed_in_the_window_counts_when_it_comes_up_after_it(tmp_path: Path) -> None:
    """RFC 4733 reports a key when it comes up.  Pressed 1.8 s after the answer, 0.2 s before
    a 2 s window closes, and held for 3 s: its end packet comes long after the window and
    the grace for late input.  It began in time, so it grants consent, and the audio is kept
    (before, settling declared consent missing while the key was still down)."""
    call, start, _ref_a, _ref_b = talking_call(seconds=6.0)
    _held_key(call, start, 1.7, 3.0)
    call.bye(start + 6.3)
    run(tmp_path, call, rule(within_s=2))
    ((doc, audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == "granted"
    assert doc["consent"]["evidence"]["at_s"] == 1.8
    assert audio is not None and doc["consent"]["action"] == "kept"
    assert [(d["digit"], d["source"], d["duration_ms"]) for d in doc["dtmf"]] == [
        ("1", "rfc4733", 3000)
    ]


def test_a_key_that_went_down_after_the_window_does_not_count(tmp_path: Path) -> None:
    """The same long key, pressed 0.2 s after the window closed: consent is missing."""
    call, start, _ref_a, _ref_b = talking_call(seconds=6.0)
    _held_key(call, start, 2.1, 3.0)
    call.bye(start + 6.3)
    run(tmp_path, call, rule(within_s=2))
    ((doc, audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == "missing" and audio is None
    assert_no_audio_kept(tmp_path)


def test_missing_consent_kept_flagged_keeps_the_audio(tmp_path: Path) -> None:
    call, _start, ref_a, _ref_b = talking_call()
    call.bye(T0 + 6.5)
    run(tmp_path, call, rule(on_missing="keep_flagged") + RETENTION_CONFIG)
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None and np.array_equal(audio[: len(ref_a), 0], ref_a)
    assert doc["consent"]["status"] == "missing"
    assert doc["consent"]["action"] == "flagged" and doc["consent"]["evidence"] is None
    assert doc["retention"]["rule"] == "no-consent"
    assert [e["event"] for e in audit(tmp_path)] == ["consent_decided", "recording_published"]


def test_only_the_configured_side_keys_count(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    keys(call, start, [(1.0, "1")], from_caller=False)  # the agent presses 1
    call.bye(start + 5.3)
    run(tmp_path, call, rule(on_missing="keep_flagged"))
    ((doc, _audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == "missing"
    assert [(d["digit"], d["side"]) for d in doc["dtmf"]] == [("1", "callee")]
    (tmp_path / "out").rename(tmp_path / "caller-side")
    run(tmp_path, call, rule(extra="      dtmf_side: callee\n"))
    ((doc, _audio),) = outputs(tmp_path)
    assert doc["consent"]["evidence"] == {
        "method": "dtmf",
        "digit": "1",
        "side": "callee",
        "at_s": 1.1,
    }


HEADER_RULE = rule(
    evidence="[sip_header]",
    extra='      sip_header: {name: X-Recording-Consent, value: "y*"}\n',
)


def test_the_invite_header_grants_consent_at_the_answer(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call(invite_extra="x-recording-consent: Yes-ok\r\n")
    call.bye(start + 5.3)
    run(tmp_path, call, HEADER_RULE)
    ((doc, _audio),) = outputs(tmp_path)
    # globs are case-sensitive: "Yes-ok" does not match "y*"
    assert doc["consent"]["status"] == "missing" and doc["consent"]["action"] == "discarded"
    assert_no_audio_kept(tmp_path)

    call, start, _ref_a, _ref_b = talking_call(invite_extra="X-Recording-Consent: yes\r\n")
    call.bye(start + 5.3)
    (tmp_path / "out").rename(tmp_path / "no-match")
    run(tmp_path, call, HEADER_RULE)
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None
    assert doc["consent"]["status"] == "granted"
    assert doc["consent"]["evidence"] == {
        "method": "sip_header",
        "digit": None,
        "side": "caller",
        "at_s": 0.0,
    }


def test_a_reinvite_header_within_the_window_grants_consent(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    call.sip(
        start + 1.0,
        "INVITE sip:alice@10.20.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.20.0.2:5060;branch=z9hG4bKre1\r\n"
        'From: <sip:bob@10.20.0.2>;tag=tt1\r\nTo: "Alice" <sip:+4930123@10.20.0.1>;tag=ft1\r\n'
        f"Call-ID: {call.call_id}\r\nCSeq: 5 INVITE\r\n"
        "X-Recording-Consent: yes\r\nContent-Length: 0\r\n\r\n",
        from_caller=False,
    )
    call.bye(start + 5.3)
    run(tmp_path, call, HEADER_RULE)
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None
    assert doc["consent"]["evidence"] == {
        "method": "sip_header",
        "digit": None,
        "side": "callee",
        "at_s": 1.1,
    }


def keyed_voice(seconds: float, tones: list[tuple[float, str]]) -> npt.NDArray[np.int16]:
    audio = voice(seconds, 190) * 0.5
    for at, digit in tones:
        audio[round((at - 0.2) * RATE) : round((at + 0.4) * RATE)] = 0
        place(audio, at, key_tone(digit, 0.12))
    return np.clip(audio, -32768, 32767).astype(np.int16)


def tone_call(caller_audio: npt.NDArray[np.int16]) -> tuple[Call, npt.NDArray[np.int16]]:
    call = Call(caller_user=CALLER)
    answer = call.setup(T0)
    start = answer + 0.1
    wire = call.stream(start, caller_audio, from_caller=True)
    call.stream(start, tone(1000, len(caller_audio) / RATE), from_caller=False, seq0=9, ts0=1)
    call.bye(start + len(caller_audio) / RATE + 0.3)
    return call, decode_ulaw(wire)


def test_a_keypad_tone_grants_consent_with_inband_detection_off(tmp_path: Path) -> None:
    # 1 at 1.0 s grants; a 5 keyed at 4.0 s is after the decision: the detector, running
    # only for the consent window (dtmf.inband is off by default), no longer listens
    caller, ref = tone_call(keyed_voice(6.0, [(1.0, "1"), (4.0, "5")]))
    run(tmp_path, caller, rule(evidence="[inband]"))
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None and np.array_equal(audio[: len(ref), 0], ref)
    evidence = doc["consent"]["evidence"]
    assert (evidence["method"], evidence["digit"], evidence["side"]) == ("inband", "1", "caller")
    assert abs(evidence["at_s"] - 1.1) <= 0.005
    assert [(d["digit"], d["source"]) for d in doc["dtmf"]] == [("1", "inband")]
    det = InbandDtmfDetector()  # the 5 is really in the published audio
    assert "".join(d.digit for d in det.feed(audio[:, 0]) + det.flush()) == "15"


def test_a_keypad_tone_counts_only_when_inband_is_listed(tmp_path: Path) -> None:
    caller, _ref = tone_call(keyed_voice(4.0, [(1.0, "1")]))
    run(tmp_path, caller, rule(evidence="[dtmf]", on_missing="keep_flagged"))
    ((doc, _audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == "missing" and doc["dtmf"] == []


def test_a_refusing_tone_discards_the_call_mid_block(tmp_path: Path) -> None:
    caller, _ref = tone_call(keyed_voice(4.0, [(1.0, "2")]))
    run(tmp_path, caller, rule(evidence="[dtmf, inband]"))
    assert_no_audio_kept(tmp_path)
    ((doc, audio),) = outputs(tmp_path)
    assert audio is None
    assert doc["consent"]["status"] == "refused"
    assert doc["consent"]["evidence"]["method"] == "inband"


def test_a_one_party_rule_needs_no_consent(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    keys(call, start, [(1.0, "2")])
    call.bye(start + 5.3)
    run(tmp_path, call, rule(mode="one_party"))
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None
    assert doc["consent"] == consent("not_required", None, "kept", mode="one_party")
    assert [e["event"] for e in audit(tmp_path)] == ["recording_published"]


@pytest.mark.parametrize("evidence_at", [1.0, None], ids=["refused-by-key", "window-passes"])
def test_the_spool_is_removed_as_soon_as_consent_is_decided(
    tmp_path: Path, evidence_at: float | None
) -> None:
    call, start, _ref_a, _ref_b = talking_call(12.0)
    if evidence_at is not None:
        keys(call, start, [(evidence_at, "2")])
    call.bye(start + 12.3)
    pcap = write_pcap(tmp_path / "c.pcap", call.records)
    config = load_config_text(rule(within_s=2))
    pipeline = Pipeline(config, tmp_path / "out", get_logger("test"))
    spool = tmp_path / "out" / ".spool"
    seen: dict[str, Any] = {}
    with CaptureReader(str(pcap)) as reader:
        for ts, linktype, frame in reader:
            pipeline.feed(ts, linktype, frame)
            if ts >= start + 0.6 and "before" not in seen:
                seen["before"] = [p.name for p in spool.iterdir() if p.is_file()]
            if ts >= start + 5.0 and "after" not in seen:
                (rec,) = pipeline.recorders.values()
                seen["after"] = [p.name for p in spool.iterdir() if p.is_file()]
                seen["decision"] = rec.consent.decision
    pipeline.close("capture_end")
    assert len(seen["before"]) == 1 and seen["before"][0].endswith(".wav.part")
    assert seen["after"] == []  # gone while the call is still in progress
    decision = seen["decision"]
    assert decision is not None
    assert decision.status == ("refused" if evidence_at is not None else "missing")
    assert decision.action == "discarded"
    assert_no_audio_kept(tmp_path)
    ((doc, _audio),) = outputs(tmp_path)
    assert doc["consent"]["status"] == decision.status
    assert doc["end"] == "2023-11-14T22:13:33.400Z"  # the call facts go on to the BYE


def _audit_entries_within(out: Path, count: int, seconds: float = 10.0) -> list[dict[str, Any]]:
    """The audit log once it holds ``count`` entries (a publisher thread writes it)."""
    path = out / "audit.jsonl"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"the audit log did not reach {count} entries")


@pytest.mark.parametrize(("digit", "status"), [("1", "granted"), ("2", "refused")])
def test_a_decision_is_audited_and_saved_when_it_is_made(
    tmp_path: Path, digit: str, status: str
) -> None:
    """Not when the call ends: a sensor that dies in the call's third second, after a key
    in its first, leaves the decision in the audit log, and a refused call's spool entry
    already says why there is no audio (recovery publishes that sidecar alone)."""
    call, start, _ref_a, _ref_b = talking_call(45.0)
    keys(call, start, [(1.0, digit)])
    call.bye(start + 45.3)
    pcap = write_pcap(tmp_path / "c.pcap", call.records)
    out = tmp_path / "out"
    pipeline = Pipeline(load_config_text(rule()), out, get_logger("test"), durable=True)
    crashed, later = tmp_path / "crashed", tmp_path / "crashed-later"
    with CaptureReader(str(pcap)) as reader:
        for ts, linktype, frame in reader:
            pipeline.feed(ts, linktype, frame)
            if ts >= start + 3.0 and not crashed.exists():
                (rec,) = pipeline.recorders.values()
                assert rec.consent.decision is not None
                assert rec.consent.decision.status == status
                (entry,) = _audit_entries_within(out, 1)
                # a copy of the output directory as a crash at this moment leaves it
                shutil.copytree(out, crashed)
            if ts >= start + 44.0 and not later.exists():
                shutil.copytree(out, later)
    pipeline.close("capture_end")
    assert entry["event"] == "consent_decided"
    assert entry["fields"] == {
        "call_uid": rec.call_uid,
        "rule": "eu-callers",
        "status": status,
        "method": "dtmf",
        "action": "kept" if status == "granted" else "discarded",
    }
    # the decision is logged once: the publication does not log it again
    entries = audit(tmp_path)
    published = "recording_published" if status == "granted" else "recording_discarded"
    assert [e["event"] for e in entries] == ["consent_decided", published]
    assert entries[0] == entry
    assert callcap("verify", str(out)).returncode == 0

    spooled = sorted(p.name for p in (crashed / ".spool").iterdir() if p.is_file())
    if status == "refused":
        assert not [name for name in spooled if ".wav" in name]  # no audio kept, even there
    (recovered,), damaged = recover_spool(crashed, alive=lambda pid: False)
    assert damaged == []
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    assert doc["consent"]["status"] == status
    assert doc["end_reason"] == "recovered"
    if status == "refused":
        assert recovered.wav is None and doc["audio"] is None
        assert doc["consent"]["action"] == "discarded" and doc["dtmf"] == []
        # with no audio the facts are still saved now and then: a crash 40 s on recovers
        # a call that lasted until close to then, not one cut at the refusal
        (again,), _ = recover_spool(later, alive=lambda pid: False)
        long = json.loads(again.sidecar.read_text(encoding="utf-8"))
        assert long["audio"] is None and long["consent"]["status"] == "refused"
        assert long["duration_s"] >= doc["duration_s"] + 29.0
    else:
        assert recovered.wav is not None


def corpus_record(tmp: Path, name: str, config: str) -> dict[str, Any]:
    tmp.mkdir(exist_ok=True)
    record(tmp, CORPUS / name, config=config)
    answered = [doc for doc, _ in outputs(tmp) if doc["answer"] is not None]
    (doc,) = answered
    return doc


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ('      dtmf_digit: "1"\n      optout_digit: "2"\n      within_s: 40\n', "granted"),
        ('      dtmf_digit: "1"\n      optout_digit: "2"\n      within_s: 30\n', "missing"),
        ('      dtmf_digit: "1"\n      optout_digit: "6"\n      within_s: 40\n', "refused"),
    ],
    ids=["granted", "key-after-within_s", "refused"],
)
def test_rfc4733_digits_of_a_real_capture_decide_consent(
    tmp_path: Path, extra: str, status: str
) -> None:
    # SIP_DTMF2: the caller keys 6 7 8 9 1 2 3; its audio starts 22.5 s after the answer,
    # so the 1 falls about 30.26 s and the 6 about 27.2 s after it
    plain = corpus_record(tmp_path / "plain", "SIP_DTMF2.pcap", "")
    offset = _seconds(plain["audio"]["start"]) - _seconds(plain["answer"])
    at = {d["digit"]: round(d["at_s"] + offset, 3) for d in plain["dtmf"]}
    config = (
        "consent:\n  rules:\n    - name: all\n      mode: all_party\n      evidence: [dtmf]\n"
        + extra
    )
    doc = corpus_record(tmp_path / "rule", "SIP_DTMF2.pcap", config)
    consent = doc["consent"]
    assert consent["status"] == status
    wavs = list((tmp_path / "rule" / "out").rglob("*.wav"))
    if status == "granted":
        assert consent["evidence"]["digit"] == "1" and len(wavs) == 1
        assert abs(consent["evidence"]["at_s"] - at["1"]) <= 0.002
        assert 30 < at["1"] <= 40
    elif status == "refused":
        assert consent["evidence"]["digit"] == "6" and wavs == []
        assert abs(consent["evidence"]["at_s"] - at["6"]) <= 0.002
    else:
        assert consent["evidence"] is None and wavs == [] and at["1"] > 30


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _info_times() -> list[float]:
    """Capture times of the INFO requests in DTMFsipinfo.pcap, as tshark reads them."""
    proc = subprocess.run(
        [
            "tshark",
            "-r",
            str(CORPUS / "DTMFsipinfo.pcap"),
            "-Y",
            'sip.Method == "INFO"',
            "-T",
            "fields",
            "-e",
            "frame.time_epoch",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [float(line) for line in proc.stdout.split()]


@pytest.mark.parametrize(
    ("digits", "status"),
    [("dtmf_digit: '1'", "granted"), ("dtmf_digit: '3'\n      optout_digit: '1'", "refused")],
)
def test_sip_info_digits_of_a_real_capture_decide_consent(
    tmp_path: Path, digits: str, status: str
) -> None:
    config = (
        "consent:\n  rules:\n    - name: all\n      mode: all_party\n      evidence: [dtmf]\n"
        f"      {digits}\n      within_s: 60\n"
    )
    doc = corpus_record(tmp_path, "DTMFsipinfo.pcap", config)
    consent = doc["consent"]
    assert consent["status"] == status
    assert consent["evidence"]["method"] == "dtmf" and consent["evidence"]["digit"] == "1"
    first_info = _info_times()[0]
    assert abs(consent["evidence"]["at_s"] - (first_info - _seconds(doc["answer"]))) <= 0.002
    wavs = list((tmp_path / "out").rglob("*.wav"))
    assert len(wavs) == (1 if status == "granted" else 0)


def test_a_key_pressed_while_paused_does_not_count(tmp_path: Path) -> None:
    call, start, _ref_a, _ref_b = talking_call()
    call.request(start + 0.5, "INFO", body="on", ctype="application/x-callcap-pause")
    keys(call, start, [(1.0, "1")])
    call.request(start + 2.0, "INFO", body="off", ctype="application/x-callcap-pause")
    call.bye(start + 5.3)
    run(tmp_path, call, rule(on_missing="keep_flagged"))
    ((doc, audio),) = outputs(tmp_path)
    assert audio is not None and doc["pauses"][0]["from_s"] == 0.5
    assert doc["consent"] == consent("missing", None, "flagged")
    assert doc["dtmf"] == []
