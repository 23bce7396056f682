"""The live daemon sweeps expired recordings on its own, in the background, and logs it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemon_harness import RunningDaemon
from recorded_archive import audit_entries, callcap, record_calls

pytestmark = pytest.mark.e2e


def test_the_daemon_deletes_expired_unheld_recordings_periodically(tmp_path: Path) -> None:
    # recorded with 90-day (expired by now) and 5-year retention; one expired call is held
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    held = recorded["plain-1@10.20.0.1"]
    callcap("hold", "add", held.call_uid, "--reason", "audit 2024", "--out", str(out))
    expired = recorded["subject-1@10.20.0.1"]
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text("retention:\n  sweep_interval_s: 0.5\n", encoding="utf-8")
    daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--out", str(out), "--config", str(cfg)])
    try:
        deadline = time.monotonic() + 30
        while expired.sidecar.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # a few more sweeps: they must find nothing more to do
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    assert not expired.sidecar.exists() and not expired.wav.exists()
    assert held.sidecar.exists() and held.wav.exists()
    finance = recorded["finance-1@10.20.0.1"]
    assert finance.sidecar.exists() and finance.wav.exists()
    events = daemon.events()
    deleted = [e for e in events if e["event"] == "recording_deleted"]
    assert [e["call_uid"] for e in deleted] == [expired.call_uid]
    sweeps = [e for e in events if e["event"] == "retention_swept"]
    assert sweeps[0]["deleted"] == 1 and sweeps[0]["held"] == 1
    assert len(sweeps) >= 2 and all(s["deleted"] == 0 for s in sweeps[1:])
    assert [e["event"] for e in audit_entries(out)][3:] == ["hold_added", "recording_deleted"]
    callcap("verify", str(out))
