"""The systemd notify protocol: real datagrams on a real AF_UNIX socket, and a no-op without one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from callcap.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(2)
    yield sock
    sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_watchdog_and_stopping_reach_the_socket(listener: socket.socket) -> None:
    n = Notifier(listener.getsockname())
    assert n.enabled
    assert n.ready("capturing")
    assert _fields(listener) == {"READY": "1", "STATUS": "capturing", "MAINPID": str(os.getpid())}
    assert n.status("3 calls active, 7 recorded")
    assert _fields(listener) == {"STATUS": "3 calls active, 7 recorded"}
    assert n.watchdog()
    assert _fields(listener) == {"WATCHDOG": "1"}
    assert n.stopping()
    assert _fields(listener) == {"STOPPING": "1"}
    n.close()


def test_abstract_socket_names_are_supported() -> None:
    name = f"callcap-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier("@" + name).ready("ok")
        assert _fields(sock)["READY"] == "1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()
    assert not n.stopping()


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier("").watchdog_interval == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert Notifier("").watchdog_interval is None


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone.sock")).ready("x")
