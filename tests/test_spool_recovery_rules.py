"""The rules crash recovery applies to one spool entry, on files a writer really left.

"Audio up to the last flush" means the frame count in the header the last flush wrote:
bytes written after it are cut off, a file shorter than its header keeps the whole frames it
holds, and a header that was never flushed means no audio.  Unanswered calls are forgotten
(they would get no recording either when ending normally); an entry that cannot be made whole
is moved aside instead of being published.
"""

from __future__ import annotations

import json
import os
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from callcap.errors import StorageError
from callcap.storage.sidecar import validate_sidecar
from callcap.storage.spool import (
    CallFacts,
    audio_path,
    checkpoint_facts,
    facts_path,
    recover_spool,
    spool_files,
)
from callcap.storage.wav import WavWriter, recover_spooled_wav

UID = "abcdefghijklmnop"


def _frames(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, size=(n, 2), dtype=np.int16)


def _crash_copy(writer_path: Path, to: Path) -> Path:
    """What the disk holds if the writer died now: the file as it is, never closed."""
    shutil.copyfile(writer_path, to)
    return to


def _read(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").reshape(-1, 2)


def test_audio_after_the_last_flush_is_cut_off(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "live.wav.part")
    flushed = _frames(8000, 1)
    writer.write(flushed)
    writer.flush()
    writer.write(_frames(3001, 2))  # on disk (page cache), but never made durable
    crashed = _crash_copy(writer.path, tmp_path / "crashed.wav")
    writer.close()
    size = crashed.stat().st_size
    assert recover_spooled_wav(crashed) == (8000, "WAV")
    np.testing.assert_array_equal(_read(crashed), flushed)
    assert crashed.read_bytes()[:4] == b"RIFF"
    assert crashed.stat().st_size == size - 3001 * 4


def test_a_file_shorter_than_its_header_keeps_its_whole_frames(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "live.wav.part")
    flushed = _frames(4000, 3)
    writer.write(flushed)
    writer.flush()
    crashed = _crash_copy(writer.path, tmp_path / "crashed.wav")
    writer.close()
    os.truncate(crashed, crashed.stat().st_size - 4 * 100 - 3)  # a torn last frame
    assert recover_spooled_wav(crashed) == (3899, "WAV")
    np.testing.assert_array_equal(_read(crashed), flushed[:3899])


def test_a_never_flushed_file_holds_no_audio(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "live.wav.part")
    opened = _crash_copy(writer.path, tmp_path / "opened.wav")
    assert opened.read_bytes()[:4] == b"RF64"  # libsndfile's placeholder header at open
    writer.write(_frames(2000, 4))
    written = _crash_copy(writer.path, tmp_path / "written.wav")  # header of the first write
    writer.close()
    for crashed in (opened, written):
        assert recover_spooled_wav(crashed) == (0, "WAV")
        assert len(_read(crashed)) == 0


def test_a_file_that_is_not_a_wav_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav.part"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST")
    with pytest.raises(StorageError, match="not a RIFF/RF64 WAVE"):
        recover_spooled_wav(bad)
    assert bad.read_bytes() == b"RIFF\x00\x00\x00\x00AVI LIST"  # left as it was


def _checkpoint_sidecar() -> dict[str, Any]:
    """What a recorder's checkpoint holds for an answered call (audio not yet known)."""
    return {
        "schema_version": 1,
        "call_uid": UID,
        "call_id": "c1@192.0.2.1",
        "from": {"uri": "sip:alice@192.0.2.1", "user": "alice", "display_name": None, "tag": "a"},
        "to": {"uri": "sip:bob@192.0.2.2", "user": "bob", "display_name": None, "tag": "b"},
        "caller_ip": "192.0.2.1",
        "callee_ip": "192.0.2.2",
        "start": "2023-11-14T22:13:20.000Z",
        "answer": "2023-11-14T22:13:21.000Z",
        "end": "2023-11-14T22:13:30.000Z",
        "duration_s": 10.0,
        "talk_s": 9.0,
        "end_reason": "recovered",
        "final_status": 200,
        "transport": "udp",
        "user_agents": [],
        "audio": {
            "file": "",
            "format": "WAV",
            "encoding": "PCM_16",
            "sample_rate": 8000,
            "channels": ["caller", "callee"],
            "frames": 0,
            "duration_s": 0.0,
            "start": "2023-11-14T22:13:21.100Z",
            "sha256": "",
            "bytes": 0,
        },
        "streams": [],
        "gaps": [],
        "gaps_omitted": 0,
        "dtmf": [],
        "consent": {
            "mode": "one_party",
            "rule": None,
            "status": "not_required",
            "evidence": None,
            "action": "kept",
        },
        "retention": {
            "rule": None,
            "keep": "90d",
            "delete_after": "2024-02-12T22:13:30.000Z",
            "legal_hold": False,
        },
        "warnings": [],
        "recorder": {"name": "callcap", "version": "0.1.0"},
    }


