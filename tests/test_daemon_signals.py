"""Signals to a running daemon recording real sipp calls on loopback.

SIGTERM in the middle of a call publishes that call whole (``end_reason: "shutdown"``) with
the audio captured so far.  SIGHUP with a broken config logs ``config_invalid`` naming the
file, line and key and keeps recording with the old config (a call started after it gets
the old one); with a good one it logs ``config_reloaded``, the call in flight carries on
under the config it started with, and the next call uses the new one: it is published under
the new ``recording.out_dir`` and its sidecar shows the new ``consent.default.mode``.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
import wave
from pathlib import Path

import pytest
import soundfile
from daemon_harness import RunningDaemon, write_config
from sipp_harness import CallRun, best_lag, run_call

from callcap.storage.sidecar import validate_sidecar

pytestmark = pytest.mark.e2e


def _call_in_background(tmp: Path, sink: list[CallRun], netns: str) -> threading.Thread:
    """A sipp call inside ``netns`` (its loopback), recorded only by the daemon under test."""
    thread = threading.Thread(
        target=lambda: sink.append(
            run_call(tmp, timeout=30, uac_netns=netns, uas_netns=netns, capture_on=None)
        ),
    )
    thread.start()
    return thread


def _sidecar_of(event: dict[str, object]) -> dict[str, object]:
    doc: dict[str, object] = json.loads(Path(str(event["sidecar"])).read_text(encoding="utf-8"))
    validate_sidecar(doc)
    return doc


def test_sigterm_mid_call_publishes_it_whole_as_shutdown(tmp_path: Path, netns: str) -> None:
    out = tmp_path / "out"
    daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--out", str(out)], netns=netns)
    runs: list[CallRun] = []
    try:
        daemon.wait_ready()
        call = _call_in_background(tmp_path / "call", runs, netns)
        daemon.wait_event("call_answered", timeout=15)
        time.sleep(2.5)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.stderr[-2000:]
        call.join(timeout=60)
    finally:
        daemon.close()
    events = daemon.events()
    names = [e["event"] for e in events]
    assert names.index("daemon_stopping") < names.index("call_ended")
    (ended,) = [e for e in events if e["event"] == "call_ended"]
    assert ended["end_reason"] == "shutdown"
    (written,) = [e for e in events if e["event"] == "recording_written"]
    doc = _sidecar_of(written)
    assert doc["end_reason"] == "shutdown"
    wav_path = Path(str(written["path"]))
    data = wav_path.read_bytes()
    audio_doc = doc["audio"]
    assert isinstance(audio_doc, dict)
    assert hashlib.sha256(data).hexdigest() == audio_doc["sha256"] == written["sha256"]
    with wave.open(str(wav_path)) as w:  # a complete, plain RIFF/WAVE file
        assert w.getnframes() == audio_doc["frames"]
    audio, _rate = soundfile.read(str(wav_path), dtype="int16")
    (run,) = runs
    assert run.caller is not None and run.callee is not None
    # cut short: between 1.5 s of talk and less than the whole call
    assert 12_000 <= len(audio) < len(run.caller.reference)
    # The signal lands between two 20 ms packets: the last packet slot of one side may be
    # silence because that side had not sent it yet, so the final 40 ms are not compared.
    for ch, side in enumerate((run.caller, run.callee)):
        corr, _lag = best_lag(side.reference, audio[:-320, ch])
        assert corr >= 0.99, (ch, corr)
    assert not [p for p in (out / ".spool").rglob("*") if p.is_file()]


CONFIG = "recording:\n  out_dir: {out}\nconsent:\n  default:\n    mode: {mode}\n"
BROKEN_TAIL = "rtp:\n  jitter_window_ms: 10\n"


def test_sighup_keeps_old_config_when_broken_and_applies_a_good_one_to_new_calls(
    tmp_path: Path, netns: str
) -> None:
    old_out, new_out = tmp_path / "old", tmp_path / "new"
    config = write_config(tmp_path / "callcap.yaml", CONFIG.format(out=old_out, mode="one_party"))
    daemon = RunningDaemon(tmp_path, ["--config", str(config), "--interface", "lo"], netns=netns)
    first: list[CallRun] = []
    second: list[CallRun] = []
    try:
        daemon.wait_ready()
        write_config(config, CONFIG.format(out=new_out, mode="all_party") + BROKEN_TAIL)
        daemon.proc.send_signal(signal.SIGHUP)
        invalid = daemon.wait_event("config_invalid")
        assert invalid["level"] == "error"
        assert invalid["file"] == str(config)
        assert invalid["line"] == 7
        assert invalid["key"] == "rtp.jitter_window_ms"
        time.sleep(0.5)
        assert daemon.proc.poll() is None

        # this call starts after the broken reload: it must get the old config
        call = _call_in_background(tmp_path / "first", first, netns)
        daemon.wait_event("call_answered", timeout=15)
        write_config(config, CONFIG.format(out=new_out, mode="all_party"))
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_event("config_reloaded")
        assert reloaded["config"] == str(config)
        assert reloaded["out_dir"] == str(new_out)
        call.join(timeout=60)
        first_written = daemon.wait_event("recording_written", timeout=20)

        call = _call_in_background(tmp_path / "second", second, netns)
        call.join(timeout=60)
        second_written = daemon.wait_event(
            "recording_written",
            timeout=20,
            where=lambda e: e["call_uid"] != first_written["call_uid"],
        )
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    names = [e["event"] for e in daemon.events()]
    assert names.count("config_invalid") == 1 and names.count("config_reloaded") == 1
    old, new = _sidecar_of(first_written), _sidecar_of(second_written)
    # out_dir: the call in flight is published where it started, the next one in the new place
    assert Path(str(first_written["path"])).is_relative_to(old_out)
    assert Path(str(second_written["path"])).is_relative_to(new_out)
    assert not list(new_out.rglob("*.wav"))[1:] and len(list(old_out.rglob("*.wav"))) == 1
    # started after the broken reload, in flight at the good one: old config, not dropped
    assert old["end_reason"] == "bye_caller"
    assert old["consent"] == {
        "mode": "one_party",
        "rule": None,
        "status": "not_required",
        "evidence": None,
        "action": "kept",
    }
    assert new["end_reason"] == "bye_caller"
    assert new["consent"]["mode"] == "all_party"  # type: ignore[index]
    assert new["consent"]["action"] == "flagged"  # type: ignore[index]
    for event, run in ((first_written, first[0]), (second_written, second[0])):
        audio, _ = soundfile.read(str(event["path"]), dtype="int16")
        assert run.caller is not None
        assert best_lag(run.caller.reference, audio[:, 0])[0] >= 0.99
