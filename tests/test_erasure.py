"""``callcap erase --party`` removes a data subject's recordings, except those on legal hold."""

from __future__ import annotations

from pathlib import Path

from recorded_archive import audit_entries, callcap, record_calls


def _stem(out: Path, sidecar: Path) -> str:
    return sidecar.relative_to(out).with_suffix("").as_posix()


def test_every_recording_of_the_party_is_erased_and_nothing_else(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    subject = recorded["subject-1@10.20.0.1"]
    proc = callcap("erase", "--party", "+4930123", "--out", str(out))
    assert proc.stdout.splitlines() == [
        f"erased {_stem(out, subject.sidecar)} call_uid={subject.call_uid}: party matches",
        "1 erased, 0 kept",
    ]
    assert not subject.sidecar.exists()
    assert not subject.wav.exists()
    others = [r for r in recorded.values() if r is not subject]
    assert all(r.sidecar.exists() and r.wav.exists() for r in others)
    entry = audit_entries(out)[-1]
    assert entry["event"] == "recording_erased"
    assert entry["fields"] == {"call_uid": subject.call_uid, "reason": "right_to_erasure"}
    assert set(entry["files"]) == {"sidecar", "wav"}
    # the log keeps no trace of who the subject was
    assert "4930123" not in (out / "audit.jsonl").read_text(encoding="utf-8")
    callcap("verify", str(out))


def test_a_party_is_found_by_uri_as_callee_too(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    finance = recorded["finance-1@10.20.0.1"]
    proc = callcap("erase", "--party", "<sip:+18005550100@10.20.0.2>", "--out", str(out))
    assert proc.stdout.splitlines()[-1] == "1 erased, 0 kept"
    assert not finance.sidecar.exists()


def test_held_recordings_are_kept_and_the_reason_is_said(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    subject = recorded["subject-1@10.20.0.1"]
    callcap("hold", "add", subject.call_uid, "--reason", "litigation", "--out", str(out))
    proc = callcap("erase", "--party", "+4930123", "--out", str(out))
    assert proc.stdout.splitlines() == [
        f"kept {_stem(out, subject.sidecar)} call_uid={subject.call_uid}: on legal hold",
        "0 erased, 1 kept",
    ]
    assert subject.sidecar.exists() and subject.wav.exists()
    assert audit_entries(out)[-1]["event"] == "hold_added"


def test_dry_run_and_patterns_erase_nothing(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    before = (out / "audit.jsonl").read_bytes()
    dry = callcap("erase", "--party", "+4930123", "--out", str(out), "--dry-run")
    assert dry.stdout.splitlines()[0].startswith("would-erase ")
    star = callcap("erase", "--party", "*", "--out", str(out))
    assert star.stdout == "0 erased, 0 kept\n"
    prefix = callcap("erase", "--party", "+49301", "--out", str(out))
    assert prefix.stdout == "0 erased, 0 kept\n"
    assert all(r.sidecar.exists() and r.wav.exists() for r in recorded.values())
    assert (out / "audit.jsonl").read_bytes() == before