def _facts(answer: str | None) -> CallFacts:
    sidecar = {"answer": answer, "audio": {"sample_rate": 8000}}
    return CallFacts(UID, 1_700_000_000.0, 1_700_000_010.0, sidecar)


def test_unanswered_calls_are_forgotten_and_answered_ones_without_audio_kept_aside(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    dead = 4_000_001
    checkpoint_facts(out, pid=dead, slot=0, facts=_facts(None), file_mode=0o640, dir_mode=0o750)
    other = "zyxwvutsrqponmlk"
    checkpoint_facts(
        out,
        pid=dead,
        slot=0,
        facts=CallFacts(other, 1.0, 2.0, {"answer": "x", "audio": {"sample_rate": 8000}}),
        file_mode=0o640,
        dir_mode=0o750,
    )
    recovered, damaged = recover_spool(out, alive=lambda pid: False)
    assert recovered == []
    assert [d.name for d in damaged] == [f"{other}-{dead}"]
    assert "without audio" in damaged[0].reason
    assert not facts_path(out, UID, dead).exists()
    assert (out / ".spool" / "damaged" / facts_path(out, other, dead).name).is_file()


def test_entries_of_a_live_writer_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live = 4_000_002
    checkpoint_facts(out, pid=live, slot=0, facts=_facts("x"), file_mode=0o640, dir_mode=0o750)
    part = audio_path(out, UID, live)
    part.write_bytes(b"being written")
    assert recover_spool(out, alive=lambda pid: pid == live) == ([], [])
    assert part.read_bytes() == b"being written"
    assert json.loads(facts_path(out, UID, live).read_text())["call_uid"] == UID


def _dead_writer_entry(out: Path, pid: int, seed: int, sidecar: dict[str, Any]) -> None:
    """A spool entry as a recorder killed after a flush leaves it: 800 frames and its facts."""
    (out / ".spool").mkdir(parents=True)
    writer = WavWriter(audio_path(out, UID, pid))
    writer.write(_frames(800, seed))
    writer.flush()
    checkpoint_facts(
        out,
        pid=pid,
        slot=0,
        facts=CallFacts(UID, 1_700_000_000.0, 1_700_000_010.0, sidecar),
        file_mode=0o640,
        dir_mode=0o750,
    )


def test_a_call_with_the_most_warnings_still_gets_the_recovered_one(tmp_path: Path) -> None:
    """A recording at the warning limit must not become unpublishable by recovery's own."""
    out = tmp_path / "out"
    sidecar = _checkpoint_sidecar()
    sidecar["warnings"] = [{"code": f"w{i}", "detail": "x"} for i in range(100)]
    _dead_writer_entry(out, 4_000_003, 5, sidecar)
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == []
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    validate_sidecar(doc)
    assert len(doc["warnings"]) == 100
    assert doc["warnings"][-1]["code"] == "recovered_from_spool"
    assert doc["audio"]["frames"] == 800
    np.testing.assert_array_equal(_read(recovered.wav.path), _frames(800, 5))


def test_a_call_whose_consent_said_discard_is_recovered_without_audio(tmp_path: Path) -> None:
    """Consent refused (or missing, to be discarded) before the crash: no audio afterwards."""
    out = tmp_path / "out"
    sidecar = _checkpoint_sidecar()
    sidecar["consent"] = {
        "mode": "all_party",
        "rule": "eu-callers",
        "status": "refused",
        "evidence": {"method": "dtmf", "digit": "2", "side": "caller", "at_s": 3.2},
        "action": "discarded",
    }
    _dead_writer_entry(out, 4_000_004, 6, sidecar)
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == [] and recovered.wav is None
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    validate_sidecar(doc)
    assert doc["audio"] is None and doc["end_reason"] == "recovered"
    assert doc["consent"]["action"] == "discarded"
    assert not list(out.rglob("*.wav")) and not list(out.rglob("*.part"))
    assert not [p for p in (out / ".spool").rglob("*") if p.is_file()]


def _two_checkpoints(out: Path, pid: int, older: dict[str, Any], newer: dict[str, Any]) -> None:
    """An entry whose recorder checkpointed twice: the older facts in one file, the newer
    in the other, as ``checkpoint_facts`` alternates them."""
    (out / ".spool").mkdir(parents=True)
    writer = WavWriter(audio_path(out, UID, pid))
    writer.write(_frames(800, 9))
    writer.flush()
    slot = 0
    for seq, sidecar in enumerate((older, newer), start=1):
        facts = CallFacts(UID, 1_700_000_000.0, 1_700_000_010.0, sidecar, seq)
        slot = checkpoint_facts(out, facts, pid, slot, file_mode=0o640, dir_mode=0o750)
    assert slot == 0
    assert facts_path(out, UID, pid, 0).is_file() and facts_path(out, UID, pid, 1).is_file()


def test_the_newest_whole_checkpoint_is_recovered(tmp_path: Path) -> None:
    older, newer = _checkpoint_sidecar(), _checkpoint_sidecar()
    newer["warnings"] = [{"code": "newer", "detail": "the second checkpoint"}]
    out = tmp_path / "out"
    _two_checkpoints(out, 4_000_005, older, newer)
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == []
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    assert doc["warnings"][0]["code"] == "newer"
    assert not [p for p in (out / ".spool").iterdir() if p.is_file()]  # both files gone


def test_a_checkpoint_torn_by_a_crash_leaves_the_one_before(tmp_path: Path) -> None:
    older, newer = _checkpoint_sidecar(), _checkpoint_sidecar()
    older["warnings"] = [{"code": "older", "detail": "the first checkpoint"}]
    newer["warnings"] = [{"code": "newer", "detail": "the second checkpoint"}]
    out = tmp_path / "out"
    pid = 4_000_006
    _two_checkpoints(out, pid, older, newer)
    torn = facts_path(out, UID, pid, 1)
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])  # the write in progress when the power went
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == []
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    assert doc["warnings"][0]["code"] == "older"
    # both torn: nothing to describe the audio, so it is kept aside, not published
    out2 = tmp_path / "out2"
    _two_checkpoints(out2, pid, older, newer)
    for slot in (0, 1):
        path = facts_path(out2, UID, pid, slot)
        path.write_bytes(path.read_bytes()[:40])
    recovered, (damaged_entry,) = recover_spool(out2, alive=lambda pid: False)
    assert recovered == [] and "unreadable call facts" in damaged_entry.reason
    assert len(damaged_entry.moved_to) == 3


