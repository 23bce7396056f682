"""Live capture from interfaces: blocks of frames from TPACKET_V3 rings, drops told honestly.

One ring socket per configured interface (:mod:`callcap.capture.ring`); ``any`` is one
socket bound to every interface.  :meth:`LiveCapture.poll` waits for the kernel to hand over
blocks and returns them as :class:`~callcap.capture.block.FrameBlock` s, the unit the
pipeline's fast lane works on; each frame's link type comes from its interface's hardware
type, so a box with Ethernet, VLAN trunks and tunnels mixes them safely.  On loopback the
kernel shows every packet twice (outgoing and incoming): the outgoing copy is dropped, as
libpcap does.

Besides frames, a live source reports what a capture file never has to:

- **Kernel drops** (``tpacket_stats_v3``): the ring was full, frames were lost in the
  sensor.  Each socket's counters are read after every wake-up; drops open an *overrun*,
  which ends at the first read without new drops.  The time span in which frames can have
  been lost — from the last frame before the ring filled to the first frame after it had
  room again — is a :class:`LossWindow`, so that the recorder can tell a gap caused by the
  sensor from one caused by the network.
- **Interfaces going down and coming back** (``ip link set … down/up``, a cable pulled, a
  veth or VLAN re-created): the socket reports ``ENETDOWN``; capture goes on by itself when
  the link is back (the kernel re-attaches a bound socket on ``NETDEV_UP``; an interface
  re-created under the same name gets a new socket).  The outage is a loss window too.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from callcap.capture.block import FrameBlock
from callcap.capture.ring import (
    BlockReport,
    RingSocket,
    RingSpec,
    can_capture,
    interface_is_up,
    wait_readable,
)
from callcap.errors import CaptureError

#: Blocks taken from one socket per wake-up before the others get their turn.
MAX_BLOCKS_PER_POLL = 16
#: While an interface is down, how often to look whether it is back.  Often: frames that
#: arrive once it is up wait in the ring until it is seen up, while the calls' clock moves
#: on, and a frame that waited past the jitter window is placed as late (a gap).  Reading
#: one sysfs file fifty times a second costs nothing.
RECHECK_S = 0.02
#: How often to try again to open a socket on an interface that is up but cannot be opened
#: (each failure is logged).
REOPEN_S = 1.0


@dataclass(frozen=True, slots=True)
class LossWindow:
    """Capture time ``start``..``end`` (seconds, kernel clock) in which frames were lost in
    the sensor: ``reason`` is ``overrun`` (the ring was full) or ``interface_down``."""

    interface: str
    start: float
    end: float
    reason: str
    frames: int | None = None  # frames the kernel counted as dropped, when it knows


@dataclass(frozen=True, slots=True)
class CaptureEvent:
    """Something to log about the capture itself (not about a call).

    ``kind``: ``overrun_started``, ``overrun_ended`` (``dropped``: frames lost in it,
    ``freezes``: times the ring was found full), ``interface_down``, ``interface_up``
    (``outage_s``), ``interface_reopened``, ``block_corrupt`` (``detail``).
    """

    kind: str
    interface: str
    dropped: int = 0
    freezes: int = 0
    outage_s: float | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters since the capture opened (``kernel_*`` straight from the kernel's)."""

    frames: int  # frames handed to the pipeline
    kernel_packets: int  # frames the kernel filter passed (dropped ones included)
    kernel_dropped: int  # frames lost because a ring was full
    kernel_freezes: int  # times a ring was found full
    truncated: int  # frames cut short by the snap length or the ring's frame space, skipped
    corrupt_blocks: int  # ring blocks whose header or frame chain was out of bounds
    blocks: int


@dataclass(slots=True)
class _Source:
    """One interface's ring socket and what the capture knows about its state."""

    interface: str
    ring: RingSocket | None
    last_ts: float | None = None  # newest frame taken
    down_since: float | None = None  # kernel time of the last frame before ENETDOWN
    down_at: float | None = None  # monotonic time the outage was noticed
    down_wall: float | None = None  # wall-clock time the outage was noticed
    next_check: float = 0.0
    overrun_dropped: int = 0  # frames lost in the overrun in progress
    overrun_freezes: int = 0
    loss_from: float | None = None  # a loss window waiting for its first frame after
    loss_reason: str = "overrun"
    loss_frames: int = 0


