"""The daemon speaks sd_notify(3) to the socket systemd (here: the test) names.

READY=1 once capturing, WATCHDOG=1 at half of ``WATCHDOG_USEC`` from the main loop (so a
hung loop stops pinging and systemd restarts it), STATUS= with the call counts, STOPPING=1
when a signal ends it.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import RunningDaemon, write_config

pytestmark = pytest.mark.e2e


def test_ready_then_periodic_watchdog_then_stopping(tmp_path: Path, netns: str) -> None:
    config = write_config(tmp_path / "callcap.yaml", "logging:\n  stats_interval_s: 0.5\n")
    daemon = RunningDaemon(
        tmp_path,
        ["--config", str(config), "--interface", "lo", "--out", str(tmp_path / "out")],
        env={"WATCHDOG_USEC": "1000000"},  # ping every 0.5 s
        netns=netns,
    )
    try:
        ready_at = daemon.wait_ready()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            daemon.recv_notify(0.5)
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = daemon.recv_notify(0.5)
            if msg is not None and "STOPPING=1" in msg.splitlines():
                break
        assert daemon.wait() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    messages = [(t, set(m.splitlines())) for t, m in daemon.notifications]
    (ready,) = [(t, m) for t, m in messages if "READY=1" in m]
    assert ready[0] == ready_at
    assert f"MAINPID={daemon.proc.pid}" in ready[1]
    assert messages[0] == ready  # nothing before READY=1
    pings = [t for t, m in messages if "WATCHDOG=1" in m]
    assert len(pings) >= 4, messages  # 3 s at one ping per 0.5 s, with slack for a busy host
    assert all(t > ready_at for t in pings)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert min(gaps) > 0.4  # half the timeout, not as fast as the loop spins
    assert max(gaps) < 1.0  # never as late as the watchdog timeout itself
    assert any(m & {"STATUS=0 calls active, 0 recorded"} for _t, m in messages)
    stopping = [t for t, m in messages if "STOPPING=1" in m]
    assert len(stopping) == 1 and stopping[0] > pings[-1] - 1.0


def test_no_watchdog_pings_without_watchdog_usec(tmp_path: Path, netns: str) -> None:
    daemon = RunningDaemon(
        tmp_path, ["--interface", "lo", "--out", str(tmp_path / "out")], netns=netns
    )
    try:
        daemon.wait_ready()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            daemon.recv_notify(0.3)
        assert daemon.stop() == 0
        while daemon.recv_notify(0.3) is not None:
            pass
    finally:
        daemon.close()
    texts = [m for _t, m in daemon.notifications]
    assert not [m for m in texts if "WATCHDOG=1" in m.splitlines()]
    lines = [m.splitlines() for m in texts]
    assert "READY=1" in lines[0]
    assert sum("STOPPING=1" in m for m in lines) == 1
