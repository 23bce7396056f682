"""Kernel packet timestamps on a clock that does not step.

The kernel stamps captured frames with ``CLOCK_REALTIME``: the wall clock, which NTP (or an
admin) may *step*.  Every call's timeline is placed on those stamps, so a step of the wall
clock in the middle of a call would read, to the recorder, as every stream jumping at once:
a forward step as a stretch of silence, a backward one as packets arriving "late" and lost.

:class:`WallClockSteps` watches the offset between the wall clock and ``CLOCK_MONOTONIC``
(which never steps; NTP only slews its rate, and the wall clock's with it, so the offset
moves only when the wall clock is stepped).  Each step is taken out of the frames' stamps:
the calls in flight go on, on the clock they began with, as if nothing happened.  Once no
call is in flight the capture takes up the wall clock again (:meth:`rebase`), so that later
recordings carry the corrected time.

Frames the kernel stamped just before a step may be read just after it, from a block
retired a few milliseconds later: for a while after a step each frame gets the shift —
old or new — that puts it nearer the monotonic clock's idea of now.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from callcap.capture.block import FrameBlock

#: Offsets that move less than this are the two clocks' reading noise, not a step (NTP
#: daemons step only past 0.128 s, ntpd's default; chrony's makestep is usually 1 s).
STEP_THRESHOLD_S = 0.1
#: Two wall-clock readings around the monotonic one further apart than this were
#: interrupted: read again.
CLEAN_READ_S = 0.002
#: For this long after a step, frames stamped before it may still be read.
SETTLE_S = 5.0


class WallClockSteps:
    """Wall-clock steps, seen through the monotonic clock, and taken out of frame times."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        threshold_s: float = STEP_THRESHOLD_S,
    ) -> None:
        self._wall = wall
        self._mono = mono
        self._threshold = threshold_s
        #: wall minus monotonic when the capture's clock was taken up
        base = self._offset()
        self._base = base if base is not None else wall() - mono()
        #: seconds the wall clock has been stepped since then: taken out of every stamp
        self.shift = 0.0
        self._old_shift = 0.0  # the shift before the last step, for frames stamped before it
        self._old_until = -1.0  # monotonic time until which such frames may come
        self.steps = 0

    def _offset(self) -> float | None:
        """Wall minus monotonic, read between two wall readings close together: a reading
        the scheduler interrupted would pass for a step.  None if no clean reading came."""
        for _ in range(3):
            before = self._wall()
            mono = self._mono()
            after = self._wall()
            if 0.0 <= after - before <= CLEAN_READ_S:
                return (before + after) / 2.0 - mono
        return None

    def check(self) -> float | None:
        """Look at the clocks: the step (seconds, signed) if the wall clock stepped since the
        last look, else None."""
        offset = self._offset()
        if offset is None:
            return None
        shift = offset - self._base
        step = shift - self.shift
        if abs(step) <= self._threshold:
            return None
        self._old_shift = self.shift
        self._old_until = self._mono() + SETTLE_S
        self.shift = shift
        self.steps += 1
        return step

    def rebase(self) -> float:
        """Take up the wall clock again (no call is in flight): the corrected clock moves by
        the returned seconds (0.0 if it already was the wall clock)."""
        moved = self.shift
        if moved:
            self._base += moved
            self.shift = 0.0
            self._old_shift = 0.0
            self._old_until = -1.0
        return moved

    def correct_time(self, ts: float) -> float:
        return float(self._correct(np.array([ts], dtype=np.float64))[0])

    def correct(self, block: FrameBlock) -> FrameBlock:
        """``block`` with its frame times on the unstepped clock (itself if none moved)."""
        if not self.shift and self._mono() > self._old_until:
            return block
        return dataclasses.replace(block, times=self._correct(block.times))

    def _correct(self, times: np.ndarray) -> np.ndarray:
        new = times - self.shift
        mono = self._mono()
        if mono > self._old_until:
            return new
        old = times - self._old_shift
        now = mono + self._base  # the unstepped clock's now
        return np.where(np.abs(new - now) <= np.abs(old - now), new, old)


__all__ = ["CLEAN_READ_S", "SETTLE_S", "STEP_THRESHOLD_S", "WallClockSteps"]
