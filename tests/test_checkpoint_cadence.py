"""How often a durable recorder saves a call's facts to the spool (crash recovery).

Saving builds the whole sidecar and writes it: at thousands of calls that is a large share
of a sensor's time, so it happens when the facts change, after every SIP message that
changes them (once, however many events the message carries), every few flushes while gaps
are being added, and rarely otherwise — recovery stretches a call's end to its audio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import structlog
from callgen import T0, Call, tone, write_pcap

from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline
from callcap.recorder import CHECKPOINT_FLUSHES, QUIET_CHECKPOINT_FLUSHES
from callcap.storage.spool import CallFacts, FactsFiles

SECONDS = 75.0


def _saves(tmp_path: Path, call: Call, monkeypatch: pytest.MonkeyPatch) -> list[CallFacts]:
    """Record ``call`` through a durable pipeline; every checkpoint it saved, in order."""
    saved: list[CallFacts] = []
    save = FactsFiles.save

    def counting(self: FactsFiles, facts: CallFacts) -> None:
        saved.append(facts)
        save(self, facts)

    monkeypatch.setattr(FactsFiles, "save", counting)
    capture = write_pcap(tmp_path / "c.pcap", call.records)
    pipeline = Pipeline(
        load_config(None), tmp_path / "out", structlog.get_logger("t"), durable=True
    )
    with CaptureReader(str(capture)) as reader:
        pipeline.run_blocks(reader.blocks())
    pipeline.close("capture_end")
    assert pipeline.stats().recordings == 1
    return saved


def _call(skip_every: int | None) -> tuple[Call, float]:
    call = Call()
    answer = call.setup(T0)
    lost = range(50, int(SECONDS * 50), skip_every) if skip_every else ()
    call.stream(answer + 0.02, tone(440, SECONDS), from_caller=True, skip=lost)
    call.stream(answer + 0.02, tone(1000, SECONDS), from_caller=False, seq0=9000)
    call.bye(answer + SECONDS + 0.5)
    return call, answer


def test_a_clean_call_is_saved_at_its_answer_then_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    call, answer = _call(None)
    saved = _saves(tmp_path, call, monkeypatch)
    # the 200 OK answers and gives the callee's media: one save, at the answer
    assert saved[0].checkpoint == pytest.approx(answer, abs=1e-6)
    assert saved[0].seq == 1
    assert saved[1].checkpoint > answer  # the next one is a flush's (the streams appeared)
    assert saved[0].sidecar["answer"] is not None
    # after the streams appeared, the facts only change by the clock: every 30 flushes
    later = [f.checkpoint for f in saved if f.checkpoint > answer + 2.5]
    steps = np.diff(later)
    assert len(later) == int((SECONDS - 2.5) // QUIET_CHECKPOINT_FLUSHES)
    assert np.allclose(steps, QUIET_CHECKPOINT_FLUSHES, atol=0.01)
    # what the last save says: both streams, their packets as of then
    last = saved[-1].sidecar
    assert {s["side"] for s in last["streams"]} == {"caller", "callee"}
    assert min(s["packets"] for s in last["streams"]) >= (later[-1] - answer - 1.5) * 50


def test_a_lossy_call_is_saved_every_few_flushes_while_gaps_are_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    call, answer = _call(skip_every=100)  # one caller packet lost every 2 s
    saved = _saves(tmp_path, call, monkeypatch)
    later = [f for f in saved if f.checkpoint > answer + 2.5]
    steps = np.diff([f.checkpoint for f in later])
    assert len(later) >= int((SECONDS - 2.5) // CHECKPOINT_FLUSHES) - 1
    assert steps.max() <= CHECKPOINT_FLUSHES + 0.01
    # every save holds the gaps found up to its flush (recovery loses at most a few seconds')
    for facts in later:
        gaps = facts.sidecar["gaps"]
        assert gaps, facts.checkpoint
        newest = max(g["from_s"] for g in gaps)
        assert facts.checkpoint - (answer + 0.02 + newest) < CHECKPOINT_FLUSHES + 2.5
