"""The systemd notify protocol (sd_notify(3)), and nothing when systemd is not listening.

A datagram of ``KEY=value`` lines to the socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``).  Without that variable every call is a no-op, so the
daemon runs the same under systemd, in a terminal or in a test.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._address = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping at half the timeout

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, wait: float = 0.0, **fields: str | int) -> bool:
        """Send ``READY=1``-style fields; False if systemd is not listening or the send failed.

        A listener that does not read must never stall the recorder: the send waits at most
        ``wait`` seconds for room in its queue (state changes wait a little, the periodic
        status and watchdog pings not at all — the next one follows soon).
        """
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.settimeout(wait if wait > 0 else 0.0)
            self._sock.sendto(message, self._address)
        except OSError:  # TimeoutError and BlockingIOError included
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(1.0, READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.notify(1.0, STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
