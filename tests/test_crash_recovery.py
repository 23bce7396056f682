"""``kill -9`` in the middle of calls, then a restart: every call in flight is published.

The daemon records a real sipp call on loopback and is killed with SIGKILL at a random
moment of the call (seeded, so a failure replays).  The restarted daemon must publish that
call from the spool — beside capture, which starts at once however long recovery takes: a
complete WAV holding the audio up to the last flush (which correlates with what was sent) and a sidecar with ``end_reason:
"recovered"`` that validates; the spool is empty afterwards, and nothing published earlier
has changed by a byte.  A spool entry that cannot be recovered is moved aside, and the files
of a writer that is still running are left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
from daemon_harness import RunningDaemon
from sipp_harness import CallRun, best_lag, run_call
from test_spool_recovery_rules import _checkpoint_sidecar, _dead_writer_entry

from callcap.storage.lock import LOCK_FILE
from callcap.storage.sidecar import validate_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROUNDS = 5
SEED = 20260423


def _published(out: Path) -> dict[Path, str]:
    """Recordings (the audit log grows with every one, and is checked by verify)."""
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".spool" not in p.parts and p.name not in ("audit.jsonl", LOCK_FILE)
    }


def _assert_whole(out: Path) -> None:
    """Every published WAV opens, has the frames and hash its sidecar states, and vice versa."""
    wavs = sorted(out.rglob("*.wav"))
    sidecars = sorted(p for p in out.rglob("*.json") if ".spool" not in p.parts)
    assert [w.with_suffix(".json") for w in wavs] == sidecars
    for wav in wavs:
        doc = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
        validate_sidecar(doc)
        data = wav.read_bytes()
        assert hashlib.sha256(data).hexdigest() == doc["audio"]["sha256"]
        assert len(data) == doc["audio"]["bytes"]
        with wave.open(str(wav)) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 8000, 2)
            assert w.getnframes() == doc["audio"]["frames"]


def _assert_verifies(out: Path) -> None:
    verify = subprocess.run(
        [sys.executable, "-m", "callcap", "verify", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout


def test_calls_in_flight_at_kill_9_are_recovered_on_restart(tmp_path: Path, netns: str) -> None:
    rng = random.Random(SEED)
    out = tmp_path / "out"
    args = ["--interface", "lo", "--out", str(out)]
    for rnd in range(ROUNDS):
        before = _published(out) if out.exists() else {}
        daemon = RunningDaemon(tmp_path, args, netns=netns, name=f"run{rnd}")
        try:
            daemon.wait_ready()
            result: list[CallRun] = []
            call = threading.Thread(
                target=lambda r=rnd, sink=result: sink.append(
                    run_call(
                        tmp_path / f"call{r}",
                        timeout=30,
                        uac_netns=netns,
                        uas_netns=netns,
                        capture_on=None,
                    )
                )
            )
            call.start()
            # a random moment of the talk (about 4.3 s long), at least one flush in; counted
            # from the answer so that a slow start of the peers does not move it
            kill_at = rng.uniform(2.0, 3.8)
            daemon.wait_event("call_answered", timeout=30)
            answered = time.monotonic()
            time.sleep(max(0.0, answered + kill_at - time.monotonic()))
            assert daemon.proc.poll() is None
            daemon.kill_all(signal.SIGKILL)
            daemon.proc.wait(timeout=10)
            call.join(timeout=60)
        finally:
            daemon.close()
        (run,) = result
        assert run.returncodes == {"uac": 0, "uas": 0}, run.uac_log[-2000:]
        spool = out / ".spool"
        assert sorted(p.name for p in spool.glob("*.wav.part")), "nothing was in flight"
        assert _published(out) == before  # the kill harmed nothing published

        restarted = RunningDaemon(tmp_path, args, netns=netns, name=f"restart{rnd}")
        try:
            restarted.wait_ready()
            assert restarted.stop() == 0, restarted.stderr[-2000:]
        finally:
            restarted.close()
        events = restarted.events()
        (recovered,) = [e for e in events if e["event"] == "call_recovered"]
        assert not [e for e in events if e["event"] == "spool_entry_damaged"]
        (summary,) = [e for e in events if e["event"] == "spool_recovered"]
        assert (summary["recovered"], summary["damaged"], summary["why"]) == (1, 0, "start")
        assert summary["stopped_early"] is False

        assert not [p for p in spool.rglob("*") if p.is_file()], "spool entries left behind"
        after = _published(out)
        assert {p: h for p, h in after.items() if p in before} == before
        wav_path = Path(recovered["path"])
        assert set(after) - set(before) == {wav_path, wav_path.with_suffix(".json")}
        _assert_whole(out)
        # the recovered recording is in the audit log like every other: the archive verifies
        _assert_verifies(out)

        doc = json.loads(wav_path.with_suffix(".json").read_text(encoding="utf-8"))
        assert doc["end_reason"] == "recovered"
        assert doc["call_uid"] == recovered["call_uid"]
        assert doc["answer"] is not None
        assert "recovered_from_spool" in [w["code"] for w in doc["warnings"]]
        assert {s["side"] for s in doc["streams"]} == {"caller", "callee"}, (rnd, kill_at)
        audio, rate = soundfile.read(str(wav_path), dtype="int16")
        assert rate == 8000
        assert run.caller is not None and run.callee is not None
        # audio up to the last flush: at least half a second, never more than was sent
        assert 4000 <= len(audio) <= len(run.caller.reference) + 8000, (rnd, kill_at)
        assert doc["audio"]["duration_s"] == round(len(audio) / 8000, 3)
        assert doc["duration_s"] >= doc["audio"]["duration_s"]
        for ch, side in enumerate((run.caller, run.callee)):
            corr, lag = best_lag(side.reference, audio[:, ch])
            assert corr >= 0.99, (rnd, kill_at, ch, corr)
            assert lag < 4000
            assert np.any(audio[:, ch])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_unrecoverable_spool_entries_are_moved_aside_and_live_ones_left_alone(
    tmp_path: Path, netns: str
) -> None:
    out = tmp_path / "out"
    spool = out / ".spool"
    spool.mkdir(parents=True)
    dead = _dead_pid()
    garbage_facts = spool / f"aaaaaaaaaaaaaaaa-{dead}.call.json"
    garbage_facts.write_text("{ not json", encoding="utf-8")
    garbage_wav = spool / f"aaaaaaaaaaaaaaaa-{dead}.wav.part"
    garbage_wav.write_bytes(b"RIFF garbage")
    orphan_wav = spool / f"bbbbbbbbbbbbbbbb-{dead}.wav.part"
    orphan_wav.write_bytes(b"\x00" * 100)
    stale_tmp = spool / f".cccccccccccccccc-{dead}.call.json.tmp-{dead}-140000"
    stale_tmp.write_text("{", encoding="utf-8")

    other = RunningDaemon(
        tmp_path, ["--interface", "lo", "--out", str(tmp_path / "o2")], netns=netns, name="o"
    )
    try:
        other.wait_ready()
        alive = other.proc.pid
        live_wav = spool / f"dddddddddddddddd-{alive}.wav.part"
        live_wav.write_bytes(b"in use")
        live_facts = spool / f"dddddddddddddddd-{alive}.call.json"
        live_facts.write_text("{}", encoding="utf-8")

        daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--out", str(out)], netns=netns)
        try:
            daemon.wait_ready()
            assert daemon.proc.poll() is None  # still running after the bad entries
            assert daemon.stop() == 0, daemon.stderr[-2000:]
        finally:
            daemon.close()
    finally:
        other.close()

    events = daemon.events()
    damaged = {e["entry"]: e for e in events if e["event"] == "spool_entry_damaged"}
    assert set(damaged) == {f"aaaaaaaaaaaaaaaa-{dead}", f"bbbbbbbbbbbbbbbb-{dead}"}
    assert "unreadable call facts" in damaged[f"aaaaaaaaaaaaaaaa-{dead}"]["reason"]
    assert "without call facts" in damaged[f"bbbbbbbbbbbbbbbb-{dead}"]["reason"]
    assert all(e["level"] == "error" for e in damaged.values())
    assert not [e for e in events if e["event"] == "call_recovered"]
    moved = sorted(p.name for p in (spool / "damaged").iterdir())
    assert moved == sorted([garbage_facts.name, garbage_wav.name, orphan_wav.name])
    assert (spool / "damaged" / garbage_wav.name).read_bytes() == b"RIFF garbage"
    assert not stale_tmp.exists()
    assert live_wav.read_bytes() == b"in use" and live_facts.read_text() == "{}"
    assert not list(out.rglob("*.wav"))


def test_the_daemon_is_ready_and_captures_while_it_recovers(tmp_path: Path, netns: str) -> None:
    """Recovery runs beside capture: with the archive locked (as a long recovery, or a sweep
    of a big archive, holds it) the daemon still says READY=1 and records, and the dead
    writer's call is published — and audited — once the lock is free."""
    out = tmp_path / "out"
    dead = _dead_pid()
    _dead_writer_entry(out, dead, 21, _checkpoint_sidecar())
    entry = sorted(p.name for p in (out / ".spool").iterdir() if p.is_file())
    archive = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(archive, fcntl.LOCK_EX)  # what AuditLog.locked takes
    try:
        daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--out", str(out)], netns=netns)
        try:
            daemon.wait_ready()
            daemon.wait_event("capture_started")
            time.sleep(1.0)
            names = [e["event"] for e in daemon.events()]
            assert "call_recovered" not in names  # waiting for the lock, not for READY
            assert sorted(p.name for p in (out / ".spool").iterdir() if p.is_file()) == entry
            assert not list(out.rglob("*.wav"))
        finally:
            fcntl.flock(archive, fcntl.LOCK_UN)
            os.close(archive)
        recovered = daemon.wait_event("call_recovered", timeout=20)
        summary = daemon.wait_event("spool_recovered", timeout=20)
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    assert (summary["recovered"], summary["damaged"], summary["why"]) == (1, 0, "start")
    wav = Path(recovered["path"])
    doc = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
    validate_sidecar(doc)
    assert doc["end_reason"] == "recovered" and doc["audio"]["frames"] == 800
    assert not [p for p in (out / ".spool").iterdir() if p.is_file()]
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["fields"]["call_uid"]) for e in audit] == [
        ("recording_published", recovered["call_uid"])
    ]
    _assert_verifies(out)
