"""Capture times that cannot be true: one corrupt timestamp must never size a recording.

Every call's timeline is placed on capture time, so a frame stamped decades ahead (a few
flipped bits in a pcap record header, a broken capture tool) would otherwise move the
clock of every call in flight by decades: silence to write, allocated or spilled to disk,
and every call idle-expired at once.  :class:`TimeGuard` sits between a packet source and
the pipeline and looks at each frame's time against the capture clock (the newest time
accepted so far, or the pipeline's idle clock):

* within ``limit`` of the clock (the common case, checked for a whole block in two vector
  operations): the frame goes on as it is;
* further off, alone — the next frame is back near the clock — it is a **fault**: the frame
  is kept, re-stamped at the capture clock (its packet still counts, in order), and counted;
* further off, and the next frame agrees with it: the capture clock **stepped** (files of
  different days concatenated, a capture host whose clock was set).  The guard yields a
  :class:`ClockStep` before the frame, and the pipeline ends the calls in flight at the old
  clock, saying why, instead of stretching them across the step.

A time no capture can hold — before 1970, or from the year 2200 on (a pcapng whose time
resolution lies, a mangled record header) — never reaches a call: it would put years no
sidecar can write on the recording.  Such a frame is a fault, re-stamped at the capture
clock (or at its successor's time, before there is a clock); one with neither is dropped
and counted (``impossible``, told to ``on_drop``).

``limit`` is the calls' inactivity timeout: no call can hold a silence longer than that
anyway, so nothing real is lost by refusing a longer one inside a call.  A frame whose
successor is not known yet (the last of a block) waits for the next block to decide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from callcap.capture.block import FrameBlock

#: 2200-01-01T00:00:00Z: no frame is captured at or after it (nor before the epoch).
MAX_CAPTURE_TIME = 7_258_118_400.0


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The capture clock moved from ``before`` to ``after`` (either way) by more than the
    guard's limit, and frames keep coming at the new time."""

    before: float
    after: float

    @property
    def seconds(self) -> float:
        return self.after - self.before


