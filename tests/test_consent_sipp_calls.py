"""Consent with real SIP peers: a sipp caller keys a digit — as an RFC 2833 event or as a
keypad tone in its speech — in its call to a sipp callee over loopback, tcpdump captures
it, and ``callcap record`` decides consent from the digit: 1 keeps the recording (its audio
is the caller's speech), 2 leaves none, and speech alone is never taken for a key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import soundfile
from recorded_archive import callcap
from sipp_harness import CallRun, best_lag, run_call
from test_e2e_sipp_calls import _iso_to_epoch, no_leftovers, published

from callcap.storage.lock import LOCK_FILE

pytestmark = pytest.mark.e2e

# sipp replays with user-space timers: a 1 s jitter window keeps a late burst from being
# loss (as in tests/test_e2e_sipp_calls.py).
CONFIG = """\
rtp: {jitter_window_ms: 1000}
consent:
  rules:
    - name: everyone
      mode: all_party
      evidence: [dtmf]
      dtmf_digit: "1"
      optout_digit: "2"
      within_s: 30
      on_missing: discard
"""


def record(run: CallRun, out: Path, config_text: str = CONFIG) -> list[dict[str, Any]]:
    config = out.parent / "consent.yaml"
    config.write_text(config_text, encoding="utf-8")
    callcap("record", str(run.capture), "--out", str(out), "--config", str(config))
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_an_rfc2833_digit_1_from_a_sipp_caller_grants_consent(tmp_path: Path) -> None:
    run = run_call(tmp_path / "call", codec="PCMU", dtmf=((1.0, "1"),))
    assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log + run.uas_log
    assert run.caller is not None
    out = tmp_path / "out"
    entries = record(run, out)
    no_leftovers(out)
    ((sidecar, doc),) = published(out)
    consent = doc["consent"]
    assert (consent["status"], consent["action"]) == ("granted", "kept")
    evidence = consent["evidence"]
    assert (evidence["method"], evidence["digit"], evidence["side"]) == ("dtmf", "1", "caller")
    # the key was sent 1.0 s after the caller's first packet
    caller_start = min(s["first"] for s in doc["streams"] if s["side"] == "caller")
    expected = _iso_to_epoch(caller_start) + 1.0 - _iso_to_epoch(doc["answer"])
    assert abs(evidence["at_s"] - expected) <= 0.05
    wav, _ = soundfile.read(str(sidecar.with_suffix(".wav")), dtype="int16")
    corr, _lag = best_lag(run.caller.reference, wav[:, 0])
    assert corr >= 0.99
    assert [e["event"] for e in entries] == ["consent_decided", "recording_published"]


def test_an_rfc2833_digit_2_from_a_sipp_caller_leaves_no_audio(tmp_path: Path) -> None:
    run = run_call(tmp_path / "call", codec="PCMA", dtmf=((0.8, "2"),))
    assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log + run.uas_log
    out = tmp_path / "out"
    entries = record(run, out)
    ((_sidecar, doc),) = published(out)
    assert doc["consent"]["status"] == "refused" and doc["audio"] is None
    assert [
        p
        for p in out.rglob("*")
        if p.is_file() and p.suffix not in (".json", ".jsonl") and p.name != LOCK_FILE
    ] == []
    assert [e["event"] for e in entries] == ["consent_decided", "recording_discarded"]


INBAND_CONFIG = CONFIG.replace("evidence: [dtmf]", "evidence: [inband]").replace(
    "on_missing: discard", "on_missing: keep_flagged"
)


def test_a_keypad_tone_in_a_sipp_callers_speech_grants_consent(tmp_path: Path) -> None:
    run = run_call(tmp_path / "call", codec="PCMU", caller_tones=((1.5, "1"),))
    assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log + run.uas_log
    out = tmp_path / "out"
    record(run, out, INBAND_CONFIG)
    ((_sidecar, doc),) = published(out)
    evidence = doc["consent"]["evidence"]
    assert doc["consent"]["status"] == "granted"
    assert (evidence["method"], evidence["digit"], evidence["side"]) == ("inband", "1", "caller")
    caller_start = min(s["first"] for s in doc["streams"] if s["side"] == "caller")
    expected = _iso_to_epoch(caller_start) + 1.5 - _iso_to_epoch(doc["answer"])
    assert abs(evidence["at_s"] - expected) <= 0.05


def test_speech_alone_is_no_consent_key(tmp_path: Path) -> None:
    run = run_call(
        tmp_path / "call",
        codec="PCMA",
        caller_text="One, two, three. Yes, I agree to the recording of this call, number one.",
    )
    assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log + run.uas_log
    out = tmp_path / "out"
    record(run, out, INBAND_CONFIG)
    ((_sidecar, doc),) = published(out)
    assert doc["audio"] is not None
    assert doc["consent"] == {
        "mode": "all_party",
        "rule": "everyone",
        "status": "missing",
        "evidence": None,
        "action": "flagged",
    }
    assert doc["dtmf"] == []
