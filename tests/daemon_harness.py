"""A running ``callcap daemon`` for tests: started as a real process, with a notify socket.

``netns`` runs it inside a network namespace (the notify socket is a path, which every
namespace shares).  The test owns the notify socket (a Unix datagram socket in its temp dir, as systemd's is)
and reads what the daemon announces; stdout is the JSON log, collected by a reader thread so
the pipe never fills while the test waits on something else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from netns_harness import netns_exec

#: Events every recorded call's life leaves in the daemon's log, from start to shutdown.
LIFECYCLE_EVENTS = (
    "daemon_started",
    "capture_started",
    "call_started",
    "call_answered",
    "call_ended",
    "recording_written",
    "daemon_stopping",
)


class RunningDaemon:
    def __init__(
        self,
        tmp: Path,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        name: str = "daemon",
    ) -> None:
        self.notify_path = tmp / f"{name}-notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notifications: list[tuple[float, str]] = []
        self.lines: list[str] = []
        self._stderr: list[str] = []
        prefix = netns_exec(netns) if netns else []
        full_env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), **(env or {}))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "callcap", "daemon", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
        )
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)

    def recv_notify(self, timeout: float) -> str | None:
        """The next notify datagram within ``timeout`` seconds, or None."""
        self.notify.settimeout(timeout)
        try:
            data = self.notify.recv(4096).decode()
        except TimeoutError:
            return None
        self.notifications.append((time.monotonic(), data))
        return data

    def wait_ready(self, timeout: float = 30) -> float:
        """Block until READY=1; return when it arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early: {self.stderr[-2000:]}")
            msg = self.recv_notify(0.5)
            if msg is not None and "READY=1" in msg.splitlines():
                return self.notifications[-1][0]
        raise AssertionError(f"no READY=1 within {timeout} s: {self.stderr[-2000:]}")

    def events(self) -> list[dict[str, Any]]:
        """Every log line so far, parsed (a line that is not JSON fails the test here)."""
        return [json.loads(line) for line in list(self.lines)]

    def wait_event(
        self, event: str, timeout: float = 20, where: Callable[[dict[str, Any]], bool] = bool
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == event and where(e):
                    return e
            time.sleep(0.1)
        raise AssertionError(f"no {event} event within {timeout} s; log: {self.lines[-20:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit; the notify socket stays readable."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for an exit already under way (a second SIGTERM is not what systemd sends)."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        for t in self._threads:
            t.join(timeout=5)
        return code

    def workers(self) -> list[int]:
        """PIDs of the daemon's worker processes (its children)."""
        pid = self.proc.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to the master and every worker at once, as systemd kills a unit's
        control group (a crash of the whole service, an OOM kill, a power cut)."""
        for pid in [*self.workers(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        for t in self._threads:
            t.join(timeout=5)
        self.notify.close()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def live_config(tmp: Path, *, capture: str = "", extra: str = "") -> Path:
    """``tmp/live.yaml`` for a daemon sniffing a test's veth: promiscuous (the replayed calls
    are not addressed to it), stats every second, no control socket.  ``capture`` adds
    lines to the capture section (indented), ``extra`` whole sections."""
    return write_config(
        tmp / "live.yaml",
        "capture:\n  promiscuous: true\n"
        + capture
        + "logging:\n  stats_interval_s: 1\ncontrol:\n  socket: null\n"
        + extra,
    )


__all__ = ["LIFECYCLE_EVENTS", "RunningDaemon", "live_config", "write_config"]
