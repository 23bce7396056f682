"""One recorder per output directory.

A second daemon, or a ``callcap record``, on a directory a running daemon writes to is
refused in one line naming the process that holds it, with exit status 4 — and the first
daemon records every call once, leaving no spool entry behind when it stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import RunningDaemon, live_config
from netns_harness import NetnsPair, tcpreplay
from workload import write_workload

from callcap.storage.lock import OutputInUse, OutputLock, holder
from callcap.storage.sidecar import validate_sidecar

EXIT_BUSY = 4


def _callcap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callcap", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    with OutputLock(tmp_path) as lock:
        assert holder(tmp_path) == os.getpid()
        with pytest.raises(OutputInUse) as refused:
            OutputLock(tmp_path)
        assert refused.value.pid == os.getpid()
        assert f"in use by process {os.getpid()}" in str(refused.value)
        lock.release()
        OutputLock(tmp_path).release()  # free again at once
    assert holder(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == [".callcap.lock"]  # hidden, empty
    assert (tmp_path / ".callcap.lock").stat().st_size == 0


def test_record_into_a_held_directory_is_refused(tmp_path: Path) -> None:
    capture = tmp_path / "calls.pcap"
    write_workload(capture, calls=2, seconds=3, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        proc = _callcap("record", str(capture), "--out", str(out), "--log-format", "json")
        assert proc.returncode == EXIT_BUSY, proc.stderr[-2000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
        assert f"in use by process {os.getpid()}" in line and str(out) in line
        assert [p.name for p in out.iterdir()] == [".callcap.lock"]  # nothing written
    proc = _callcap("record", str(capture), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.rglob("*.wav"))) == 2


@pytest.mark.e2e
def test_a_second_daemon_on_the_same_directory_is_refused(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    pcap = tmp_path / "calls.pcap"
    info = write_workload(pcap, calls=4, seconds=6, seed=8, start_time=time.time())
    config = live_config(tmp_path)
    out = tmp_path / "out"
    args = ["--config", str(config), "--interface", net.veth_b, "--out", str(out)]
    first = RunningDaemon(tmp_path, args, netns=net.b)
    try:
        first.wait_ready()
        second = RunningDaemon(tmp_path, args, netns=net.b, name="second")
        try:
            assert second.wait(timeout=30) == EXIT_BUSY
        finally:
            second.close()
        (refused,) = [e for e in second.events() if e["event"] == "output_in_use"]
        assert refused["level"] == "error" and refused["pid"] == first.proc.pid
        assert not [e for e in second.events() if e["event"] == "call_recovered"]
        proc = _callcap("record", str(pcap), "--out", str(out))
        assert proc.returncode == EXIT_BUSY
        assert f"in use by process {first.proc.pid}" in proc.stderr
        tcpreplay(net.a, net.veth_a, pcap)
        first.wait_event(
            "capture_stats", timeout=30, where=lambda e: e["recordings_total"] == len(info.calls)
        )
        assert first.stop() == 0, first.stderr[-3000:]
    finally:
        first.close()
    docs = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    for doc in docs:
        validate_sidecar(doc)
    # every call once (no "-1" twin), and nothing left in the spool to publish again
    assert sorted(d["call_id"] for d in docs) == sorted(c.call_id for c in info.calls)
    assert len(list(out.rglob("*.wav"))) == len(info.calls)
    spool = out / ".spool"
    assert not spool.exists() or not [p for p in spool.rglob("*") if p.is_file()]
