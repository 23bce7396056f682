"""``callcap daemon`` sniffing loopback live while sipp calls sipp: real packets, real sockets.

The daemon must announce READY=1 over the notify socket before the call, record the call
from the interface, and on SIGTERM publish what it holds and exit 0.  Every log line is one
JSON object.  It all happens on the loopback of a network namespace of the test's own, so
nothing else running on the machine shows up in the capture.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import soundfile
from daemon_harness import LIFECYCLE_EVENTS, RunningDaemon
from sipp_harness import best_lag, run_call

from callcap.storage.sidecar import validate_sidecar

pytestmark = pytest.mark.e2e


def test_live_call_on_loopback_is_recorded_and_sigterm_exits_cleanly(
    tmp_path: Path, netns: str
) -> None:
    out = tmp_path / "out"
    daemon = RunningDaemon(tmp_path, ["--interface", "lo", "--out", str(out)], netns=netns)
    try:
        ready = daemon.recv_notify(20)
        assert ready is not None and "READY=1" in ready.splitlines()
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
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    events = daemon.events()
    names = [e["event"] for e in events]
    for expected in LIFECYCLE_EVENTS:
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
