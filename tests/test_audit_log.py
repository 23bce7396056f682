"""The audit log is a hash chain that several processes can append to at once without forking it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callcap.storage.audit import GENESIS, RECORDING_PUBLISHED, AuditLog
from callcap.storage.verify import verify

WRITER = """
import sys
from pathlib import Path
from callcap.storage.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    with log.locked() as w:
        w.append("pause", {"writer": sys.argv[2], "n": i})
"""


def _lines(out: Path) -> list[bytes]:
    return (out / "audit.jsonl").read_bytes().splitlines()


def test_every_entry_carries_the_hash_of_the_line_before(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    with log.locked() as w:
        first = w.append("hold_added", {"call_uid": "a" * 16, "reason": "case 1"}, now=0.0)
        second = w.append("hold_removed", {"call_uid": "a" * 16, "reason": "closed"}, now=1.5)
    with log.locked() as w:  # a new writer picks up the chain from the file
        third = w.append("pause", {"call_uid": "b" * 16})
    raw = _lines(tmp_path)
    assert [json.loads(line) for line in raw] == [first, second, third]
    assert first["prev"] == GENESIS
    assert second["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert third["prev"] == hashlib.sha256(raw[1]).hexdigest()
    assert [e["seq"] for e in (first, second, third)] == [1, 2, 3]
    assert second["time"] == "1970-01-01T00:00:01.500Z"
    assert verify(tmp_path).clean


def test_unknown_events_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path).locked() as w, pytest.raises(ValueError, match="unknown audit event"):
        w.append("recording_teleported", {})
    assert not (tmp_path / "audit.jsonl").exists()  # nothing logged, nothing created


def test_concurrent_writers_in_separate_processes_keep_one_chain(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{i}", "40"])
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    raw = _lines(tmp_path)
    entries = [json.loads(line) for line in raw]
    assert [e["seq"] for e in entries] == list(range(1, 161))
    prev = GENESIS
    for line, entry in zip(raw, entries, strict=True):
        assert entry["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()
    per_writer = {
        f"w{i}": [e["fields"]["n"] for e in entries if e["fields"]["writer"] == f"w{i}"]
        for i in range(4)
    }
    assert all(ns == list(range(40)) for ns in per_writer.values())
    assert verify(tmp_path).clean


def test_a_torn_last_line_is_reported_and_the_chain_continues_after_it(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    with log.locked() as w:
        w.append("pause", {"n": 1})
    with (tmp_path / "audit.jsonl").open("ab") as f:
        f.write(b'{"seq":2,"time":"2026-')  # a crash mid-write
    with log.locked() as w:
        entry = w.append("pause", {"n": 3})
    raw = _lines(tmp_path)
    assert len(raw) == 3
    assert entry["seq"] == 3
    assert entry["prev"] == hashlib.sha256(b'{"seq":2,"time":"2026-').hexdigest()
    report = verify(tmp_path)
    (problem,) = report.problems
    assert str(problem).startswith("chain: audit line 2: not a JSON object")


def test_a_process_forked_while_the_lock_is_held_does_not_keep_it(tmp_path: Path) -> None:
    """The daemon forks workers while a thread of it may hold the archive lock (recovery, a
    sweep): the child's copy of the lock's descriptor must not outlive the holder's."""
    log = AuditLog(tmp_path)
    started, child_up = os.pipe()
    with log.locked() as writer:
        writer.append(RECORDING_PUBLISHED, {"call_uid": "a"})
        pid = os.fork()
        if pid == 0:  # the child outlives the parent's hold on the lock
            os.write(child_up, b"!")
            time.sleep(3)
            os._exit(0)
    assert os.read(started, 1) == b"!"  # the child is running
    os.close(started)
    os.close(child_up)
    try:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free although the child lives
        finally:
            os.close(fd)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # (it was still running)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
