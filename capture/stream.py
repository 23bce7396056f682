"""One RTP stream (one SSRC from one source to one destination): statistics and timeline placement.

Placement is by RTP timestamp, anchored to capture time, so that a packet's audio lands at the
call-timeline sample where it belongs whatever order packets arrive in: reordering inside the
jitter window costs nothing, and loss leaves a hole of exactly the right length instead of
compressing time.  The anchor follows the *minimum* transit (arrival minus media time), which
jitter cannot lower, so the timeline tracks the capture clock even when the sender's clock
drifts over a ten-hour call (RFC 3550 §6.4.1 uses the same transit idea for jitter).

When the anchor moves, audio moves: a step forward leaves a hole, a step back overlaps what
was placed.  Inside a *talk spurt* — packets whose media follows on from the one before
without a break — any step cuts the speech itself, so there the RTP clock rules and the
anchor only follows the capture clock once the two are more than ``drift_limit`` samples
apart (a sender whose clock runs slow or fast, a path whose delay changed for good).  At a
spurt's boundary (silence suppressed by the sender, loss, a new stream) the audio has a
break anyway, and the anchor follows the capture clock within ``tolerance``.  A sender
paced by an imperfect clock — a softphone's timer, a replay tool — thus keeps its speech
whole, its timing corrected in the pauses.  Where a step does fall inside a spurt (past
the drift limit), the hole it opens, or the stretch its audio writes over, is a closed gap
like a loss: the sidecar shows every place where the audio is not the sender's in the
sender's time, not only the places the network made.

Statistics follow RFC 3550 A.1 (extended sequence numbers, expected vs received) and A.8
(interarrival jitter).  Everything here is sans-IO: arrival times come in as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from callcap.capture.rtp import seq_distance, ts_delta

TIMELINE_RATE = 8000
"""Samples per second of the call timeline (the WAV's rate)."""

MAX_DROPOUT = 3000
"""A forward sequence jump at least this big is a restart, not loss (RFC 3550 A.1)."""

MAX_MISORDER = 100
"""A backward jump of at most this many packets is reordering; more is a restart (RFC 3550 A.1)."""

LEAP = 2 * TIMELINE_RATE
"""A packet whose timestamp puts it more than this (2 s) ahead of where its arrival does,
unlike the packets before it, is not believed alone: its neighbours' timing stays (a
corrupt, crafted or rebased timestamp would otherwise move the whole stream)."""

_NEVER = math.inf

MAX_RUN = 2048
"""Longest run :func:`place_runs` takes: keeps its closed-form jitter well inside float64
range ((16/15)**2048 is about 1e57)."""

_JITTER_GAIN = 1.0 / 16.0  # RFC 3550 A.8: J += (|D| - J) / 16
_POWERS = (1.0 - _JITTER_GAIN) ** np.arange(MAX_RUN, dtype=np.float64)
_INV_POWERS = 1.0 / _POWERS


@dataclass(slots=True)
class Gap:
    """Audio missing from one side: packets lost on the wire or arrived too late to place."""

    from_pos: int
    to_pos: int


@dataclass(slots=True)
class _OpenGap:
    """Sequence numbers ``first..last`` not yet received; may still arrive reordered."""

    first: int
    last: int
    from_pos: int
    to_pos: int


@dataclass(slots=True)
class StreamStats:
    packets: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    reanchors: int = 0
    probation: int = 0
    #: packets whose timestamp leapt far ahead of their arrival, alone: placed in sequence
    #: instead (see :data:`LEAP`)
    ts_leaps: int = 0
    jitter_max: float = 0.0  # in RTP clock units
    jitter_sum: float = 0.0
    jitter_samples: int = 0
    payload_types: dict[int, int] = field(default_factory=dict)


class RtpStream:
    """Per-SSRC accounting and placement of one media stream on a call's timeline.

    ``origin`` is the capture time of sample 0 of the call timeline.  ``push`` returns the
    timeline position (in :data:`TIMELINE_RATE` samples) of the packet's first sample, or
    ``None`` when the packet is a duplicate and must not be used again.
    """

    __slots__ = (
        "_anchor",
        "_bad_seq",
        "_base_ext",
        "_cycles",
        "_last_transit",
        "_leap",
        "_leap_next",
        "_lost_before_restart",
        "_max_seq",
        "_missing",
        "_moved_from",
        "_open_gaps",
        "_prev_end",
        "_ref_ext_ts",
        "_ref_ts",
        "_scale",
        "_window_min",
        "clock_rate",
        "closed_gaps",
        "drift_limit",
        "dst",
        "first_arrival",
        "jitter",
        "last_arrival",
        "origin",
        "received",
        "side",
        "src",
        "ssrc",
        "stats",
        "tolerance",
    )

    def __init__(
        self,
        *,
        src: tuple[str, int],
        dst: tuple[str, int],
        ssrc: int,
        side: str,
        origin: float,
        clock_rate: int = TIMELINE_RATE,
        tolerance: int = 160,
        drift_limit: int = 800,
    ) -> None:
        self.src = src
        self.dst = dst
        self.ssrc = ssrc
        self.side = side
        self.origin = origin
        self.clock_rate = clock_rate if clock_rate > 0 else TIMELINE_RATE
        self._scale = TIMELINE_RATE / self.clock_rate
        self.tolerance = tolerance
        self.drift_limit = max(drift_limit, tolerance)
        self._leap = max(LEAP, 4 * self.drift_limit)
        #: (seq, ts) that would continue the last leapt packet: a second packet there makes
        #: the leap the stream's new timing (a sender that rebased its timestamps)
        self._leap_next: tuple[int, int] | None = None
        self.stats = StreamStats()
        self.received = 0  # unique packets in the current sequence run
        self._lost_before_restart = 0
        self.first_arrival = _NEVER
        self.last_arrival = 0.0
        self.jitter = 0.0
        self._max_seq = -1  # highest extended sequence number seen (-1: none yet)
        self._cycles = 0
        self._base_ext = 0
        self._missing: set[int] = set()  # sequence numbers skipped, still expected (reordering)
        self._bad_seq = -1
        self._ref_ts = 0
        self._ref_ext_ts = 0
        self._anchor = _NEVER  # timeline samples = media samples + anchor
        self._window_min = _NEVER
        self._last_transit = _NEVER
        self._prev_end = 0  # timeline end of the highest-sequence packet so far
        #: the anchor before it last moved, until the next packet in sequence shows what
        #: the move did to the audio (:meth:`_judge_move`)
        self._moved_from = _NEVER
        self._open_gaps: list[_OpenGap] = []
        self.closed_gaps: list[Gap] = []

    # -- statistics -----------------------------------------------------------------------

    @property
    def expected(self) -> int:
        return 0 if self._max_seq < 0 else self._max_seq - self._base_ext + 1

    @property
    def next_seq(self) -> int | None:
        """The sequence number that would continue the stream (None before its first packet)."""
        return None if self._max_seq < 0 else (self._max_seq + 1) & 0xFFFF

    @property
    def lost(self) -> int:
        """Packets expected but never received in the current run (RFC 3550 A.3), never < 0."""
        return max(0, self.expected - self.received) + self._lost_before_restart

    @property
    def jitter_ms(self) -> float:
        return self.stats.jitter_max * 1000.0 / self.clock_rate

    @property
    def jitter_mean_ms(self) -> float:
        s = self.stats
        return (
            (s.jitter_sum / s.jitter_samples * 1000.0 / self.clock_rate)
            if s.jitter_samples
            else 0.0
        )

    def set_clock_rate(self, rate: int) -> None:
        """Adopt the codec's RTP clock (known once the first payload type is classified)."""
        if self.stats.packets == 0 and rate > 0:
            self.clock_rate = rate
            self._scale = TIMELINE_RATE / rate

    # -- the per-packet entry point ----------------------------------------------------------

    def push(
        self, arrival: float, seq: int, ts: int, pt: int, samples: int, *, timing: bool = True
    ) -> int | None:
        """Account one packet and place it; ``None`` if it must not be used.

        ``samples`` is the packet's duration in media clock units (0 if unknown).  ``timing``
        is False for packets whose timestamp does not advance with media time (RFC 4733
        telephone-events keep the event's start timestamp), so they neither move the anchor
        nor feed the jitter estimate.  ``None`` means a duplicate, or a packet on probation
        after a sequence jump (RFC 3550 A.1: a jump is believed once the next packet follows it).
        """
        stats = self.stats
        stats.packets += 1
        pts = stats.payload_types
        pts[pt] = pts.get(pt, 0) + 1
        if arrival > self.last_arrival:
            self.last_arrival = arrival
        max_seq = self._max_seq

        # Fast path: the next packet in sequence of an anchored audio stream — nearly all of
        # them.  Same arithmetic as the general path below, without its branches.
        d = (ts - self._ref_ts) & 0xFFFFFFFF
        ext_ts = self._ref_ext_ts + (d - 0x100000000 if d & 0x80000000 else d)
        scale = self._scale
        media = ext_ts * scale
        transit = (arrival - self.origin) * TIMELINE_RATE - media
        if (
            timing
            and seq == ((max_seq + 1) & 0xFFFF)
            and max_seq >= 0
            and self._anchor != _NEVER
            and transit >= self._anchor - self._leap
            and (d < 0x40000000 or d > 0xC0000000)
        ):
            ext = max_seq + 1
            self._max_seq = ext
            self.received += 1
            self._ref_ts = ts
            self._ref_ext_ts = ext_ts
            last = self._last_transit
            self._last_transit = transit
            if last != _NEVER:
                jitter = self.jitter
                jitter += (abs(transit - last) / scale - jitter) / 16.0
                self.jitter = jitter
                stats.jitter_max = max(stats.jitter_max, jitter)
                stats.jitter_sum += jitter
                stats.jitter_samples += 1
            anchor = self._anchor
            pos = round(media + anchor)
            # inside a talk spurt the RTP clock rules; at its boundary, the capture clock
            if pos == self._prev_end:
                if transit < anchor - self.drift_limit:
                    stats.reanchors += 1
                    self._moved_from = anchor
                    anchor = self._anchor = transit
                    pos = round(media + anchor)
                    self._judge_move(media, pos, 1)
            else:
                low = min(self._window_min, transit)
                if transit < anchor - self.tolerance or low > anchor + self.tolerance:
                    stats.reanchors += 1
                    if self._moved_from == _NEVER:
                        self._moved_from = anchor
                    anchor = self._anchor = transit if transit < anchor else low
                    pos = round(media + anchor)
                if self._moved_from != _NEVER:
                    self._judge_move(media, pos, 1)
            self._window_min = min(self._window_min, transit)
            self._prev_end = pos + round(samples * scale)
            if self._open_gaps and ext - self._open_gaps[0].last > MAX_MISORDER:
                self._close_old_gaps()
            return pos

        self.first_arrival = min(self.first_arrival, arrival)
        # RFC 3550 A.1: extend the sequence number and classify the packet.
        if max_seq < 0:
            ext = seq
            self._base_ext = ext
            self._max_seq = ext
            self._ref_ts = ts
            self._ref_ext_ts = ts
            forward = 1
        else:
            d = seq_distance(max_seq & 0xFFFF, seq)
            if 0 < d < MAX_DROPOUT:
                ext = max_seq + d
                forward = d
                self._missing.update(range(max_seq + 1, ext))
                if len(self._missing) > 4 * MAX_MISORDER:
                    floor = ext - MAX_MISORDER
                    self._missing = {m for m in self._missing if m >= floor}
            elif d == 0:
                stats.duplicates += 1
                return None
            elif -MAX_MISORDER <= d < 0:
                ext = max_seq + d
                if ext not in self._missing:
                    stats.duplicates += 1
                    return None
                self._missing.discard(ext)
                forward = 0
                stats.reordered += 1
            elif seq == self._bad_seq:
                # The jump is confirmed by a second packet following it: a new run.
                self._restart(seq, ts)
                ext = seq
                forward = 1
            else:
                self._bad_seq = (seq + 1) & 0xFFFF
                stats.probation += 1
                return None
        self.received += 1

        # Media time of this packet, unwrapped around the 32-bit timestamp.
        delta = ts_delta(self._ref_ts, ts)
        ext_ts = self._ref_ext_ts + delta
        media = ext_ts * self._scale
        arrival_pos = (arrival - self.origin) * TIMELINE_RATE
        length = round(samples * self._scale)
        # A leap: far ahead of the arrival, or a step of 2**30 (37 hours at 8 kHz) or more,
        # where the unwrapping itself is in doubt — believing one such packet as the new
        # reference would shift every later packet by 2**32.
        leapt = (
            timing
            and forward > 0
            and self._anchor != _NEVER
            and (arrival_pos - media < self._anchor - self._leap or abs(delta) >= 1 << 30)
        )
        if leapt and not self._continues_leap(seq, ts, samples):
            return self._leapt(ext, seq, ts, samples, forward, length, arrival_pos)
        if (
            timing
            and not forward
            and self._anchor != _NEVER
            and arrival_pos - media < self._anchor - self._leap
        ):
            self.stats.ts_leaps += 1  # a late packet far ahead of its time: not placed
            return None
        self._leap_next = None
        if forward:
            self._ref_ts = ts
            self._ref_ext_ts = ext_ts

        if leapt:
            # The second packet of a leap: the sender's timestamps moved for good.
            stats.reanchors += 1
            self._moved_from = _NEVER  # its media does not follow on: nothing moved in it
            self._anchor = arrival_pos - media
            self._window_min = min(self._window_min, self._anchor)
            self._last_transit = self._anchor
        elif timing:
            transit = arrival_pos - media
            # RFC 3550 A.8 interarrival jitter, in media clock units.
            if self._last_transit != _NEVER and forward:
                dj = abs(transit - self._last_transit) / self._scale
                self.jitter += (dj - self.jitter) / 16.0
                stats.jitter_max = max(stats.jitter_max, self.jitter)
                stats.jitter_sum += self.jitter
                stats.jitter_samples += 1
            if forward:
                self._last_transit = transit
            anchor = self._anchor
            if anchor == _NEVER:
                self._anchor = transit
            elif forward == 1 and round(media + anchor) == self._prev_end:
                if transit < anchor - self.drift_limit:  # in a talk spurt: the RTP clock
                    stats.reanchors += 1
                    self._move_anchor(transit)
            elif forward:
                low = min(self._window_min, transit)
                if transit < anchor - self.tolerance or low > anchor + self.tolerance:
                    stats.reanchors += 1
                    self._move_anchor(transit if transit < anchor else low)
            elif transit < anchor - self.tolerance:
                stats.reanchors += 1
                self._move_anchor(transit)
            self._window_min = min(self._window_min, transit)
        elif self._anchor == _NEVER:
            self._anchor = arrival_pos - media

        pos = round(media + self._anchor)
        if forward and timing and self._moved_from != _NEVER:
            self._judge_move(media, pos, forward)
        if forward > 1 and timing:
            self._open_gaps.append(_OpenGap(self._max_seq + 1, ext - 1, self._prev_end, pos))
        elif not forward and self._open_gaps:
            self._fill_gap(ext, pos, pos + length)
        if forward:
            self._max_seq = ext
            self._prev_end = pos + length
            if self._open_gaps and ext - self._open_gaps[0].last > MAX_MISORDER:
                self._close_old_gaps()
        return pos

    def _continues_leap(self, seq: int, ts: int, samples: int) -> bool:
        expected = self._leap_next
        return (
            expected is not None
            and seq == expected[0]
            and abs(ts_delta(expected[1], ts)) <= 4 * max(samples, 160)
        )

    def _leapt(
        self,
        ext: int,
        seq: int,
        ts: int,
        samples: int,
        forward: int,
        length: int,
        arrival_pos: float,
    ) -> int:
        """A packet whose timestamp puts it far ahead of its arrival, or half the 32-bit
        clock away from the packet before it (a corrupt or crafted timestamp, or the first
        packet of a sender that rebased its clock).  Alone, it must not move the stream: it
        is placed where its sequence number puts it, after the packet before it, and the
        stream's timing stays as it was.  The packet after it decides
        (:meth:`_continues_leap`)."""
        self.stats.ts_leaps += 1
        self._moved_from = _NEVER
        self._leap_next = ((seq + 1) & 0xFFFF, (ts + samples) & 0xFFFFFFFF)
        pos = self._prev_end + (forward - 1) * length
        # ... unless it came well after that place (the first packet after a hold, from a
        # sender that rebased its clock meanwhile): then where its arrival puts it, with the
        # delay the packet before it had.
        delay = self._last_transit - self._anchor
        if math.isfinite(delay):
            by_arrival = round(arrival_pos - delay)
            if by_arrival > pos + self.tolerance:
                pos = by_arrival
        if forward > 1:
            self._open_gaps.append(_OpenGap(self._max_seq + 1, ext - 1, self._prev_end, pos))
        self._max_seq = ext
        self._prev_end = pos + length
        return pos

    def position(self, ts: int) -> int | None:
        """Timeline position of media timestamp ``ts`` under the current anchor, if any."""
        if self._anchor == _NEVER:
            return None
        ext_ts = self._ref_ext_ts + ts_delta(self._ref_ts, ts)
        return round(ext_ts * self._scale + self._anchor)

    def end_window(self) -> None:
        """Close a placement window (about a second): follow a clock that has fallen behind.

        If every packet of the window arrived later than the anchor says by more than the
        drift limit, the sender's clock runs slow against ours (or it paused its timestamps)
        and no pause came to correct it in: move the anchor so placement keeps matching
        capture time.  (Smaller lags are corrected at the next talk spurt's start.)
        """
        if self._window_min != _NEVER and self._window_min > self._anchor + self.drift_limit:
            self._move_anchor(self._window_min)
            self.stats.reanchors += 1
        self._window_min = _NEVER

    def _move_anchor(self, anchor: float) -> None:
        """Move the anchor, remembering where it was until the next packet in sequence
        shows what the move did to the audio (:meth:`_judge_move`)."""
        if self._moved_from == _NEVER:
            self._moved_from = self._anchor
        self._anchor = anchor

    def _judge_move(self, media: float, pos: int, forward: int) -> None:
        """The first packet in sequence since the anchor moved, placed at ``pos`` after
        ``forward - 1`` lost packets: what did the move do to the audio?

        * Placed before the end of what the stream already placed: it, and the audio after
          it, write over ``[pos, prev_end)``.
        * Placed after it, straight on from the packet before (nothing lost, no silence
          suppressed in between: its media follows on under the old anchor): the move
          opened a hole ``[prev_end, pos)`` in a talk spurt.  After a loss the loss's own
          gap already spans that stretch.

        Either stretch is a gap: the audio there is not what the sender sent, in the
        sender's time."""
        before = self._moved_from
        self._moved_from = _NEVER
        prev_end = self._prev_end
        if pos < prev_end:
            self.closed_gaps.append(Gap(pos, prev_end))
        elif pos > prev_end and forward == 1 and round(media + before) == prev_end:
            self.closed_gaps.append(Gap(prev_end, pos))

    def finish(self) -> None:
        """Stream over: every still-open gap is final."""
        self.closed_gaps.extend(
            Gap(g.from_pos, g.to_pos) for g in self._open_gaps if g.to_pos > g.from_pos
        )
        self._open_gaps.clear()

    # -- internals ----------------------------------------------------------------------------

    def _restart(self, seq: int, ts: int) -> None:
        """A sequence discontinuity too large to be loss or reordering: start a new run."""
        self.stats.restarts += 1
        self._lost_before_restart = self.lost
        self.finish()
        self.received = 0
        self._missing.clear()
        self._bad_seq = -1
        self._base_ext = seq
        self._max_seq = seq
        # Media time restarts from the new timestamp; re-anchor on arrival.
        self._ref_ts = ts
        self._ref_ext_ts = ts
        self._anchor = _NEVER
        self._moved_from = _NEVER
        self._window_min = _NEVER
        self._last_transit = _NEVER

    def _fill_gap(self, ext: int, start: int, end: int) -> None:
        """A reordered packet ``ext`` came, placed at ``start..end``: its gap is split around it.

        Only the part of the packet inside the gap's span fills it.  When the anchor moved
        between the loss and the packet's arrival, the packet lands elsewhere (even before
        the timeline's origin) and the hole it left stays a hole: the pieces never reach
        outside the gap's own span, and a piece no missing packet is left to fill is final.
        What of such a packet falls outside the span writes over audio placed there, and
        that stretch is a gap too."""
        for i, gap in enumerate(self._open_gaps):
            if gap.first <= ext <= gap.last:
                below = min(end, gap.from_pos)
                if start < below:
                    self.closed_gaps.append(Gap(start, below))
                above = max(start, gap.to_pos)
                if above < min(end, self._prev_end):
                    self.closed_gaps.append(Gap(above, min(end, self._prev_end)))
                start = min(max(start, gap.from_pos), gap.to_pos)
                end = min(max(end, start), gap.to_pos)
                pieces = []
                if ext > gap.first:
                    pieces.append(_OpenGap(gap.first, ext - 1, gap.from_pos, start))
                elif start > gap.from_pos:
                    self.closed_gaps.append(Gap(gap.from_pos, start))
                if ext < gap.last:
                    pieces.append(_OpenGap(ext + 1, gap.last, end, gap.to_pos))
                elif gap.to_pos > end:
                    self.closed_gaps.append(Gap(end, gap.to_pos))
                self._open_gaps[i : i + 1] = pieces
                return

    def _close_old_gaps(self) -> None:
        """Close the gaps too old to be filled by a late packet any more.  Open gaps are in
        sequence order (a new one starts past every other, a filled one splits in place),
        so those are a prefix: the cost is the gaps closed, not the gaps open."""
        gaps = self._open_gaps
        limit = self._max_seq - MAX_MISORDER
        n = 0
        while n < len(gaps) and gaps[n].last < limit:
            gap = gaps[n]
            if gap.to_pos > gap.from_pos:
                self.closed_gaps.append(Gap(gap.from_pos, gap.to_pos))
            n += 1
        del gaps[:n]


def place_runs(
    streams: Sequence[RtpStream],
    starts: npt.NDArray[np.int64],
    arrivals: npt.NDArray[np.float64],
    seqs: npt.NDArray[np.uint16],
    tss: npt.NDArray[np.uint32],
    pts: Sequence[int],
    samples: Sequence[int],
    usable: npt.NDArray[np.bool_],
) -> list[npt.NDArray[np.int64] | None]:
    """Account and place runs of audio packets, one run per stream, all with one numpy pass.

    Packets ``starts[r]`` up to the next start (or the end) are run ``r`` of ``streams[r]``:
    one payload type ``pts[r]``, ``samples[r]`` media clock units each.  A run is taken when
    its packets follow each other in sequence and it continues its stream (its first packet
    the next sequence number after the last one pushed, or a forward skip short of a restart:
    loss, whose gap it opens), its stream is anchored and no packet of it would move the
    anchor — the case of nearly every packet of a healthy stream, and of a lossy one.  Then
    the stream ends up exactly as after :meth:`RtpStream.push` packet by packet (the
    jitter, a recursive filter, up to rounding in the last bits) and the run's timeline
    positions are returned; any other run (and any run not ``usable``) is left untouched
    with ``None``, for the caller to push one by one.

    The point is cost: the per-packet Python of ``push`` is replaced by a few dozen array
    operations over every run of a flush interval at once.
    """
    n_runs = len(streams)
    total = len(seqs)
    bounds = np.append(starts, total)
    lengths = bounds[1:] - bounds[:-1]
    ends = bounds[1:] - 1
    sid = np.repeat(np.arange(n_runs), lengths)
    k = np.arange(total) - starts[sid]  # index within the run

    max_seq = np.array([s._max_seq for s in streams], dtype=np.int64)
    ref_ts = np.array([s._ref_ts for s in streams], dtype=np.int64)
    ref_ext = np.array([s._ref_ext_ts for s in streams], dtype=np.int64)
    anchor = np.array([s._anchor for s in streams], dtype=np.float64)
    floor = anchor - np.array([s.drift_limit for s in streams], dtype=np.float64)
    prev_end = np.array([s._prev_end for s in streams], dtype=np.int64)
    origin = np.array([s.origin for s in streams], dtype=np.float64)
    scale = np.array([s._scale for s in streams], dtype=np.float64)
    last = np.array([s._last_transit for s in streams], dtype=np.float64)
    jitter0 = np.array([s.jitter for s in streams], dtype=np.float64)

    ok = usable & (max_seq >= 0) & np.isfinite(anchor) & np.isfinite(last)
    ok &= (lengths > 0) & (lengths <= MAX_RUN)
    # A run continues its stream (skip 1) or follows a loss (a forward skip short of a
    # restart): then it opens a gap, and its first packet is a talk spurt's boundary.
    skip = (seqs[starts].astype(np.int64) - max_seq) & 0xFFFF
    ok &= (skip >= 1) & (skip < min(MAX_DROPOUT, 0x8000))
    after_loss = skip > 1
    # every next packet of a run has the next sequence number (uint16 arithmetic wraps)
    broken = (seqs[1:] - seqs[:-1] != 1) & (sid[1:] == sid[:-1])
    ok &= np.bincount(sid[1:][broken], minlength=n_runs) == 0
    # Media time, unwrapped around 2**32 from the last timestamp pushed.  Within +-2**30 of
    # it every step is a small signed difference, as push() takes them one by one.
    rel = (tss.astype(np.int64) - ref_ts[sid]) & 0xFFFFFFFF
    rel -= (rel & 0x80000000) << 1
    far = (rel <= -(1 << 30)) | (rel >= 1 << 30)
    ok &= np.bincount(sid[far], minlength=n_runs) == 0
    row_scale = scale[sid]
    ext_ts = rel + ref_ext[sid]
    media = ext_ts * row_scale
    transit = (arrivals - origin[sid]) * TIMELINE_RATE - media
    low = np.minimum.reduceat(transit, starts)
    ok &= low >= floor  # no re-anchoring inside the run
    # ... nor at the boundary after a loss (push's rule there: within ``tolerance``)
    tolerance = np.array([s.tolerance for s in streams], dtype=np.float64)
    window_min = np.array([s._window_min for s in streams], dtype=np.float64)
    head = transit[starts]
    moved = (head < anchor - tolerance) | (np.minimum(window_min, head) > anchor + tolerance)
    ok &= ~(after_loss & moved)
    # One talk spurt: each packet's media starts where the one before it ended (a break
    # would be a spurt boundary, where the anchor may move: push decides those).
    positions = np.rint(media + anchor[sid]).astype(np.int64)
    length = np.rint(np.asarray(samples, dtype=np.float64) * scale).astype(np.int64)
    expect = np.empty(total, dtype=np.int64)
    expect[1:] = positions[:-1] + length[sid[:-1]]
    expect[starts] = np.where(after_loss, positions[starts], prev_end)
    ok &= np.bincount(sid[positions != expect], minlength=n_runs) == 0
    if not ok.any():
        return [None] * n_runs

    # RFC 3550 A.8 jitter, J_i = a*J_(i-1) + (1-a)*D_i, in closed form per run:
    # J_i = a**i * (a*J_(-1) + (1-a) * sum_(j<=i) D_j / a**j), on a runs x longest grid so
    # that no run's sums mix with another's.
    previous = np.empty(total, dtype=np.float64)
    previous[1:] = transit[:-1]
    previous[starts] = np.where(np.isfinite(last), last, transit[starts])
    grid = np.zeros((n_runs, int(lengths.max())), dtype=np.float64)
    grid[sid, k] = np.abs(transit - previous) / row_scale * _INV_POWERS[k]
    np.cumsum(grid, axis=1, out=grid)
    grid *= _JITTER_GAIN
    grid += ((1.0 - _JITTER_GAIN) * jitter0)[:, None]
    grid *= _POWERS[: grid.shape[1]]
    jitters = grid[sid, k]
    jitter_max = np.maximum.reduceat(jitters, starts).tolist()
    jitter_sum = np.add.reduceat(jitters, starts).tolist()
    latest = np.maximum.reduceat(arrivals, starts).tolist()

    out: list[npt.NDArray[np.int64] | None] = [None] * n_runs
    # each run's last packet, as Python numbers: the stream goes on from there
    last_ts = tss[ends].tolist()
    last_ext = ext_ts[ends].tolist()
    last_transit = transit[ends].tolist()
    last_jitter = jitters[ends].tolist()
    last_position = positions[ends].tolist()
    first_list = starts.tolist()
    end_list = ends.tolist()
    skips = skip.tolist()
    first_position = positions[starts].tolist()
    for r, (stream, run_ok, n, low_r) in enumerate(
        zip(streams, ok.tolist(), lengths.tolist(), low.tolist(), strict=True)
    ):
        if not run_ok:
            continue
        if skips[r] > 1:  # after a loss: what push does with the run's first packet
            old_max = stream._max_seq
            jump = old_max + skips[r]
            stream._missing.update(range(old_max + 1, jump))
            if len(stream._missing) > 4 * MAX_MISORDER:
                floor_seq = jump - MAX_MISORDER
                stream._missing = {m for m in stream._missing if m >= floor_seq}
            stream._open_gaps.append(
                _OpenGap(old_max + 1, jump - 1, stream._prev_end, first_position[r])
            )
            stream._max_seq = jump - 1  # the run's n packets follow on from here
        stats = stream.stats
        stats.packets += n
        counts = stats.payload_types
        counts[pts[r]] = counts.get(pts[r], 0) + n
        if latest[r] > stream.last_arrival:
            stream.last_arrival = latest[r]
        ext = stream._max_seq + n
        stream._max_seq = ext
        stream.received += n
        stream._ref_ts = last_ts[r]
        stream._ref_ext_ts = last_ext[r]
        stream._last_transit = last_transit[r]
        stream.jitter = last_jitter[r]
        if jitter_max[r] > stats.jitter_max:
            stats.jitter_max = jitter_max[r]
        stats.jitter_sum += jitter_sum[r]
        stats.jitter_samples += n
        if low_r < stream._window_min:
            stream._window_min = low_r
        if stream._moved_from != _NEVER:  # after a loss, the first packet since a move
            stream._judge_move(
                float(media[first_list[r]]),
                first_position[r],
                skips[r],
            )
        stream._prev_end = last_position[r] + round(samples[r] * stream._scale)
        if stream._open_gaps and ext - stream._open_gaps[0].last > MAX_MISORDER:
            stream._close_old_gaps()
        out[r] = positions[first_list[r] : end_list[r] + 1]
    return out
