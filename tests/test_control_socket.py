"""``callcap pause|resume`` talk to the daemon over its UNIX socket: a live daemon answers,
an unknown call is a clear error with exit 1, and a pause through the socket silences the
call's audio from the moment it was asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile
from callgen import RATE, T0, Call, tone
from sipp_harness import run_call

from callcap.config.loader import load_config_text
from callcap.control import ControlServer, request
from callcap.logs import get_logger
from callcap.pipeline import Pipeline

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def live_daemon(tmp: Path, config: str) -> Iterator[subprocess.Popen[str]]:
    """``callcap daemon`` sniffing lo with ``config``, READY before the block runs; killed
    if still running after it (a test stops it with SIGTERM to check the clean exit)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(20)
    cfg = tmp / "callcap.yaml"
    cfg.write_text(config, encoding="utf-8")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"))
    args = ["daemon", "--interface", "lo", "--out", str(tmp / "out"), "--config", str(cfg)]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "callcap", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert "READY=1" in notify.recv(4096).decode().splitlines()
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()


def control(command: str, call_id: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callcap", command, "--call-id", call_id, *options],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_live_daemon_answers_on_its_socket_and_unknown_call_exits_1(tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "control.sock"
    with live_daemon(tmp_path, f"control:\n  socket: {sock_path}\n") as daemon:
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
        for command in ("pause", "resume"):
            proc = control(command, "no-such-call@x", "--config", str(tmp_path / "callcap.yaml"))
            assert proc.returncode == 1, proc.stderr
            assert "no call in progress with Call-ID no-such-call@x" in proc.stderr
            assert json.loads(proc.stdout)["ok"] is False
        daemon.send_signal(signal.SIGTERM)
        stdout, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0
    assert "control_listening" in [json.loads(line)["event"] for line in stdout.splitlines()]
    assert not sock_path.exists()
    gone = control("pause", "x", "--socket", str(sock_path))
    assert gone.returncode == 1 and "cannot reach the daemon" in gone.stderr


def test_pause_and_resume_through_the_socket_silence_the_call(tmp_path: Path) -> None:
    call = Call()
    answer = call.setup(T0)
    start = answer + 0.1
    call.stream(start, tone(440, 4.0), from_caller=True)
    call.stream(start, tone(1000, 4.0), from_caller=False, seq0=10, ts0=99)
    call.bye(start + 4.2)
    from callgen import write_pcap

    from callcap.capture.pcapfile import CaptureReader

    pcap = write_pcap(tmp_path / "c.pcap", call.records)
    config = load_config_text("rtp: {flush_interval_ms: 100}\n")
    pipeline = Pipeline(config, tmp_path / "out", get_logger("test"))
    server = ControlServer(
        str(tmp_path / "c.sock"),
        lambda command, call_id: pipeline.control_pause(call_id, command == "pause"),
    )
    replies: list[dict[str, Any]] = []

    def ask(command: str) -> None:
        t = threading.Thread(
            target=lambda: replies.append(request(str(tmp_path / "c.sock"), command, call.call_id))
        )
        t.start()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            server.poll()
            time.sleep(0.01)
        t.join()

    asked = {"pause": start + 1.0, "resume": start + 2.5}
    with CaptureReader(str(pcap)) as reader:
        for ts, linktype, frame in reader:
            for command, when in list(asked.items()):
                if ts >= when:
                    ask(command)
                    del asked[command]
            pipeline.feed(ts, linktype, frame)
    pipeline.close("capture_end")
    server.close()
    assert [r["ok"] and r["changed"] for r in replies] == [True, True]
    assert [r["paused"] for r in replies] == [True, False]
    (sidecar,) = (tmp_path / "out").rglob("*.json")
    doc = json.loads(sidecar.read_text(encoding="utf-8"))
    (pause,) = doc["pauses"]
    assert pause["by"] == "control"
    assert abs(pause["from_s"] - 1.0) <= 0.021 and abs(pause["to_s"] - 2.5) <= 0.021
    audio, _ = soundfile.read(str(sidecar.with_suffix(".wav")), dtype="int16")
    a, b = round(pause["from_s"] * RATE), round(pause["to_s"] * RATE)
    assert not audio[a:b].any()
    assert audio[a - 160 : a].any() and audio[b : b + 160].any()


def test_pausing_a_live_call_through_the_daemon_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "control.sock"
    config = f"control: {{socket: {sock_path}}}\nrtp: {{flush_interval_ms: 200}}\n"
    out = tmp_path / "out"
    events: list[dict[str, Any]] = []
    runs: list[Any] = []
    caller_text = (
        "Thank you for holding. I will now take your card details, so the recording is "
        "paused while you read them out, and it resumes when we are done with the payment."
    )
    call = threading.Thread(
        target=lambda: runs.append(run_call(tmp_path / "call", caller_text=caller_text))
    )

    def ask(command: str, call_id: str) -> dict[str, Any]:
        proc = control(command, call_id, "--socket", str(sock_path))
        assert proc.returncode == 0, proc.stderr
        reply: dict[str, Any] = json.loads(proc.stdout)
        return reply

    with live_daemon(tmp_path, config) as daemon:
        reader = threading.Thread(
            target=lambda: events.extend(json.loads(line) for line in daemon.stdout or ())
        )
        reader.start()
        call.start()
        deadline = time.monotonic() + 30
        answered: list[dict[str, Any]] = []
        while not answered and time.monotonic() < deadline:
            answered = [e for e in list(events) if e["event"] == "call_answered"]
            time.sleep(0.05)
        assert answered, events
        call_id = answered[0]["call_id"]
        time.sleep(1.0)
        asked_pause = time.monotonic()
        paused = ask("pause", call_id)
        pause_replied = time.monotonic()
        assert paused["ok"] and paused["paused"] and paused["changed"]
        assert not ask("pause", call_id)["changed"]  # already paused
        time.sleep(1.5)
        asked_resume = time.monotonic()
        resumed = ask("resume", call_id)
        resume_replied = time.monotonic()
        assert resumed["ok"] and not resumed["paused"] and resumed["changed"]
        call.join(timeout=90)
        deadline = time.monotonic() + 20
        while "recording_written" not in [e["event"] for e in events]:
            assert time.monotonic() < deadline, "no recording written"
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        reader.join(timeout=10)
    assert daemon.returncode == 0
    (run,) = runs
    assert run.returncodes == {"uac": 0, "uas": 0}
    names = [e["event"] for e in events]
    assert "recording_paused" in names and "recording_resumed" in names
    # lo may carry other calls too: the one paused is found by its Call-ID
    (sidecar,) = [
        path
        for path in out.rglob("*.json")
        if json.loads(path.read_text(encoding="utf-8"))["call_id"] == call_id
    ]
    doc = json.loads(sidecar.read_text(encoding="utf-8"))
    (pause,) = doc["pauses"]
    assert pause["by"] == "control"
    # The daemon acts when a command arrives; each command is a new process whose start-up
    # time varies with the machine's load, so the pause lies between these bounds.
    shortest = asked_resume - pause_replied
    longest = resume_replied - asked_pause
    assert shortest - 0.1 <= pause["to_s"] - pause["from_s"] <= longest + 0.1
    audio, _ = soundfile.read(str(sidecar.with_suffix(".wav")), dtype="int16")
    a, b = round(pause["from_s"] * RATE), round(pause["to_s"] * RATE)
    assert not audio[a:b].any()
    assert audio[:a, 0].any() and audio[b:, 0].any()  # the caller talks before and after
    assert run.caller is not None and len(run.caller.reference) > b  # ... and during
