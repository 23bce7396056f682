"""End to end with real SIP peers: sipp calls sipp over loopback, tcpdump captures, callcap records.

Each channel of the WAV must correlate ≥ 0.99 with the audio that side put on the wire, at
the offset tshark says that side's first RTP packet arrived (± 20 ms), and DTMF sent as RFC
4733 events must appear in the sidecar at the time it was sent.  Peers and tcpdump share the
loopback of a network namespace of the test's own: nothing else on the machine is captured.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile
from sipp_harness import CallRun, best_lag, first_rtp_times, run_call

from callcap.storage.sidecar import validate_sidecar

pytestmark = pytest.mark.e2e

RATE = 8000


def record(run: CallRun, out: Path) -> None:
    # sipp replays its pcaps with user-space timers: on a loaded test machine a burst can
    # arrive a few hundred ms late.  A 1 s jitter window keeps that from counting as loss,
    # which is not what these tests are about (tests/test_recording_pipeline.py is).
    config = out.parent / "e2e.yaml"
    config.write_text("rtp:\n  jitter_window_ms: 1000\n", encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "callcap",
            "record",
            str(run.capture),
            "--out",
            str(out),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def published(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    pairs = []
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        validate_sidecar(doc)
        pairs.append((sidecar, doc))
    return pairs


def no_leftovers(out: Path) -> None:
    leftovers = [
        p for p in out.rglob("*") if p.is_file() and (p.suffix == ".part" or ".tmp" in p.name)
    ]
    assert not leftovers


def _iso_to_epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check_answered_call(run: CallRun, out: Path, *, end_reason: str) -> dict[str, Any]:
    assert run.caller is not None and run.callee is not None
    assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log + run.uas_log
    record(run, out)
    no_leftovers(out)
    ((sidecar, doc),) = published(out)
    wav_path = sidecar.with_suffix(".wav")
    assert doc["audio"]["file"] == wav_path.name
    assert hashlib.sha256(wav_path.read_bytes()).hexdigest() == doc["audio"]["sha256"]
    assert doc["end_reason"] == end_reason
    assert doc["from"]["user"] == "alice" and doc["to"]["user"] == "bob"
    assert doc["from"]["display_name"] == "Alice"
    assert doc["audio"]["channels"] == ["caller", "callee"]
    audio_streams = [s for s in doc["streams"] if s["decoded"]]
    assert sorted(s["side"] for s in audio_streams) == ["callee", "caller"]
    assert all(s["lost"] == 0 and s["late"] == 0 for s in doc["streams"])
    info = soundfile.info(str(wav_path))
    assert (info.samplerate, info.channels, info.subtype) == (RATE, 2, "PCM_16")
    assert (
        wav_path.read_bytes()[:4] == b"RIFF" and doc["audio"]["format"] == "WAV"
    )  # RIFF/WAVE below 4 GiB
    assert info.frames == doc["audio"]["frames"]
    wav, _ = soundfile.read(str(wav_path), dtype="int16")

    origin = _iso_to_epoch(doc["audio"]["start"])
    first = first_rtp_times(run.capture)
    ports = {s["side"]: int(s["src"].rsplit(":", 1)[1]) for s in audio_streams}
    for channel, side in enumerate(("caller", "callee")):
        ref = run.caller.reference if side == "caller" else run.callee.reference
        corr, lag = best_lag(ref, wav[:, channel])
        assert corr >= 0.99, f"{side}: correlation {corr:.4f}"
        expected = (first[ports[side]] - origin) * RATE
        assert abs(lag - expected) <= 0.020 * RATE, (
            f"{side}: audio at {lag / RATE:.3f}s, sent at {expected / RATE:.3f}s"
        )
    return doc


def test_pcmu_call_with_rfc4733_dtmf_is_recorded_faithfully(tmp_path: Path, netns: str) -> None:
    run = run_call(
        tmp_path / "call",
        codec="PCMU",
        dtmf=((1.0, "5"), (1.6, "#")),
        uac_netns=netns,
        uas_netns=netns,
    )
    doc = check_answered_call(run, tmp_path / "out", end_reason="bye_caller")
    digits = [(d["digit"], d["side"], d["source"]) for d in doc["dtmf"]]
    assert digits == [("5", "caller", "rfc4733"), ("#", "caller", "rfc4733")]
    # The caller's first packet is sample 0 of its stream; events sit at their send offsets.
    caller_start = min(s["first"] for s in doc["streams"] if s["side"] == "caller")
    offset = _iso_to_epoch(caller_start) - _iso_to_epoch(doc["audio"]["start"])
    for (at, _digit), got in zip(run.caller.dtmf if run.caller else (), doc["dtmf"], strict=True):
        assert abs(got["at_s"] - (offset + at)) <= 0.05
        assert got["duration_ms"] == 120


def test_pcma_call_hung_up_by_the_callee(tmp_path: Path, netns: str) -> None:
    run = run_call(
        tmp_path / "call", codec="PCMA", bye_by="callee", uac_netns=netns, uas_netns=netns
    )
    doc = check_answered_call(run, tmp_path / "out", end_reason="bye_callee")
    assert {s["codec"] for s in doc["streams"]} == {"PCMA"}


def test_busy_callee_produces_no_recording(tmp_path: Path, netns: str) -> None:
    run = run_call(tmp_path / "call", reject=486, uac_netns=netns, uas_netns=netns)
    out = tmp_path / "out"
    record(run, out)
    assert not list(out.rglob("*.wav"))
    assert not list(out.rglob("*.json"))  # failed calls get no sidecar unless configured
    no_leftovers(out)
