"""``callcap retention sweep`` deletes exactly the expired, unheld recordings, as of a fake clock.

Expiry times of the recorded archive (see recorded_archive): subject-1 2024-02-13T22:13:24Z
and plain-1 2024-02-14T22:13:24Z (90 days), finance-1 2028-11-12T22:13:24Z (5 years).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from recorded_archive import Recorded, audit_entries, callcap, record_calls

SUBJECT_EXPIRES = "2024-02-13T22:13:24Z"


def _sweep(out: Path, now: str, *extra: str, expect: int = 0) -> list[str]:
    proc = callcap("retention", "sweep", "--out", str(out), "--now", now, *extra, expect=expect)
    return proc.stdout.splitlines()


def _present(rec: Recorded) -> tuple[bool, bool]:
    return rec.sidecar.exists(), rec.wav.exists()


def test_only_recordings_past_delete_after_are_deleted(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    subject, plain, finance = (
        recorded["subject-1@10.20.0.1"],
        recorded["plain-1@10.20.0.1"],
        recorded["finance-1@10.20.0.1"],
    )
    assert _sweep(out, "2024-02-13T22:13:23.999Z") == [
        "swept as of 2024-02-13T22:13:23.999000+00:00: 0 deleted"
    ]
    assert all(_present(r) == (True, True) for r in recorded.values())

    lines = _sweep(out, SUBJECT_EXPIRES)
    stem = subject.sidecar.relative_to(out).with_suffix("").as_posix()
    assert lines == [
        f"deleted {stem} call_uid={subject.call_uid}: delete_after 2024-02-13T22:13:24.000Z "
        "<= 2024-02-13T22:13:24+00:00",
        "swept as of 2024-02-13T22:13:24+00:00: 1 deleted",
    ]
    assert _present(subject) == (False, False)
    assert _present(plain) == (True, True)
    assert _present(finance) == (True, True)
    deleted = audit_entries(out)[-1]
    assert deleted["event"] == "recording_deleted"
    assert deleted["fields"] == {
        "call_uid": subject.call_uid,
        "delete_after": "2024-02-13T22:13:24.000Z",
    }
    assert deleted["files"]["wav"] == {
        "path": subject.wav.relative_to(out).as_posix(),
        "sha256": subject.doc["audio"]["sha256"],
    }
    assert deleted["files"]["sidecar"]["path"] == subject.sidecar.relative_to(out).as_posix()
    callcap("verify", str(out))

    # years later: the 5-year finance call goes too; nothing is left but the log
    _sweep(out, "2030-01-01T00:00:00")
    assert not any(_present(r) != (False, False) for r in recorded.values())
    assert [e["event"] for e in audit_entries(out)][3:] == ["recording_deleted"] * 3
    assert callcap("verify", str(out)).stdout.endswith("0 file(s), 6 audit entries: clean\n")


def test_a_dry_run_reports_and_changes_nothing(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    before = (out / "audit.jsonl").read_bytes()
    lines = _sweep(out, "2025-01-01T00:00:00Z", "--dry-run")
    assert [line.split(" ", 1)[0] for line in lines] == ["would-delete", "would-delete", "swept"]
    assert all(_present(r) == (True, True) for r in recorded.values())
    assert (out / "audit.jsonl").read_bytes() == before


def test_a_held_recording_outlives_its_expiry_until_released(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    subject = recorded["subject-1@10.20.0.1"]
    callcap("hold", "add", subject.call_uid, "--reason", "case 7", "--out", str(out))
    lines = _sweep(out, "2025-01-01T00:00:00Z")
    assert lines[1].startswith("deleted ")  # plain-1 (lines are in path order)
    assert lines[0] == (
        f"kept {subject.sidecar.relative_to(out).with_suffix('').as_posix()} "
        f"call_uid={subject.call_uid}: delete_after 2024-02-13T22:13:24.000Z "
        "<= 2025-01-01T00:00:00+00:00; on legal hold"
    )
    assert _present(subject) == (True, True)
    callcap("hold", "remove", subject.call_uid, "--reason", "case closed", "--out", str(out))
    _sweep(out, "2025-01-01T00:00:00Z")
    assert _present(subject) == (False, False)
    events = [e["event"] for e in audit_entries(out)]
    assert events[3:] == ["hold_added", "recording_deleted", "hold_removed", "recording_deleted"]
    callcap("verify", str(out))


def test_an_unreadable_sidecar_is_reported_and_left_alone(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    broken = recorded["plain-1@10.20.0.1"]
    broken.sidecar.write_text('{"call_uid": ', encoding="utf-8")
    lines = _sweep(out, "2025-01-01T00:00:00Z", expect=1)
    assert any(line.startswith("error ") and "not a readable sidecar" in line for line in lines)
    assert _present(broken) == (True, True)
    assert _present(recorded["subject-1@10.20.0.1"]) == (False, False)


def test_a_bad_now_is_a_usage_error(tmp_path: Path) -> None:
    proc = callcap("retention", "sweep", "--out", str(tmp_path), "--now", "next tuesday", expect=2)
    assert "--now: expected an ISO 8601 time" in proc.stderr


def test_the_sweep_reads_retention_from_the_sidecar_not_the_config(tmp_path: Path) -> None:
    """Changing the policy later does not rewrite history: delete_after was fixed at record time."""
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "short.yaml"
    cfg.write_text("retention:\n  default: {keep: 0d}\n", encoding="utf-8")
    callcap("retention", "sweep", "--out", str(out), "--config", str(cfg), "--now", "2024-01-01")
    assert all(_present(r) == (True, True) for r in recorded.values())
    doc = json.loads(recorded["finance-1@10.20.0.1"].sidecar.read_text(encoding="utf-8"))
    assert doc["retention"]["keep"] == "5y"


def test_the_sidecar_is_unlinked_before_its_audio(tmp_path: Path) -> None:
    """Seen from the kernel (strace): a watcher never finds a sidecar whose audio is gone."""
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    trace = tmp_path / "unlink.trace"
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=unlink,unlinkat",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "callcap",
            "retention",
            "sweep",
            "--out",
            str(out),
            "--now",
            "2025-01-01T00:00:00Z",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    unlinked = re.findall(r'unlink(?:at)?\([^"]*"([^"]+)"', trace.read_text(encoding="utf-8"))
    expected: list[str] = []
    for call_id in ("subject-1@10.20.0.1", "plain-1@10.20.0.1"):
        rec = recorded[call_id]
        expected += [str(rec.sidecar), str(rec.wav)]
    assert [u for u in unlinked if u.endswith((".json", ".wav"))] == expected
