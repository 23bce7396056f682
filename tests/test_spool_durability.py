"""The spool is made durable per flush interval with one filesystem sync, not per call.

Every call in flight commits its audio header and its facts each second; fsyncing each file
would put hundreds of disk waits per second on the capture thread of a busy PBX.  Counted
with strace on a real daemon replaying many concurrent calls.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from workload import write_workload

from callcap.storage.spool import SpoolSync

CALLS = 20
SECONDS = 12


def test_daemon_syncs_the_spool_once_per_interval_not_each_call(tmp_path: Path) -> None:
    capture = tmp_path / "w.pcap"
    write_workload(capture, calls=CALLS, seconds=SECONDS, seed=5)
    out = tmp_path / "out"
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,syncfs,sync",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "callcap",
            "daemon",
            "--pcap",
            str(capture),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.rglob("*.wav"))) == CALLS
    calls = re.findall(r"\b(fsync|fdatasync|syncfs|sync)\(", trace.read_text())
    syncfs = calls.count("syncfs") + calls.count("sync")
    fsyncs = calls.count("fsync") + calls.count("fdatasync")
    # ~SECONDS flush intervals with calls in flight: about one filesystem sync each
    assert 1 <= syncfs <= 2 * SECONDS + 5
    # Publishing still fsyncs each recording (audio, sidecar, their directory, the audit
    # log): a bounded number per call, not per call-second (which would be > 3 * 20 * 10).
    assert fsyncs <= 10 * CALLS


def test_spool_sync_coalesces_requests_and_stops(tmp_path: Path) -> None:
    sync = SpoolSync()
    for _ in range(50):
        sync.request(tmp_path)
    deadline = time.monotonic() + 10
    while sync.syncs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    sync.close()
    assert 1 <= sync.syncs <= 50 and sync.last_error is None
    sync.request(tmp_path)  # usable again after close
    sync.close()
    assert sync.syncs >= 2
