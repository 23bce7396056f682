"""A wall-clock step (NTP, an admin) in the middle of live calls changes nothing in them.

The kernel stamps frames with the wall clock.  Here a capture's frames are fed as the live
worker feeds them — a block per 20 ms wake-up, ticks from the capture clock — with every
frame after a moment stamped as the kernel would stamp it once the wall clock was stepped
there (an hour ahead, half a minute back).  Through :class:`WallClockSteps`, which sees the
step against the monotonic clock, the recordings are the same, sample for sample, as those
of the unstepped capture; the clock is taken up again once no call is in flight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from outputs import published
from workload import write_workload

from callcap.capture.block import FrameBlock
from callcap.capture.pcapfile import CaptureReader
from callcap.capture.wallclock import WallClockSteps
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline

Frame = tuple[float, int, bytes]


class _Clocks:
    """A monotonic clock driven by the test, and a wall clock that may be stepped."""

    def __init__(self, start: float) -> None:
        self.mono = 1000.0
        self.wall_offset = start - self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset

    def monotonic(self) -> float:
        return self.mono


def _frames(path: Path) -> list[Frame]:
    with CaptureReader(str(path)) as reader:
        return list(reader)


def _live(frames: list[Frame], out: Path, step_at: float | None, step: float) -> Pipeline:
    """Feed ``frames`` as the live worker does, the wall clock stepped by ``step`` seconds
    at capture time ``step_at`` (frames from then on carry stepped stamps)."""
    pipeline = Pipeline(load_config(None), out, structlog.get_logger("test"))
    clocks = _Clocks(frames[0][0])
    steps = WallClockSteps(wall=clocks.wall, mono=clocks.monotonic)
    t0 = frames[0][0]
    i = 0
    stepped = False
    wake = t0
    seen = (t0, clocks.mono)
    while i < len(frames):
        wake += 0.02
        batch = []
        while i < len(frames) and frames[i][0] <= wake:
            ts, linktype, frame = frames[i]
            if stepped or (step_at is not None and ts >= step_at):
                if not stepped:
                    stepped = True
                    clocks.wall_offset += step  # NTP steps the clock here
                ts += step
            batch.append((ts, linktype, frame))
            i += 1
        clocks.mono = 1000.0 + (wake - t0) + 0.003  # read a few ms after the wake-up
        steps.check()
        idle = not pipeline.recorders and not pipeline.tracker.calls
        if steps.shift and idle and steps.rebase() < 0:
            pipeline.restart_clock()
        if batch:
            block = steps.correct(FrameBlock.of(batch))
            pipeline.run_live([block])
            seen = (float(block.times.max()), clocks.mono)
        # the worker's capture clock: the newest frame's time plus monotonic time since
        now = seen[0] + (clocks.mono - seen[1])
        if now >= pipeline.next_tick:
            pipeline.tick(now)
    pipeline.close("capture_end")
    return pipeline


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> list[Frame]:
    path = tmp_path_factory.mktemp("calls") / "calls.pcap"
    write_workload(path, calls=5, seconds=10, seed=12)
    return _frames(path)


@pytest.fixture(scope="module")
def reference(
    capture: list[Frame], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    out = tmp_path_factory.mktemp("reference")
    _live(capture, out, None, 0.0)
    return published(out)


@pytest.mark.parametrize(
    "step", [3600.0, -30.0, 0.4], ids=["hour-ahead", "half-minute-back", "0.4s"]
)
def test_calls_in_flight_do_not_see_a_wall_clock_step(
    tmp_path: Path, capture: list[Frame], reference: dict[str, Any], step: float
) -> None:
    middle = capture[0][0] + 6.0  # every call is in flight
    pipeline = _live(capture, tmp_path / "out", middle, step)
    got = published(tmp_path / "out")
    assert got.keys() == reference.keys() and len(got) == 5
    for call_id, (doc, audio) in got.items():
        ref_doc, ref_audio = reference[call_id]
        assert doc["end_reason"] == ref_doc["end_reason"] != "timeout"
        assert doc["start"] == ref_doc["start"] and doc["end"] == ref_doc["end"]
        assert doc["gaps"] == ref_doc["gaps"]
        assert np.array_equal(audio, ref_audio)
    assert pipeline.counters["capture_clock_steps"] == 0


def test_the_stepped_clock_is_taken_up_once_no_call_is_in_flight() -> None:
    clocks = _Clocks(1_700_000_000.0)
    steps = WallClockSteps(wall=clocks.wall, mono=clocks.monotonic)
    assert steps.check() is None
    clocks.mono += 1.0
    clocks.wall_offset += 3600.0
    assert steps.check() == pytest.approx(3600.0)
    assert steps.check() is None  # seen once
    # a frame stamped just before the step, read just after it, keeps its own time; one
    # stamped after it is moved back by the step
    before, after = 1_700_000_000.995, 1_700_003_601.001
    block = FrameBlock.of([(before, 1, b"a"), (after, 1, b"b")])
    assert steps.correct(block).times.tolist() == pytest.approx([before, after - 3600.0])
    assert steps.rebase() == pytest.approx(3600.0)
    assert steps.shift == 0.0
    assert steps.correct(block) is block  # the wall clock again
    # slewing moves both clocks alike: never a step
    clocks.mono += 10.0
    clocks.wall_offset += 0.01
    assert steps.check() is None


def test_a_reading_the_scheduler_interrupted_is_not_a_step() -> None:
    """Wall and monotonic clocks are read one after the other: a process descheduled for
    200 ms between the two readings must not take that for a step of the wall clock."""
    clocks = _Clocks(1_700_000_000.0)
    reads = {"n": 0}

    def monotonic() -> float:
        reads["n"] += 1
        if reads["n"] == 2:  # the first look's monotonic reading comes 200 ms late
            clocks.mono += 0.2
        return clocks.mono

    steps = WallClockSteps(wall=clocks.wall, mono=monotonic)
    assert steps.check() is None and steps.shift == 0.0
    clocks.wall_offset += 30.0
    assert steps.check() == pytest.approx(30.0)