def test_checkpoints_overwrite_in_place_and_never_truncate_to_nothing(tmp_path: Path) -> None:
    """A shorter checkpoint over a longer one leaves exactly the new JSON (no old tail)."""
    out = tmp_path / "out"
    pid = 4_000_007
    long = _checkpoint_sidecar()
    long["warnings"] = [{"code": f"w{i}", "detail": "x" * 200} for i in range(50)]
    short = _checkpoint_sidecar()
    for seq, (slot, sidecar) in enumerate([(0, long), (1, long), (0, short), (1, short)], 1):
        checkpoint_facts(
            out, CallFacts(UID, 1.0, 2.0, sidecar, seq), pid, slot, file_mode=0o640, dir_mode=0o750
        )
    for slot in (0, 1):
        obj = json.loads(facts_path(out, UID, pid, slot).read_text())
        assert obj["sidecar"]["warnings"] == [] and obj["seq"] == 3 + slot


def test_facts_older_than_the_audio_are_stretched_to_it(tmp_path: Path) -> None:
    """Facts are saved a few flushes apart when only the clock moved: a recovered call still
    ends no earlier than its recovered audio, and its retention term counts from there."""
    out = tmp_path / "out"
    sidecar = _checkpoint_sidecar()  # audio starts 22:13:21.100, facts end 22:13:30.000
    (out / ".spool").mkdir(parents=True)
    writer = WavWriter(audio_path(out, UID, 4_000_008))
    writer.write(_frames(8000 * 12, 10))  # 12 s: to 22:13:33.100
    writer.flush()
    checkpoint_facts(
        out,
        CallFacts(UID, 1_700_000_000.0, 1_700_000_010.0, sidecar),
        4_000_008,
        0,
        file_mode=0o640,
        dir_mode=0o750,
    )
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == []
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    validate_sidecar(doc)
    assert doc["end"] == "2023-11-14T22:13:33.100Z"
    assert (doc["duration_s"], doc["talk_s"]) == (13.1, 12.1)
    assert doc["retention"]["delete_after"] == "2024-02-12T22:13:33.100Z"
    # facts that already reach past the audio are left as they are
    out2 = tmp_path / "out2"
    _dead_writer_entry(out2, 4_000_009, 11, _checkpoint_sidecar())  # 800 frames: 0.1 s
    (recovered,), _damaged = recover_spool(out2, alive=lambda pid: False)
    doc = json.loads(recovered.sidecar.read_text(encoding="utf-8"))
    assert doc["end"] == "2023-11-14T22:13:30.000Z" and doc["duration_s"] == 10.0