@dataclass(slots=True)
class _Totals:
    frames: int = 0
    kernel_packets: int = 0
    kernel_dropped: int = 0
    kernel_freezes: int = 0
    truncated: int = 0
    corrupt_blocks: int = 0
    blocks: int = 0


@dataclass(slots=True)
class Polled:
    """One wake-up's worth: blocks in capture order per socket, and what happened."""

    blocks: list[FrameBlock] = field(default_factory=list)
    events: list[CaptureEvent] = field(default_factory=list)
    losses: list[LossWindow] = field(default_factory=list)


class LiveCapture:
    """Blocks of frames from one or more interfaces, through TPACKET_V3 rings."""

    def __init__(
        self,
        interfaces: Sequence[str],
        *,
        bpf: str | None = None,
        promiscuous: bool = False,
        snaplen: int = 65535,
        ring: RingSpec | None = None,
    ) -> None:
        if not interfaces:
            raise CaptureError("no interface to capture on")
        self.snaplen = snaplen
        self.bpf = bpf
        self.promiscuous = promiscuous
        self.spec = ring or RingSpec()
        self._sources: list[_Source] = []
        self._totals = _Totals()
        try:
            for name in interfaces:
                self._sources.append(_Source(name, self._open(name)))
        except CaptureError:
            self.close()
            raise

    def _open(self, name: str) -> RingSocket:
        return RingSocket(name, self.spec, self.bpf, self.promiscuous, self.snaplen)

    @property
    def interfaces(self) -> list[str]:
        return [s.interface for s in self._sources]

    def poll(self, timeout: float) -> Polled:
        """What the kernel hands over within ``timeout`` seconds (nothing on timeout)."""
        out = Polled()
        live = [s.ring for s in self._sources if s.ring is not None and s.down_since is None]
        ready = wait_readable(live, timeout) if live else _sleep(timeout)
        by_ring = {id(r): ev for r, ev in ready}
        mono = time.monotonic()
        for source in self._sources:
            ring = source.ring
            if ring is None or source.down_since is not None:
                self._check_down(source, mono, out)
                ring = source.ring
                if ring is None or source.down_since is not None:
                    continue
            if id(ring) in by_ring:
                error = ring.pending_error()
                if error in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    self._take(source, ring, out)  # frames captured before the link went down
                    self._went_down(source, mono, out)
                    continue
            self._take(source, ring, out)
        return out

    def _take(self, source: _Source, ring: RingSocket, out: Polled) -> None:
        totals = self._totals
        before = source.last_ts
        losing_at: tuple[float | None, float] | None = None  # (last before, first in)
        for block, report in ring.take(MAX_BLOCKS_PER_POLL):
            totals.blocks += 1
            totals.truncated += report.truncated
            if report.corrupt is not None:
                totals.corrupt_blocks += 1
                out.events.append(
                    CaptureEvent("block_corrupt", source.interface, detail=report.corrupt[:200])
                )
            if report.first_ts is not None:
                if source.loss_from is not None:
                    self._close_loss(source, block, report, out)
                if report.losing and losing_at is None:
                    losing_at = (source.last_ts, report.first_ts)
                if report.last_ts is not None:
                    source.last_ts = report.last_ts
            if len(block):
                totals.frames += len(block)
                out.blocks.append(block)
        self._read_stats(source, ring, before, losing_at, out)

    @staticmethod
    def _close_loss(source: _Source, block: FrameBlock, report: BlockReport, out: Polled) -> None:
        """End the waiting loss window at the block's first frame — or, after an outage, at
        its first frame captured after the outage was noticed: the last frames before the
        link went down sit in a block the kernel may retire only after that."""
        start = source.loss_from
        end = report.first_ts
        wall = source.down_wall if source.loss_reason == "interface_down" else None
        if start is None or end is None:
            return
        if wall is not None and end <= wall:
            times = block.times
            earlier = times[times <= wall]
            if len(earlier):
                start = max(start, float(earlier.max()))
            if report.last_ts is not None and report.last_ts <= wall:
                start = max(start, report.last_ts)
            later = times[times > wall]
            if not len(later):
                source.loss_from = start  # all from before the outage: still waiting
                return
            end = float(later.min())
        out.losses.append(
            LossWindow(source.interface, start, end, source.loss_reason, source.loss_frames or None)
        )
        source.loss_from = None
        source.loss_frames = 0
        source.down_wall = None

    def _read_stats(
        self,
        source: _Source,
        ring: RingSocket,
        before: float | None,
        losing_at: tuple[float | None, float] | None,
        out: Polled,
    ) -> None:
        try:
            stats = ring.stats()
        except OSError:
            return
        totals = self._totals
        totals.kernel_packets += stats.packets
        totals.kernel_dropped += stats.drops
        totals.kernel_freezes += stats.freezes
        if stats.drops:
            if not source.overrun_dropped:
                out.events.append(CaptureEvent("overrun_started", source.interface))
            source.overrun_dropped += stats.drops
            source.overrun_freezes += stats.freezes
            if losing_at is not None:
                start = losing_at[0] if losing_at[0] is not None else losing_at[1]
                out.losses.append(
                    LossWindow(source.interface, start, losing_at[1], "overrun", stats.drops)
                )
            else:
                # The kernel lost frames after the newest frame taken: the window ends at
                # the first frame it hands over next.
                since = source.last_ts if source.last_ts is not None else before
                if since is not None and source.loss_from is None:
                    source.loss_from = since
                    source.loss_reason = "overrun"
                source.loss_frames += stats.drops
        elif source.overrun_dropped and source.loss_from is None:
            out.events.append(
                CaptureEvent(
                    "overrun_ended",
                    source.interface,
                    dropped=source.overrun_dropped,
                    freezes=source.overrun_freezes,
                )
            )
            source.overrun_dropped = 0
            source.overrun_freezes = 0

    def _went_down(self, source: _Source, mono: float, out: Polled) -> None:
        source.down_since = source.last_ts if source.last_ts is not None else time.time()
        source.down_at = mono
        source.down_wall = time.time()
        source.next_check = mono + RECHECK_S
        out.events.append(CaptureEvent("interface_down", source.interface))

    def _check_down(self, source: _Source, mono: float, out: Polled) -> None:
        """An interface that went down (or a socket that could not be reopened): back yet?"""
        if mono < source.next_check:
            return
        source.next_check = mono + RECHECK_S
        name = source.interface
        up = interface_is_up(name)
        if not up:
            return
        ring = source.ring
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            return
        if ring is None or (ring.ifindex and ring.ifindex != index):
            # Re-created under the same name: the old socket is bound to an index that is gone.
            if ring is not None:
                ring.close()
                source.ring = None
            try:
                source.ring = self._open(name)
            except CaptureError as exc:
                source.next_check = mono + REOPEN_S
                out.events.append(CaptureEvent("interface_reopen_failed", name, detail=str(exc)))
                return
            out.events.append(CaptureEvent("interface_reopened", name))
        if source.down_since is not None:
            outage = mono - (source.down_at if source.down_at is not None else mono)
            out.events.append(CaptureEvent("interface_up", name, outage_s=round(outage, 3)))
            source.loss_from = source.down_since
            source.loss_reason = "interface_down"
            source.down_since = None
            source.down_at = None

    def stats(self) -> CaptureStats:
        t = self._totals
        return CaptureStats(
            frames=t.frames,
            kernel_packets=t.kernel_packets,
            kernel_dropped=t.kernel_dropped,
            kernel_freezes=t.kernel_freezes,
            truncated=t.truncated,
            corrupt_blocks=t.corrupt_blocks,
            blocks=t.blocks,
        )

    def close(self) -> None:
        for s in self._sources:
            if s.ring is not None:
                s.ring.close()
                s.ring = None
        self._sources.clear()

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sleep(timeout: float) -> list[tuple[RingSocket, int]]:
    time.sleep(max(0.0, min(timeout, RECHECK_S)))
    return []


__all__ = [
    "CaptureEvent",
    "CaptureStats",
    "LiveCapture",
    "LossWindow",
    "Polled",
    "RingSpec",
    "can_capture",
]
