"""An interface that goes down and comes back while calls are recorded.

``ip link set … down`` on the capture interface in the middle of replayed calls, then ``up``
again: the daemon logs the outage, captures again by itself, and the calls in flight lose
only the outage — shown in their sidecars as gaps of the sensor's (``capture_loss``), with
the audio before and after it whole.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import soundfile
from daemon_harness import RunningDaemon, live_config
from netns_harness import NetnsPair, netns_exec, tcpreplay
from tones import assert_whole_or_shown, audio_start
from workload import write_workload

from callcap.storage.sidecar import validate_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE = 8000


def _replay(net: NetnsPair, pcap: Path) -> None:
    # the sender keeps going while the link is down (its frames are lost on the wire)
    with contextlib.suppress(subprocess.CalledProcessError):
        tcpreplay(net.a, net.veth_a, pcap)


def test_calls_in_flight_lose_only_the_outage_and_show_it(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    pcap = tmp_path / "calls.pcap"
    info = write_workload(pcap, calls=4, seconds=14, seed=3, start_time=time.time())
    config = live_config(tmp_path)
    out = tmp_path / "out"
    daemon = RunningDaemon(
        tmp_path,
        ["--config", str(config), "--interface", net.veth_b, "--out", str(out)],
        netns=net.b,
    )
    link = [*netns_exec(net.b), "ip", "link", "set", net.veth_b]
    try:
        daemon.wait_ready()
        sender = threading.Thread(target=_replay, args=(net, pcap), daemon=True)
        sender.start()
        time.sleep(5.0)
        down = time.time()
        subprocess.run([*link, "down"], check=True)
        daemon.wait_event("interface_down", timeout=5)
        time.sleep(1.5)
        subprocess.run([*link, "up"], check=True)
        up = time.time()
        daemon.wait_event("interface_up", timeout=10)
        sender.join(timeout=60)
        daemon.wait_event(
            "capture_stats", timeout=20, where=lambda e: e["recordings_total"] == len(info.calls)
        )
        assert daemon.stop() == 0, daemon.stderr[-3000:]
    finally:
        daemon.close()
        subprocess.run([*link, "up"], check=False)
    events = daemon.events()
    names = [e["event"] for e in events]
    assert names.count("interface_down") >= 1 and names.count("interface_up") >= 1
    (back,) = [e for e in events if e["event"] == "interface_up"][:1]
    assert back["level"] == "warning" and 1.0 <= back["outage_s"] <= 5.0
    losses = [e for e in events if e["event"] == "capture_loss"]
    assert losses and {e["reason"] for e in losses} == {"interface_down"}
    calls = {c.call_id: c for c in info.calls}
    docs: dict[str, dict[str, Any]] = {}
    for sidecar in out.rglob("*.json"):
        doc = json.loads(sidecar.read_text())
        validate_sidecar(doc)
        docs[doc["call_id"]] = doc
    assert docs.keys() == calls.keys()
    for call_id, doc in docs.items():
        call = calls[call_id]
        assert doc["end_reason"] in ("bye_caller", "bye_callee")  # recording went on
        first = min(call.caller.first_time, call.callee.first_time)  # sample 0, as sent
        origin = audio_start(doc)  # sample 0, as captured
        (span,) = doc["capture_loss"]
        assert span["reason"] == "interface_down"
        # the span covers the outage, seen on the capture clock (frames either side of it)
        assert span["from_s"] <= down - origin + 0.1 and span["to_s"] >= up - origin - 0.3
        assert span["to_s"] - span["from_s"] <= up - down + 1.0
        lost = [g for g in doc["gaps"] if g["capture_loss"]]
        assert {g["side"] for g in lost} == {"caller", "callee"}
        for gap in lost:
            # a gap of the sensor's ends with the outage (and a frame either side); it may
            # begin earlier where a timing correction just before the link fell (the
            # sender stalled with it) opened a hole that runs into the outage's gap
            assert span["from_s"] - 0.35 <= gap["from_s"] and gap["to_s"] <= span["to_s"] + 0.1
        assert all(s["capture_loss"] and s["lost"] > 0 for s in doc["streams"])
        # whole audio before and after the outage
        (wav,) = out.rglob(doc["audio"]["file"])
        audio, _rate = soundfile.read(wav, dtype="int16")
        for ch, side in ((0, call.caller), (1, call.callee)):
            start = side.first_time - first + 0.1
            end = side.first_time - first + side.packets_sent * 0.02 - 0.1
            name = "caller" if ch == 0 else "callee"
            for a, b in ((start, span["from_s"] - 0.4), (span["to_s"] + 0.3, end)):
                assert_whole_or_shown(audio[:, ch], side.tone_hz, a, b, doc["gaps"], name)
