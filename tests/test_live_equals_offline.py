"""Live capture records what ``callcap record`` records from a capture of the same wire.

Three hundred concurrent calls are replayed with tcpreplay onto a veth link between two
network namespaces, at the pace they were recorded; the daemon captures the receiving end
through its rings while tcpdump captures the same interface.  The daemon's recordings must
equal, sample for sample and field for field, those of ``callcap record`` on tcpdump's file.

The comparison is against tcpdump's capture, not the replayed file, because tcpreplay's
pacing moves arrival times (and a packet's arrival is part of what places it); both capture
programs read the same kernel timestamp of each frame.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import RunningDaemon, live_config
from netns_harness import NetnsPair, netns_exec, tcpreplay
from workload import write_workload

from callcap.storage.sidecar import validate_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CALLS = 300


def _recordings(out: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    result = {}
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text())
        validate_sidecar(doc)
        result[doc["call_id"]] = (doc, sidecar.with_suffix(".wav").read_bytes())
    return result


def test_the_daemons_recordings_equal_record_on_tcpdumps_capture(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    replayed = tmp_path / "calls.pcap"
    info = write_workload(replayed, calls=CALLS, seconds=10, seed=17, codec="mixed")
    config = live_config(tmp_path)
    live_out = tmp_path / "live"
    daemon = RunningDaemon(
        tmp_path,
        ["--config", str(config), "--interface", net.veth_b, "--out", str(live_out)],
        netns=net.b,
    )
    wire = tmp_path / "wire.pcap"
    tcpdump = subprocess.Popen(
        [
            *netns_exec(net.b),
            "tcpdump",
            "-i",
            net.veth_b,
            "-w",
            str(wire),
            "--time-stamp-precision=nano",
            "-B",
            "65536",
            "-s",
            "0",
            "-U",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        daemon.wait_ready()
        time.sleep(1.0)  # tcpdump is listening
        sender = threading.Thread(target=tcpreplay, args=(net.a, net.veth_a, replayed))
        sender.start()
        sender.join(timeout=120)
        stats = daemon.wait_event(
            "capture_stats", timeout=30, where=lambda e: e["recordings_total"] >= CALLS
        )
        assert daemon.stop() == 0, daemon.stderr[-3000:]
    finally:
        daemon.close()
        tcpdump.terminate()
        _out, err = tcpdump.communicate(timeout=30)
    assert "0 packets dropped by kernel" in err, err
    assert stats["kernel_dropped_total"] == 0
    offline_out = tmp_path / "offline"
    run = subprocess.run(
        [sys.executable, "-m", "callcap", "record", str(wire), "--out", str(offline_out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    live = _recordings(live_out)
    offline = _recordings(offline_out)
    assert len(offline) == CALLS == len(info.calls)
    assert live.keys() == offline.keys()
    for call_id, (doc, audio) in offline.items():
        live_doc, live_audio = live[call_id]
        assert live_audio == audio, call_id
        assert live_doc == doc, call_id
    # and every call is all there: each direction with every packet sent, nothing lost
    sent = {c.call_id: c for c in info.calls}
    for call_id, (doc, _audio) in live.items():
        call = sent[call_id]
        packets = {s["side"]: (s["packets"], s["lost"]) for s in doc["streams"]}
        assert packets == {
            "caller": (call.caller.packets, 0),
            "callee": (call.callee.packets, 0),
        }, call_id
