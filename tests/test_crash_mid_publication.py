"""A recorder killed in the middle of publishing a call: the WAV renamed into the archive,
its sidecar not yet.  Recovery gives back the whole recording — the WAV as published, with
the sidecar the recorder had staged beside it, or one rebuilt from the spool facts when that
is gone too — instead of moving the facts aside as if the audio were lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import soundfile
import structlog
from callgen import T0, Call, tone, write_pcap

from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline
from callcap.storage.audit import file_sha256
from callcap.storage.publish import StagedJson
from callcap.storage.sidecar import validate_sidecar
from callcap.storage.spool import recover_spool


class _Killed(Exception):
    """Stands for the process dying: nothing after it runs in the crashed copy."""


def _record(out: Path, pcap: Path) -> Pipeline:
    pipeline = Pipeline(load_config(None), out, structlog.get_logger("t"), durable=True)
    with CaptureReader(str(pcap)) as reader:
        pipeline.run_blocks(reader.blocks())
    pipeline.close("capture_end")
    return pipeline


def _only(out: Path, pattern: str) -> Path:
    (path,) = [p for p in out.rglob(pattern) if ".spool" not in p.parts]
    return path


@pytest.mark.parametrize("staged", ["kept", "lost"])
def test_a_crash_between_the_wav_and_its_sidecar_gives_back_the_whole_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: str
) -> None:
    call = Call()
    answer = call.setup(T0)
    call.stream(answer + 0.02, tone(440, 4.0), from_caller=True)
    call.stream(answer + 0.02, tone(1000, 4.0), from_caller=False, seq0=9000)
    call.bye(answer + 4.5)
    pcap = write_pcap(tmp_path / "c.pcap", call.records)

    # the same call published whole, for what the recovered one must match
    _record(tmp_path / "whole", pcap)
    whole_wav = _only(tmp_path / "whole", "*.wav")
    whole_doc: dict[str, Any] = json.loads(whole_wav.with_suffix(".json").read_bytes())

    out, crashed = tmp_path / "out", tmp_path / "crashed"
    staged_doc: dict[str, Any] = {}

    def die(self: StagedJson) -> None:
        shutil.copytree(out, crashed)  # the disk as the process left it
        staged_doc.update(json.loads(self.tmp.read_bytes()))
        if staged == "lost":
            (crashed / self.tmp.relative_to(out)).unlink()
        raise _Killed

    monkeypatch.setattr(StagedJson, "commit", die)
    pipeline = _record(out, pcap)
    assert pipeline.stats().recordings == 0  # the publication never finished
    monkeypatch.undo()

    wav = _only(crashed, "*.wav")
    assert not wav.with_suffix(".json").exists()
    assert [p.name for p in (crashed / ".spool").iterdir() if p.name.endswith(".call.json")]

    (recovered,), damaged = recover_spool(crashed, alive=lambda pid: False)
    assert damaged == []
    assert recovered.wav is not None and recovered.wav.path == wav
    assert recovered.sidecar == wav.with_suffix(".json")
    doc = json.loads(recovered.sidecar.read_bytes())
    validate_sidecar(doc)
    # the audio is the published one, whole
    assert wav.read_bytes() == whole_wav.read_bytes()
    assert doc["audio"]["sha256"] == file_sha256(wav) == recovered.wav.sha256
    audio, rate = soundfile.read(str(wav), dtype="int16")
    assert rate == 8000 and doc["audio"]["frames"] == len(audio) == whole_doc["audio"]["frames"]
    if staged == "kept":
        # the sidecar its recorder wrote: the call as it really ended
        assert doc == staged_doc
        assert recovered.end_reason == doc["end_reason"] == "bye_caller"
        assert doc["audio"]["file"] == wav.name
    else:
        assert recovered.end_reason == doc["end_reason"] == "recovered"
        assert doc["warnings"][-1]["code"] == "recovered_from_spool"
        assert doc["call_uid"] == recovered.call_uid
        assert doc["streams"] and {s["side"] for s in doc["streams"]} == {"caller", "callee"}
    # nothing is left to recover, nothing was moved aside, no staged file lingers
    assert not [p for p in (crashed / ".spool").iterdir() if p.is_file()]
    assert not (crashed / ".spool" / "damaged").exists()
    assert not list(crashed.rglob(".*.tmp-*"))
    assert recover_spool(crashed, alive=lambda pid: False) == ([], [])