class TimeGuard:
    """Yields blocks whose frame times are plausible, and :class:`ClockStep` markers."""

    def __init__(
        self,
        limit_s: float,
        clock: Callable[[], float],
        on_fault: Callable[[float, float], None] | None = None,
        on_drop: Callable[[float], None] | None = None,
    ) -> None:
        #: how far a frame may be from the capture clock before it is looked at
        self.limit = limit_s
        #: the capture clock as the pipeline keeps it (-inf before the first frame)
        self._clock = clock
        #: told (frame's time, time it was given) of every re-stamped frame
        self._on_fault = on_fault
        #: frames re-stamped at the capture clock
        self.faults = 0
        #: told the time of every frame dropped for an impossible time
        self._on_drop = on_drop
        #: frames dropped: an impossible time, and no time near to give them
        self.impossible = 0
        self._held: FrameBlock | None = None  # a suspect last frame, waiting for its successor

    def blocks(self, blocks: Iterable[FrameBlock]) -> Iterator[FrameBlock | ClockStep]:
        """Each block (or its parts, around a fault or a step) in order.  A held frame is
        kept for the next call unless ``blocks`` ends the capture (see :meth:`release`)."""
        for given in blocks:
            if not len(given):
                continue
            block = given
            possible = (given.times >= 0.0) & (given.times < MAX_CAPTURE_TIME)
            if not possible.all():
                # impossible times are no times: the slow path re-stamps (or drops) them
                block = dataclasses.replace(given, times=np.where(possible, given.times, np.nan))
            if self._held is None and self._plausible(block):
                yield block
            else:
                yield from self._sort_out(block)

    def release(self) -> Iterator[FrameBlock]:
        """The capture ended: a frame still held has no successor to agree with it, so it is
        a fault and goes on re-stamped."""
        held, self._held = self._held, None
        if held is not None:
            reference = self._reference()
            if math.isfinite(reference):
                yield self._restamp(held, reference)
            else:
                self._drop(held)

    # -- internals ------------------------------------------------------------------------

    def _reference(self) -> float:
        return float(self._clock())

    def _plausible(self, block: FrameBlock) -> bool:
        times = block.times
        clock = self._reference()
        if math.isfinite(clock) and abs(float(times[0]) - clock) > self.limit:
            return False
        if not np.isfinite(times).all():
            return False
        return len(times) < 2 or float(np.abs(np.diff(times)).max()) <= self.limit

    def _sort_out(self, block: FrameBlock) -> Iterator[FrameBlock | ClockStep]:
        """The slow path (a block with a time far from its neighbours), frame by frame."""
        if self._held is not None:
            held, self._held = self._held, None
            yield from self._decide(held, float(block.times[0]))
        clock = self._reference()
        times = block.times.tolist()
        n = len(times)
        limit = self.limit
        start = 0  # the first frame not yet yielded
        for i, t in enumerate(times):
            if not math.isfinite(clock):
                # The capture's first frame sets the clock — unless it is the fault: the two
                # frames after it agree with each other and not with it.
                if (
                    math.isfinite(t)
                    and i + 2 < n
                    and abs(times[i + 1] - t) > limit
                    and abs(times[i + 2] - times[i + 1]) <= limit
                ):
                    if i > start:
                        yield _part(block, start, i)
                    yield self._restamp(_part(block, i, i + 1), times[i + 1])
                    start = i + 1
                    clock = times[i + 1]
                    continue
                if math.isfinite(t):
                    clock = t
                    continue
            elif math.isfinite(t) and abs(t - clock) <= limit:
                clock = max(clock, t)
                continue
            # a suspect: the frames before it go on first
            if i > start:
                yield _part(block, start, i)
            start = i + 1
            if i + 1 == n:
                self._held = _part(block, i, i + 1)  # decided by the next block's first frame
                return
            decided = list(self._decide(_part(block, i, i + 1), times[i + 1], clock))
            yield from decided
            if any(isinstance(d, ClockStep) for d in decided):
                clock = t
        if start < n:
            yield _part(block, start, n)

    def _decide(
        self, frame: FrameBlock, following: float, clock: float | None = None
    ) -> Iterator[FrameBlock | ClockStep]:
        """``frame`` (one frame) is far from the clock; ``following`` is the next frame's
        time: agreeing with it, the clock stepped; else the frame's time is a fault."""
        reference = self._reference() if clock is None else clock
        t = float(frame.times[0])
        if not math.isfinite(reference):
            if math.isfinite(t):
                yield frame
            elif math.isfinite(following):
                yield self._restamp(frame, following)  # no clock yet: its successor's time
            else:
                self._drop(frame)
            return
        if math.isfinite(t) and math.isfinite(following) and abs(following - t) <= self.limit:
            yield ClockStep(reference, t)
            yield frame
            return
        yield self._restamp(frame, reference)

    def _drop(self, frame: FrameBlock) -> None:
        """``frame`` (one frame) has no time it could be given: counted, not passed on."""
        self.impossible += 1
        if self._on_drop is not None:
            self._on_drop(float(frame.times[0]))

    def _restamp(self, frame: FrameBlock, clock: float) -> FrameBlock:
        """``frame`` (one frame) at time ``clock``, counted and told as a fault."""
        t = float(frame.times[0])
        if not math.isfinite(clock):
            clock = 0.0
        self.faults += 1
        if self._on_fault is not None:
            self._on_fault(t, clock)
        return dataclasses.replace(frame, times=np.array([clock], dtype=np.float64))


def _part(block: FrameBlock, a: int, b: int) -> FrameBlock:
    """Frames ``a`` to ``b`` of ``block`` (views, no copy of the bytes)."""
    return FrameBlock(
        data=block.data,
        starts=block.starts[a:b],
        lengths=block.lengths[a:b],
        times=block.times[a:b],
        linktypes=block.linktypes[a:b],
    )
