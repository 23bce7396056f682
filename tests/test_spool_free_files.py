"""Checkpoint files are reused across calls: blanked when a call is published, renamed to
the next call's names, and removed by recovery once their writer is gone."""

from __future__ import annotations

import json
import os
from pathlib import Path

from callcap.storage.spool import (
    FREE_FILES,
    FREE_MARK,
    CallFacts,
    FactsFiles,
    facts_path,
    recover_spool,
    remove_entry,
)

FIRST = "abcdefghijklmnop"
SECOND = "qrstuvwxyzabcdef"


def _save_twice(out: Path, uid: str, caller: str) -> FactsFiles:
    files = FactsFiles(out, uid, os.getpid(), file_mode=0o640, dir_mode=0o750)
    for seq in (1, 2):  # both checkpoint files
        doc = {"from": {"uri": caller}, "audio": {"sample_rate": 8000}}
        files.save(CallFacts(uid, 1_700_000_000.0, 1_700_000_000.0 + seq, doc, seq))
    return files


def test_a_published_calls_checkpoints_are_blanked_and_reused_by_the_next_call(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    pid = os.getpid()
    first = _save_twice(out, FIRST, "sip:alice@example.com")
    inodes = {os.stat(facts_path(out, FIRST, pid, slot)).st_ino for slot in (0, 1)}
    first.close()
    remove_entry(out, FIRST, pid)

    assert not facts_path(out, FIRST, pid, 0).exists()
    assert not facts_path(out, FIRST, pid, 1).exists()
    free = sorted((out / ".spool" / "free").iterdir())
    assert len(free) == 2
    for path in free:
        assert path.read_bytes() == FREE_MARK  # nothing of the call stays behind
        assert path.name.startswith(f"{pid}-")

    second = _save_twice(out, SECOND, "sip:bob@example.com")
    second.close()
    reused = {os.stat(facts_path(out, SECOND, pid, slot)).st_ino for slot in (0, 1)}
    assert reused == inodes
    assert list((out / ".spool" / "free").iterdir()) == []
    for slot in (0, 1):
        doc = json.loads(facts_path(out, SECOND, pid, slot).read_text())
        assert doc["call_uid"] == SECOND
        assert doc["sidecar"]["from"]["uri"] == "sip:bob@example.com"
    remove_entry(out, SECOND, pid)
    assert len(list((out / ".spool" / "free").iterdir())) == 2
    FREE_FILES.discard()  # a clean exit leaves no free file behind
    assert list((out / ".spool" / "free").iterdir()) == []


def test_recovery_removes_the_free_files_of_writers_that_are_gone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    free = out / ".spool" / "free"
    free.mkdir(parents=True)
    (free / "4000001-1").write_bytes(FREE_MARK)
    (free / "4000002-7").write_bytes(FREE_MARK)
    recovered, damaged = recover_spool(out, alive=lambda pid: pid == 4000002)
    assert (recovered, damaged) == ([], [])
    assert sorted(p.name for p in free.iterdir()) == ["4000002-7"]
