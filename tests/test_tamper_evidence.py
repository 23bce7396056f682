"""``callcap verify`` names exactly what was altered, added or removed, on a recorded archive."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import soundfile
from callgen import CALLER_IP, T0, Call, sdp, write_pcap
from recorded_archive import Recorded, audit_entries, callcap, record_calls


def _verify(out: Path, expect: int) -> list[str]:
    proc = callcap("verify", str(out), expect=expect)
    return proc.stdout.splitlines()


def _rel(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def _archive(tmp: Path) -> tuple[Path, dict[str, Recorded]]:
    recorded = record_calls(tmp)
    return tmp / "out", recorded


def test_an_untouched_archive_verifies_clean(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    lines = _verify(out, 0)
    assert lines == ["verified 6 file(s), 3 audit entries: clean"]
    entries = audit_entries(out)
    assert [e["event"] for e in entries] == ["recording_published"] * 3
    published = {e["fields"]["call_uid"]: e["files"] for e in entries}
    for rec in recorded.values():
        files = published[rec.call_uid]
        assert files["wav"]["path"] == _rel(out, rec.wav)
        assert files["wav"]["sha256"] == rec.doc["audio"]["sha256"]
        assert files["sidecar"]["path"] == _rel(out, rec.sidecar)


def test_a_flipped_byte_in_a_wav_is_reported_as_that_wav_altered(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    wav = recorded["subject-1@10.20.0.1"].wav
    data = bytearray(wav.read_bytes())
    data[1000] ^= 0x01  # one bit of one audio sample
    wav.write_bytes(bytes(data))
    assert soundfile.info(str(wav)).frames > 0  # still a playable WAV: only the hash can tell
    lines = _verify(out, 1)
    assert len(lines) == 2
    assert lines[0].startswith(f"altered: {_rel(out, wav)}: sha256 ")
    assert "audit line 2" in lines[0]
    assert lines[1].endswith("1 problem(s)")


def test_an_edited_sidecar_is_reported(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    sidecar = recorded["plain-1@10.20.0.1"].sidecar
    doc = json.loads(sidecar.read_text(encoding="utf-8"))
    doc["retention"]["delete_after"] = "2099-01-01T00:00:00.000Z"
    sidecar.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    lines = _verify(out, 1)
    assert lines[0].startswith(f"altered: {_rel(out, sidecar)}: sha256 ")
    assert len(lines) == 2


def test_a_deleted_audit_line_breaks_the_chain_there(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    log = out / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[2])
    report = _verify(out, 1)
    assert report[0].startswith(
        "chain: audit line 2: chain broken: prev is not the SHA-256 of line 1"
    )
    # the recording whose entry was removed is now unaccounted for
    gone = recorded["subject-1@10.20.0.1"]
    assert sorted(report[1:3]) == sorted(
        f"added: {_rel(out, p)}: no audit entry records this file" for p in (gone.sidecar, gone.wav)
    )
    assert len(report) == 4


def test_an_edited_audit_line_breaks_the_chain_at_the_next_line(tmp_path: Path) -> None:
    out, _ = _archive(tmp_path)
    log = out / "audit.jsonl"
    text = log.read_text(encoding="utf-8").replace('"bye_caller"', '"bye_callee"', 1)
    log.write_text(text, encoding="utf-8")
    report = _verify(out, 1)
    assert report[0].startswith("chain: audit line 2: chain broken")
    assert len(report) == 2


def test_a_stray_recording_is_reported_as_added(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    src = recorded["plain-1@10.20.0.1"]
    stray = src.sidecar.with_name("999999_aaaaaaaaaaaaaaaa")
    shutil.copy(src.wav, stray.with_suffix(".wav"))
    shutil.copy(src.sidecar, stray.with_suffix(".json"))
    report = _verify(out, 1)
    assert report[:2] == [
        f"added: {_rel(out, stray.with_suffix('.json'))}: no audit entry records this file",
        f"added: {_rel(out, stray.with_suffix('.wav'))}: no audit entry records this file",
    ]
    assert len(report) == 3


def test_a_recording_removed_without_a_deletion_entry_is_reported(tmp_path: Path) -> None:
    out, recorded = _archive(tmp_path)
    gone = recorded["finance-1@10.20.0.1"]
    gone.wav.unlink()
    report = _verify(out, 1)
    assert report[0] == (
        f"removed: {_rel(out, gone.wav)}: logged at audit line 1 (call {gone.call_uid}) "
        "but missing, with no deletion or erasure entry"
    )
    assert len(report) == 2


def test_a_wav_replaced_together_with_its_audit_hash_still_disagrees_with_its_sidecar(
    tmp_path: Path,
) -> None:
    """Forging the log's hash is not enough: the sidecar vouches for the WAV too."""
    out, recorded = _archive(tmp_path)
    rec = recorded["finance-1@10.20.0.1"]
    other = recorded["plain-1@10.20.0.1"]
    shutil.copy(other.wav, rec.wav)
    log = out / "audit.jsonl"
    log.write_text(
        log.read_text(encoding="utf-8").replace(
            rec.doc["audio"]["sha256"], other.doc["audio"]["sha256"], 1
        ),
        encoding="utf-8",
    )
    report = _verify(out, 1)
    assert report[0].startswith("chain: audit line 2: chain broken")
    assert report[1] == (
        f"altered: {_rel(out, rec.wav)}: sha256 {other.doc['audio']['sha256']} differs from "
        f"its sidecar {_rel(out, rec.sidecar)}"
    )


def test_a_failed_calls_sidecar_is_logged_as_discarded_and_verifies(tmp_path: Path) -> None:
    call = Call(call_id="busy-1@10.20.0.1")
    call.request(T0, "INVITE", body=sdp(CALLER_IP, 40000), to_tag=False)
    call.response(T0 + 0.5, "486 Busy Here")
    call.request(T0 + 0.51, "ACK")
    pcap = write_pcap(tmp_path / "busy.pcap", call.records)
    cfg = tmp_path / "failed.yaml"
    cfg.write_text("recording:\n  record_failed_calls: true\n", encoding="utf-8")
    out = tmp_path / "out"
    callcap("record", str(pcap), "--out", str(out), "--config", str(cfg))
    (sidecar,) = out.rglob("*.json")
    (entry,) = audit_entries(out)
    assert entry["event"] == "recording_discarded"
    assert entry["fields"]["end_reason"] == "rejected_486"
    assert entry["files"] == {
        "sidecar": {
            "path": _rel(out, sidecar),
            "sha256": hashlib.sha256(sidecar.read_bytes()).hexdigest(),
        }
    }
    assert _verify(out, 0) == ["verified 1 file(s), 1 audit entries: clean"]
