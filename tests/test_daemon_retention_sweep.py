"""The live daemon sweeps expired recordings on its own, in the background, and logs it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from daemon_harness import RunningDaemon
from recorded_archive import audit_entries, callcap, record_calls

from callcap.control import ControlError, request

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


def test_a_reload_moves_the_sweep_and_the_control_socket_with_the_config(
    tmp_path: Path,
) -> None:
    """SIGHUP with a new ``recording.out_dir`` and ``control.socket``: the next sweeps walk
    the new archive (deleting what expired there, logged and audited there), the old one is
    left alone, and the control socket answers at its new path only."""
    first = tmp_path / "first"
    old_sock, new_sock = tmp_path / "run" / "old.sock", tmp_path / "run" / "new.sock"
    (tmp_path / "arch").mkdir()
    recorded = record_calls(tmp_path / "arch")
    archive = tmp_path / "arch" / "out"
    expired = [recorded["plain-1@10.20.0.1"], recorded["subject-1@10.20.0.1"]]
    kept = recorded["finance-1@10.20.0.1"]
    cfg = tmp_path / "daemon.yaml"
    text = "recording:\n  out_dir: {out}\nretention:\n  sweep_interval_s: 0.5\ncontrol:\n  socket: {sock}\n"
    cfg.write_text(text.format(out=first, sock=old_sock), encoding="utf-8")
    daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--config", str(cfg)])
    try:
        daemon.wait_ready()
        swept = daemon.wait_event("retention_swept")
        assert swept["out_dir"] == str(first) and swept["deleted"] == 0
        assert request(str(old_sock), "pause", "nobody@x")["ok"] is False
        cfg.write_text(text.format(out=archive, sock=new_sock), encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_event("config_reloaded")["out_dir"] == str(archive)
        moved = daemon.wait_event("retention_swept", where=lambda e: e["out_dir"] == str(archive))
        assert moved["deleted"] == 2
        reply = request(str(new_sock), "pause", "nobody@x")
        assert reply["ok"] is False and "no call in progress" in reply["error"]
        assert not old_sock.exists()
        with pytest.raises(ControlError):
            request(str(old_sock), "pause", "nobody@x", timeout=1)
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    for gone in expired:
        assert not gone.sidecar.exists() and not gone.wav.exists()
    assert kept.sidecar.exists() and kept.wav.exists()
    deleted = [e for e in daemon.events() if e["event"] == "recording_deleted"]
    assert sorted(e["call_uid"] for e in deleted) == sorted(r.call_uid for r in expired)
    assert [e["event"] for e in audit_entries(archive)][3:] == ["recording_deleted"] * 2
    assert not (first / "audit.jsonl").exists()  # nothing was swept or logged there
    callcap("verify", str(archive))
    assert not new_sock.exists()  # removed at the clean stop
