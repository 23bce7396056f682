"""The daemon's local control socket: ``callcap pause|resume --call-id ID``.

A UNIX stream socket (mode 0660, owned by a configured group), one request per connection:
a JSON object on one line (``{"command": "pause", "call_id": "…"}``), one JSON object line
back (``{"ok": true, …}`` or ``{"ok": false, "error": "…"}``).  The daemon polls it without
blocking from its main loop, so the socket never delays packet capture by more than one
short read from a local client; access control is the file's mode and group.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from callcap.errors import CallcapError

MAX_REQUEST = 4096
CLIENT_TIMEOUT_S = 0.5
COMMANDS = ("pause", "resume")

Handler = Callable[[str, str], dict[str, Any]]


class ControlError(CallcapError):
    """The control socket cannot be opened or reached, or the reply is not understood."""


class ControlServer:
    def __init__(self, path: str, handler: Handler, *, group: str | None = None) -> None:
        self.path = Path(path)
        self.handler = handler
        try:
            gid = grp.getgrnam(group).gr_gid if group is not None else -1
        except KeyError:
            raise ControlError(f"control.group: no such group {group!r}") from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if self.path.is_socket():
                self.path.unlink()  # left by a daemon that did not stop cleanly
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o660)
            if gid != -1:
                os.chown(self.path, -1, gid)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            raise ControlError(f"cannot open control socket {path}: {exc.strerror or exc}") from exc
        self._sock = sock

    def poll(self) -> int:
        """Answer every request waiting now; returns how many were answered."""
        answered = 0
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return answered
            with conn:
                conn.settimeout(CLIENT_TIMEOUT_S)
                reply = self._answer(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")
            answered += 1

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        try:
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return {"ok": False, "error": "request not received in time"}
        try:
            request = json.loads(data.split(b"\n", 1)[0])
        except ValueError:
            return {"ok": False, "error": "request is not a JSON object line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request is not a JSON object line"}
        command = request.get("command")
        call_id = request.get("call_id")
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command (expected one of {COMMANDS})"}
        if not isinstance(call_id, str) or not call_id:
            return {"ok": False, "error": "call_id must be a non-empty string"}
        return self.handler(command, call_id)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def request(path: str, command: str, call_id: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a running daemon and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command, "call_id": call_id}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon at {path} sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} sent an unreadable reply")
    return reply


__all__ = ["ControlError", "ControlServer", "request"]
