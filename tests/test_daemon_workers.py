"""Recording on several cores: each call recorded by exactly one worker, into one file.

Workers split calls by Call-ID (callcap.sharding); every worker follows every call's
signalling and media routes and drops the media of the calls it does not own.  Checked here:

- offline and through the daemon's replay path, any number of workers gives the very same
  recordings as one, byte for byte, for calls whose media moves mid-call (a re-INVITE to new
  ports and codec, an SSRC change, events, RTCP-mux, a NAT'd port);
- live, on a veth link between two network namespaces with frames replayed by tcpreplay:
  ``kill -9`` of one worker costs only that worker's calls, which are recovered at once
  from the spool while the other worker's calls are recorded whole; SIGTERM ends every
  worker's calls as ``shutdown``;
- a forced overrun (a tiny ring and the worker stalled while traffic flows) is counted,
  logged, flagged in the sidecars of the calls whose packets it lost, and recording goes on.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
from daemon_harness import RunningDaemon, live_config, write_config
from netns_harness import NetnsPair, tcpreplay
from test_fast_lane import _eventful_calls
from tones import assert_whole_or_shown, audio_start, held_fraction
from workload import WorkloadInfo, write_workload

from callcap.sharding import owner_of
from callcap.storage.sidecar import validate_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE = 8000


def _outputs(out: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    result = {}
    for sidecar in sorted(out.rglob("*.json")):
        if sidecar.name == "audit.jsonl":
            continue
        doc = json.loads(sidecar.read_text())
        validate_sidecar(doc)
        wav = sidecar.with_suffix(".wav")
        result[doc["call_id"]] = (doc, wav.read_bytes() if wav.exists() else b"")
    return result


def _callcap(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callcap", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _log(stderr_or_stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr_or_stdout.splitlines() if line.startswith("{")]


def test_any_number_of_workers_records_each_call_once_and_the_same(tmp_path: Path) -> None:
    capture = _eventful_calls(tmp_path / "calls.pcap")
    workload = tmp_path / "w.pcap"
    write_workload(workload, calls=6, seconds=6, seed=5, codec="mixed", loss=0.01, jitter_ms=5)
    results = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"out{workers}"
        run = _callcap("record", str(capture), "--out", str(out), "--workers", str(workers))
        assert run.returncode == 0, run.stderr[-2000:]
        out2 = tmp_path / f"w-out{workers}"
        run2 = _callcap("record", str(workload), "--out", str(out2), "--workers", str(workers))
        assert run2.returncode == 0, run2.stderr[-2000:]
        (finished,) = [e for e in _log(run.stderr) if e["event"] == "record_finished"]
        assert finished["workers"] == workers
        if workers > 1:
            assert finished["rtp_other_worker"] > 0  # the others' media was seen and passed
        results[workers] = (_outputs(out), _outputs(out2))
        # one file per call, and one published entry per recording in one audit chain
        assert len(list(out.rglob("*.wav"))) == 3
        assert len(list(out2.rglob("*.wav"))) == 6
        verify = _callcap("verify", str(out2))
        assert verify.returncode == 0, verify.stdout + verify.stderr
    # the calls really were shared out, and the one whose re-INVITE moved its media to a new
    # port and codec is one file whoever records it
    owners = {owner_of(call_id, 2) for call_id in results[1][0]}
    assert owners == {0, 1}
    for workers in (2, 3):
        for one, many in zip(results[1], results[workers], strict=True):
            assert one.keys() == many.keys()
            for call_id, (doc, audio) in one.items():
                assert many[call_id][1] == audio, (workers, call_id)
                assert many[call_id][0] == doc, (workers, call_id)
    moved = results[2][0]["lane-1@10.20.0.1"][0]
    assert {s["codec"] for s in moved["streams"]} == {"PCMU", "PCMA"}


def test_the_daemons_replay_path_with_workers_gives_records_recordings(tmp_path: Path) -> None:
    capture = _eventful_calls(tmp_path / "calls.pcap")
    record_out = tmp_path / "record"
    assert _callcap("record", str(capture), "--out", str(record_out)).returncode == 0
    daemon_out = tmp_path / "daemon"
    # (the capture is from 2023: with the default 90 days, the daemon's retention sweep
    # could delete a recording as soon as it is published)
    config = write_config(
        tmp_path / "c.yaml", "control:\n  socket: null\nretention:\n  sweep_interval_s: 0\n"
    )
    run = _callcap(
        "daemon",
        "--config",
        str(config),
        "--pcap",
        str(capture),
        "--out",
        str(daemon_out),
        "--workers",
        "2",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    events = _log(run.stdout)
    assert sorted({e["worker"] for e in events if e["event"] == "worker_started"}) == [0, 1]
    expected = _outputs(record_out)
    got = _outputs(daemon_out)
    assert got.keys() == expected.keys()
    for call_id, (doc, audio) in expected.items():
        assert got[call_id][1] == audio
        assert got[call_id][0]["streams"] == doc["streams"]
        assert got[call_id][0]["gaps"] == doc["gaps"]


# -- live, on a veth link ------------------------------------------------------------------


def _start(tmp_path: Path, net: NetnsPair, config: Path, workers: int) -> RunningDaemon:
    daemon = RunningDaemon(
        tmp_path,
        [
            "--config",
            str(config),
            "--interface",
            net.veth_b,
            "--out",
            str(tmp_path / "out"),
            "--workers",
            str(workers),
        ],
        netns=net.b,
    )
    daemon.wait_ready()
    return daemon


def _replay_in_background(net: NetnsPair, pcap: Path) -> threading.Thread:
    thread = threading.Thread(target=tcpreplay, args=(net.a, net.veth_a, pcap), daemon=True)
    thread.start()
    return thread


def _worker_pid(daemon: RunningDaemon, index: int) -> int:
    event = daemon.wait_event("worker_started", where=lambda e: e.get("worker") == index)
    return int(event["pid"])


def _audio_path(out: Path, doc: dict[str, Any]) -> Path:
    (wav,) = out.rglob(doc["audio"]["file"])
    return wav


def _sides(
    out: Path, doc: dict[str, Any], call: Any
) -> Iterator[tuple[npt.NDArray[np.int16], Any, str, float, float]]:
    """Each side of a call's audio — its channel, name, and the stretch from its first
    packet to its last (or the end of the audio), 0.1 s in from either end."""
    audio, _rate = soundfile.read(_audio_path(out, doc), dtype="int16")
    origin = min(call.caller.first_time, call.callee.first_time)
    for ch, side in enumerate((call.caller, call.callee)):
        start = side.first_time - origin + 0.1
        end = min(len(audio) / RATE, start - 0.1 + side.packets_sent * 0.02) - 0.1
        yield audio[:, ch], side, ("caller", "callee")[ch], start, end


def _whole_or_shown(out: Path, doc: dict[str, Any], call: Any) -> None:
    """Each side of a call's audio is whole from its first packet to its last — or nearly,
    with every 20 ms frame missing shown as a gap of that side in the sidecar (see
    :func:`tones.assert_whole_or_shown`)."""
    for channel, side, name, start, end in _sides(out, doc, call):
        assert_whole_or_shown(channel, side.tone_hz, start, end, doc["gaps"], name)


def _by_call_id(info: WorkloadInfo) -> dict[str, Any]:
    return {c.call_id: c for c in info.calls}


def test_kill_9_of_one_worker_costs_only_its_calls_which_are_recovered(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    pcap = tmp_path / "calls.pcap"
    info = write_workload(pcap, calls=8, seconds=14, seed=21, start_time=time.time())
    calls = _by_call_id(info)
    owned = {call_id: owner_of(call_id, 2) for call_id in calls}
    assert set(owned.values()) == {0, 1}
    out = tmp_path / "out"
    daemon = _start(tmp_path, net, live_config(tmp_path), workers=2)
    try:
        victim = _worker_pid(daemon, 1)
        sender = _replay_in_background(net, pcap)
        time.sleep(7.0)
        daemon_pids = daemon.workers()
        assert victim in daemon_pids
        subprocess.run(["kill", "-9", str(victim)], check=True)
        daemon.wait_event("worker_exited", timeout=10, where=lambda e: e.get("worker") == 1)
        daemon.wait_event("worker_restarted", timeout=10)
        sender.join(timeout=60)
        assert not sender.is_alive()
        time.sleep(1.5)
        assert daemon.stop() == 0, daemon.stderr[-3000:]
    finally:
        daemon.close()
    events = daemon.events()
    recovered = {e["call_uid"] for e in events if e["event"] == "call_recovered"}
    docs = _outputs(out)
    assert docs.keys() == calls.keys()
    for call_id, (doc, _audio) in docs.items():
        call = calls[call_id]
        if owned[call_id] == 0:
            # the surviving worker's calls: whole, ended by their BYE
            assert doc["end_reason"] in ("bye_caller", "bye_callee"), call_id
            assert doc["call_uid"] not in recovered
            for stream in doc["streams"]:
                side = call.caller if stream["side"] == "caller" else call.callee
                assert stream["packets"] == side.packets and stream["lost"] == 0
            _whole_or_shown(out, doc, call)
        else:
            # the killed worker's calls: published from the spool, up to its last flush
            assert doc["end_reason"] == "recovered", call_id
            assert doc["call_uid"] in recovered
            assert any(w["code"] == "recovered_from_spool" for w in doc["warnings"])
            assert doc["audio"]["duration_s"] >= 3.0
            # Its gaps are those of its last checkpoint (every 5 flushes, by design: see
            # CallRecorder._facts_signature), so a starved sender's hole after it may be
            # unlisted: the audio must hold, not every hole be shown.
            for channel, side, _name, start, end in _sides(out, doc, call):
                assert held_fraction(channel, side.tone_hz, start, end) > 0.9, call_id
    verify = _callcap("verify", str(out))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not list((out / ".spool").glob("*.part"))


def test_sigterm_ends_every_workers_calls_as_shutdown(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    pcap = tmp_path / "calls.pcap"
    info = write_workload(pcap, calls=6, seconds=30, seed=4, start_time=time.time())
    calls = _by_call_id(info)
    assert {owner_of(c, 2) for c in calls} == {0, 1}
    out = tmp_path / "out"
    daemon = _start(tmp_path, net, live_config(tmp_path), workers=2)
    try:
        sender = _replay_in_background(net, pcap)
        time.sleep(8.0)
        stopped_at = time.time()
        assert daemon.stop() == 0, daemon.stderr[-3000:]
        sender.join(timeout=60)
    finally:
        daemon.close()
    docs = _outputs(out)
    assert docs.keys() == calls.keys()
    for call_id, (doc, _audio) in docs.items():
        assert doc["end_reason"] == "shutdown", call_id
        call = calls[call_id]
        # the audio goes on to the signal (within a flush interval and the drain)
        assert doc["audio"]["duration_s"] >= stopped_at - audio_start(doc) - 1.5, call_id
        _whole_or_shown(out, doc, call)
    names = [e["event"] for e in daemon.events()]
    assert names.count("worker_stopping") == 2
    assert names[-1] == "capture_stats" or "daemon_stopping" in names


def test_a_forced_overrun_is_counted_logged_and_flagged_and_recording_goes_on(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    pcap = tmp_path / "calls.pcap"
    info = write_workload(pcap, calls=10, seconds=12, seed=8, start_time=time.time())
    calls = _by_call_id(info)
    # a ring of 4 x 32 KiB, each block handed over when full or after 100 ms, holds about
    # 0.4 s of these 10 calls (a shorter retire timeout would hand over nearly empty blocks,
    # and the ring would hold only 4 timeouts of traffic)
    config = live_config(
        tmp_path,
        capture="  ring:\n    block_size: 32768\n    blocks: 4\n    retire_timeout_ms: 100\n",
    )
    out = tmp_path / "out"
    daemon = _start(tmp_path, net, config, workers=1)
    try:
        worker = _worker_pid(daemon, 0)
        sender = _replay_in_background(net, pcap)
        time.sleep(5.0)
        stalled = time.time()
        subprocess.run(["kill", "-STOP", str(worker)], check=True)  # the worker stalls
        time.sleep(1.5)
        subprocess.run(["kill", "-CONT", str(worker)], check=True)
        resumed = time.time()
        sender.join(timeout=60)
        time.sleep(1.5)
        daemon.wait_event("capture_overrun", where=lambda e: e.get("state") == "ended")
        stats = daemon.wait_event(
            "capture_stats", where=lambda e: e["recordings_total"] == len(calls)
        )
        assert daemon.stop() == 0, daemon.stderr[-3000:]
    finally:
        daemon.close()
    events = daemon.events()
    overruns = [e for e in events if e["event"] == "capture_overrun"]
    assert [e["state"] for e in overruns][:2] == ["started", "ended"]
    assert overruns[0]["level"] == "warning"
    dropped = sum(e["dropped"] for e in overruns if e["state"] == "ended")
    assert dropped > 0
    assert stats["kernel_dropped_total"] == dropped
    docs = _outputs(out)
    assert docs.keys() == calls.keys()
    for call_id, (doc, _audio) in docs.items():
        call = calls[call_id]
        # recording went on: every call ended by its BYE, after the stall
        assert doc["end_reason"] in ("bye_caller", "bye_callee"), call_id
        assert doc["capture_loss"], call_id
        origin = audio_start(doc)
        assert all(span["reason"] == "overrun" for span in doc["capture_loss"])
        # the first loss is the stall's (capture times of the frames around it) ...
        first = doc["capture_loss"][0]
        assert stalled - origin - 0.5 <= first["from_s"] <= resumed - origin
        assert first["to_s"] >= stalled - origin + 0.5, doc["capture_loss"]
        # ... and any later one is a real overrun too (a ring this small, about 0.4 s, on a
        # loaded 2-core machine): after it, in order, and shown like it
        for a, b in itertools.pairwise(doc["capture_loss"]):
            assert a["to_s"] <= b["from_s"] <= b["to_s"], doc["capture_loss"]
        lost = [g for g in doc["gaps"] if g["capture_loss"]]
        assert {g["side"] for g in lost} == {"caller", "callee"}
        assert all(s["capture_loss"] for s in doc["streams"])
        assert all(s["lost"] > 0 for s in doc["streams"])
        assert sum(g["to_s"] - g["from_s"] for g in lost) >= 1.0
        # outside the lost span the audio is whole
        audio, _rate = soundfile.read(_audio_path(out, doc), dtype="int16")
        before = doc["capture_loss"][0]["from_s"] - 0.1
        after = doc["capture_loss"][-1]["to_s"] + 0.3
        assert_whole_or_shown(audio[:, 0], call.caller_tone_hz, 0.1, before, doc["gaps"], "caller")
        end = len(audio) / RATE - 0.1
        assert_whole_or_shown(audio[:, 1], call.callee_tone_hz, after, end, doc["gaps"], "callee")
