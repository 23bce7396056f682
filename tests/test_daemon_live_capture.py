"""``callcap daemon`` sniffing loopback live while sipp calls sipp: real packets, real sockets.

The daemon must announce READY=1 over the notify socket before the call, record the call
from the interface, and on SIGTERM publish what it holds and exit 0.  Every log line is one
JSON object.  It all happens on the loopback of a network namespace of the test's own, so
nothing else running on the machine shows up in the capture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile
from netns_harness import netns_exec
from sipp_harness import best_lag, run_call

from callcap.storage.sidecar import validate_sidecar

pytestmark = pytest.mark.e2e


def test_live_call_on_loopback_is_recorded_and_sigterm_exits_cleanly(
    tmp_path: Path, netns: str
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    out = tmp_path / "out"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    daemon = subprocess.Popen(
        [
            *netns_exec(netns),
            sys.executable,
            "-m",
            "callcap",
            "daemon",
            "--interface",
            "lo",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        run = run_call(
            tmp_path / "call",
            codec="PCMU",
            dtmf=((0.6, "9"),),
            uac_netns=netns,
            uas_netns=netns,
            capture_on=None,
        )
        assert run.returncodes == {"uac": 0, "uas": 0}
        deadline = time.monotonic() + 20
        while not list(out.rglob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        stdout, stderr = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()
    assert daemon.returncode == 0, stderr[-2000:]
    events = [json.loads(line) for line in stdout.splitlines()]
    names = [e["event"] for e in events]
    for expected in (
        "daemon_started",
        "capture_started",
        "call_started",
        "call_answered",
        "call_ended",
        "recording_written",
        "daemon_stopping",
    ):
        assert expected in names
    assert all({"ts", "level", "event"} <= e.keys() for e in events)
    (sidecar,) = out.rglob("*.json")
    doc = json.loads(sidecar.read_text(encoding="utf-8"))
    validate_sidecar(doc)
    assert doc["end_reason"] == "bye_caller"
    assert [(d["digit"], d["source"]) for d in doc["dtmf"]] == [("9", "rfc4733")]
    wav, rate = soundfile.read(str(sidecar.with_suffix(".wav")), dtype="int16")
    assert rate == 8000
    assert run.caller is not None and run.callee is not None
    assert best_lag(run.caller.reference, wav[:, 0])[0] >= 0.99
    assert best_lag(run.callee.reference, wav[:, 1])[0] >= 0.99
    # Loopback shows each packet twice (outgoing and incoming): the copies must not count.
    # Only the RFC 4733 end packet, sent three times with one sequence number, repeats.
    dups = {s["side"]: s["duplicates"] for s in doc["streams"]}
    assert dups == {"caller": 2, "callee": 0}
