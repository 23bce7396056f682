"""What ops read from the live daemon: capture_stats with the kernel's counters, and a
console rendering for a human at a terminal.

``capture_stats`` must carry the packets the pipeline saw, the socket's received/dropped
counters (PACKET_STATISTICS: a drop is never silent), the active calls and the RSS.  Traffic
here is a few SIP OPTIONS datagrams the test sends to loopback inside its own network
namespace, so the counts are exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import RunningDaemon, write_config
from netns_harness import netns_exec

pytestmark = pytest.mark.e2e

OPTIONS = (
    "OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{n}\r\n"
    "From: <sip:test@127.0.0.1>;tag=t{n}\r\n"
    "To: <sip:probe@127.0.0.1>\r\n"
    "Call-ID: options-{n}@127.0.0.1\r\n"
    "CSeq: {n} OPTIONS\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)


_SENDER = """
import socket, sys
template, count = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    for n in range(count):
        s.sendto(template.format(port=port, n=n).encode(), ("127.0.0.1", 5060))
"""


def _send_options(netns: str, count: int) -> None:
    """SIP OPTIONS datagrams to 127.0.0.1:5060 inside the test's namespace."""
    subprocess.run(
        [*netns_exec(netns), sys.executable, "-c", _SENDER, OPTIONS, str(count)],
        check=True,
        timeout=30,
    )


def test_capture_stats_reports_packets_kernel_counters_calls_and_rss(
    tmp_path: Path, netns: str
) -> None:
    config = write_config(tmp_path / "callcap.yaml", "logging:\n  stats_interval_s: 0.5\n")
    daemon = RunningDaemon(
        tmp_path,
        ["--config", str(config), "--interface", "lo", "--out", str(tmp_path / "out")],
        netns=netns,
    )
    try:
        daemon.wait_ready()
        _send_options(netns, 25)
        stats = daemon.wait_event("capture_stats", where=lambda e: e["packets_total"] >= 25)
        time.sleep(0.2)
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    # each datagram is counted once (loopback's outgoing copy is skipped); the kernel's
    # socket counter sees both copies
    assert stats["packets_total"] == stats["sip_messages_total"] == 25
    assert stats["kernel_received_total"] == 50
    assert stats["kernel_dropped_total"] == stats["kernel_dropped_interval"] == 0
    assert stats["kernel_freezes_total"] == 0
    assert stats["active_calls"] == 0
    assert stats["workers"] >= 1
    assert 5 < stats["rss_mb"] < 2000
    assert stats["level"] == "info"
    every = [e for e in daemon.events() if e["event"] == "capture_stats"]
    final = every[-1]
    assert final["kernel_received_total"] >= stats["kernel_received_total"]  # cumulative
    # the interval counts add up to the running totals
    assert sum(e["packets_interval"] for e in every) == final["packets_total"] == 25
    assert sum(e["kernel_received_interval"] for e in every) == final["kernel_received_total"]


def test_console_log_format_prints_readable_lines(tmp_path: Path, netns: str) -> None:
    daemon = RunningDaemon(
        tmp_path,
        ["--log-format", "console", "--interface", "lo", "--out", str(tmp_path / "out")],
        netns=netns,
    )
    try:
        daemon.wait_ready()
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()
    lines = [line for line in daemon.lines if line.strip()]
    assert len(lines) >= 3
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    text = "\n".join(lines)
    for event in ("daemon_started", "capture_started", "daemon_stopping"):
        assert event in text
    started = next(line for line in lines if "capture_started" in line)
    assert "interfaces" in started and "lo" in started
    assert "\x1b[" not in text  # not a terminal: no colour codes in a pipe
