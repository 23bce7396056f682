"""``callcap hold add|remove`` rewrites the sidecar's legal_hold and logs the new sidecar hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from recorded_archive import audit_entries, callcap, record_calls


def test_hold_add_and_remove_keep_verify_clean(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    rec = recorded["plain-1@10.20.0.1"]
    stem = rec.sidecar.relative_to(out).with_suffix("").as_posix()
    # the config supplies the output directory when --out is not given
    cfg = tmp_path / "hold.yaml"
    cfg.write_text(f"recording:\n  out_dir: {out}\n", encoding="utf-8")
    proc = callcap("hold", "add", rec.call_uid, "--reason", "Smith v. Acme", "--config", str(cfg))
    assert proc.stdout == f"held {stem} call_uid={rec.call_uid}: Smith v. Acme\n"
    doc = json.loads(rec.sidecar.read_text(encoding="utf-8"))
    assert doc["retention"]["legal_hold"] is True
    # nothing else of the sidecar changed
    doc["retention"]["legal_hold"] = False
    assert doc == rec.doc
    entry = audit_entries(out)[-1]
    assert entry["event"] == "hold_added"
    assert entry["fields"] == {"call_uid": rec.call_uid, "reason": "Smith v. Acme"}
    assert entry["files"] == {
        "sidecar": {
            "path": rec.sidecar.relative_to(out).as_posix(),
            "sha256": hashlib.sha256(rec.sidecar.read_bytes()).hexdigest(),
        }
    }
    callcap("verify", str(out))

    again = callcap("hold", "add", rec.call_uid, "--reason", "twice", "--out", str(out))
    assert again.stdout == f"unchanged {stem} call_uid={rec.call_uid}: already on hold\n"
    assert len(audit_entries(out)) == 4

    callcap("hold", "remove", rec.call_uid, "--reason", "settled", "--out", str(out))
    assert json.loads(rec.sidecar.read_text(encoding="utf-8"))["retention"]["legal_hold"] is False
    assert audit_entries(out)[-1]["event"] == "hold_removed"
    assert audit_entries(out)[-1]["fields"]["reason"] == "settled"
    callcap("verify", str(out))


def test_hold_reasons_are_stored_as_safe_text(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    out = tmp_path / "out"
    uid = recorded["finance-1@10.20.0.1"].call_uid
    callcap("hold", "add", uid, "--reason", "line1\nline2\x1b[31m", "--out", str(out))
    assert audit_entries(out)[-1]["fields"]["reason"] == "line1\\u000aline2\\u001b[31m"
    assert len((out / "audit.jsonl").read_text(encoding="utf-8").splitlines()) == 4


def test_an_unknown_or_malformed_call_uid_is_an_error(tmp_path: Path) -> None:
    record_calls(tmp_path)
    out = tmp_path / "out"
    proc = callcap("hold", "add", "a" * 16, "--reason", "x", "--out", str(out), expect=1)
    assert f"no recording with call_uid {'a' * 16}" in proc.stderr
    proc = callcap("hold", "add", "../../etc/passwd", "--reason", "x", "--out", str(out), expect=1)
    assert "not a call_uid" in proc.stderr
    assert len(audit_entries(out)) == 3