def test_a_call_published_whole_but_not_forgotten_is_handed_back_as_it_is(
    tmp_path: Path,
) -> None:
    """Killed after both renames, before the spool entry was forgotten (and the publication
    logged): the recording stays exactly as published and is handed back, to be logged."""
    out = tmp_path / "out"
    _dead_writer_entry(out, 4_000_010, 11, _checkpoint_sidecar())
    (first,), _ = recover_spool(out, alive=lambda pid: False)
    assert first.wav is not None
    wav_bytes, doc_bytes = first.wav.path.read_bytes(), first.sidecar.read_bytes()
    # the same entry's facts once more, as if the writer had died before forgetting them
    checkpoint_facts(
        out,
        pid=4_000_010,
        slot=0,
        facts=CallFacts(UID, 1_700_000_000.0, 1_700_000_010.0, _checkpoint_sidecar()),
        file_mode=0o640,
        dir_mode=0o750,
    )
    (again,), damaged = recover_spool(out, alive=lambda pid: False)
    assert damaged == []
    assert again.wav == first.wav and again.sidecar == first.sidecar
    assert first.wav.path.read_bytes() == wav_bytes and first.sidecar.read_bytes() == doc_bytes
    assert not [p for p in (out / ".spool").rglob("*") if p.is_file()]
    assert len(list(out.rglob("*.wav"))) == 1 and len(list(out.rglob("*.json"))) == 1


def test_recovery_limited_to_a_listing_leaves_files_made_after_it(tmp_path: Path) -> None:
    """The daemon lists the spool before its workers start and recovers that list beside
    them: an entry that appears later is not touched, even under a pid taken for dead."""
    out = tmp_path / "out"
    _dead_writer_entry(out, 4_000_011, 12, _checkpoint_sidecar())
    listed = spool_files(out)
    later = audio_path(out, "qrstuvwxyzabcdef", 4_000_011)
    writer = WavWriter(later)
    writer.write(_frames(80, 13))
    writer.flush()
    (recovered,), damaged = recover_spool(out, alive=lambda pid: False, only=listed)
    assert damaged == [] and recovered.call_uid == UID
    assert [p for p in (out / ".spool").iterdir() if p.is_file()] == [later]
    writer.close()
