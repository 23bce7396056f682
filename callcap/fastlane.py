"""The pipeline's fast lane: RTP of known flows, found and placed a block at a time.

Nearly every frame a recorder sees is RTP of a call it already follows.  The general path
(:meth:`Pipeline.feed`) decodes each frame through the link, IP and UDP layers, asks the
media router whose it is and pushes it to its stream: correct for anything, but a few
microseconds of Python per packet.  The fast lane gets the same result for the common case
with array operations over a whole :class:`~callcap.capture.block.FrameBlock`:

1. **Classify** — the IPv4/UDP header fields of every Ethernet frame of the block are read
   with one gather each; a frame whose addresses and ports are a *flow* (a 4-tuple the
   general path has already tied to a call's stream) is the flow's, every other frame goes
   to ``feed`` in capture order.  Flows are looked up with a sorted array of 64-bit hashes
   of their keys, then checked byte for byte, so a collision only ever costs speed.
2. **Queue** — frames of flows wait (as row numbers of their block) until anything could
   depend on them: a tick, a general-path packet of the same flow, a change of routes, the
   end of the input.  A flow whose routes change is drained first; the rest of the block
   then goes back to the general path for it.  A call that ends only closes its flows: what
   they queued is placed by the next full drain, and the pipeline publishes the call then.
3. **Place** — a flow whose queued frames are one clean run (plain RTP, one SSRC, payload
   type and size, consecutive sequence numbers) is placed with every other such flow by one
   :func:`~callcap.capture.stream.place_runs` call; the payloads of all of them are cut out
   of their blocks and decoded with one gather and one table lookup per codec.  Anything
   else — loss, reordering, DTMF events, a new SSRC, RTCP on the RTP port — goes through the
   per-frame lane below (:meth:`_drain_queues`), which splits runs at their breaks and hands
   odd frames back to ``feed``.

Only plain Ethernet/IPv4 frames take the lane; VLAN-tagged, cooked (SLL) or IPv6 captures
are recorded the same, through ``feed``, more slowly.

The lane never decides anything the general path would decide differently: a flow exists
only while the routes that made it stand, and every frame it is unsure of goes back.
``tests/test_fast_lane.py`` holds it to that, bit for bit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from callcap.capture.block import FrameBlock, values_at
from callcap.capture.ip import PROTO_UDP
from callcap.capture.stream import place_runs

if TYPE_CHECKING:
    from callcap.capture.decode import Datagram
    from callcap.pipeline import Pipeline
    from callcap.recorder import CallRecorder

LINKTYPE_ETHERNET: Final = 1

_ETH_TYPE_AT: Final = 12
_IP_AT: Final = 14  # Ethernet header, no VLAN tag
_KEY_AT: Final = 26  # IPv4 source, destination, then UDP source and destination ports
_RTP_PAYLOAD_AT: Final = 54  # 14 Ethernet + 20 IPv4 + 8 UDP + 12 RTP
# Header fields the lane reads of each queued frame: (name, frame offset, numpy type).
_FIELDS: Final = (
    ("ip_len", 16, ">u2"),  # IPv4 total length
    ("udp_len", 38, ">u2"),
    ("rtp", 42, ">u8"),  # RTP flags, marker/payload type, sequence number, timestamp
    ("ssrc", 50, ">u4"),
)

_MAX_RUN: Final = 512
"""Frames one flow queues before the lane is drained (bounds the memory of a capture whose
clock stalls, so that no tick comes, and keeps runs inside ``place_runs``' limit)."""

_MAX_PENDING: Final = 1 << 17
"""Frames all flows together queue before the lane is drained."""

_RECLASSIFY_AFTER: Final = 256
"""Frames after which a block is classified again when flows were learned meanwhile (the
frames of a new flow take the general path until then)."""

_RUN_ATTEMPTS: Final = 4
"""Rounds of run placement per drain in the per-frame lane: a run broken by loss or
reordering is split at the break and its rest tried again, up to this many times; then the
rest goes packet by packet."""

_HASH_MUL: Final = np.uint64(0x9E3779B97F4A7C15)

_RTP_FIXED = struct.Struct("!HII")  # sequence, timestamp, SSRC (RFC 3550 §5.1)

# A run of equal-length Ethernet/IPv4(20 bytes)/UDP/RTP(12 bytes) frames of one flow: the
# bytes that must not change along it (IP total length, UDP length, RTP version/flags, SSRC),
# the first frame's fields, and the sequence number and timestamp read in place.
_RUN_FIXED_BYTES = np.array([16, 17, 38, 39, 42, 50, 51, 52, 53])
_RUN_HEADER_FIRST = struct.Struct("!H20xHxxBBHII")  # from frame byte 16
_RUN_HEADER = np.dtype(
    {"names": ["seq", "ts"], "formats": [">u2", ">u4"], "offsets": [2, 4], "itemsize": 12}
)


class FastFlow:
    """A UDP flow the general path has tied to one call's RTP (``sender`` is its side)."""

    __slots__ = ("contexts", "dport", "dst", "key", "recorder", "sender", "slot", "sport", "src")

    def __init__(
        self, key: bytes, slot: int, recorder: CallRecorder, sender: str, dg: Datagram
    ) -> None:
        self.key = key
        self.slot = slot
        self.recorder = recorder
        self.sender = sender
        self.src = dg.src
        self.sport = dg.sport
        self.dst = dg.dst
        self.dport = dg.dport
        self.contexts: dict[int, Any] = {}  # SSRC → the recorder's stream context


@dataclass(slots=True)
class _Pending:
    """Rows of one block waiting in the lane, and the flow slot of each (-1 once taken).

    Rows come in as one piece per stretch between general-path frames and are joined into
    one array the first time the lane needs to look into them.
    """

    block: FrameBlock
    rows: list[npt.NDArray[np.int64]] = field(default_factory=list)
    slots: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def joined(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if len(self.rows) > 1:
            self.rows = [np.concatenate(self.rows)]
            self.slots = [np.concatenate(self.slots)]
        return self.rows[0], self.slots[0]


@dataclass(frozen=True, slots=True)
class _BlockKeys:
    """The frames of a block that could be fast-lane RTP (Ethernet, IPv4 with a 20-byte
    header, UDP, not a fragment, longer than the RTP header) and their flow keys: read once
    per block, matched against the flows as often as they change."""

    rows: npt.NDArray[np.int64]
    hi: npt.NDArray[np.uint64]
    lo: npt.NDArray[np.uint32]
    hashes: npt.NDArray[np.uint64]

    @classmethod
    def of(cls, block: FrameBlock) -> _BlockKeys:
        rows = np.flatnonzero(
            (block.linktypes == LINKTYPE_ETHERNET) & (block.lengths > _RTP_PAYLOAD_AT)
        )
        # Ethernet type IPv4 then version 4 with a 20-byte header; not a fragment, UDP
        ok = (block.field(rows, _ETH_TYPE_AT, ">u4") >> 8) == 0x080045
        flags_ttl_proto = block.field(rows, 20, ">u4")
        ok &= ((flags_ttl_proto >> 16) & 0x3FFF) == 0
        ok &= (flags_ttl_proto & 0xFF) == PROTO_UDP
        rows = rows[ok]
        hi = block.field(rows, _KEY_AT, "<u8")
        lo = block.field(rows, _KEY_AT + 8, "<u4")
        return cls(rows, hi, lo, _key_hash(hi, lo))


@dataclass(slots=True)
class _Run:
    """A queue of one flow, about to be placed as one run of one stream (per-frame lane)."""

    flow: FastFlow
    arrivals: list[float]
    frames: list[bytes]
    ctx: Any
    pt: int
    end: int  # payload end offset in each frame
    decoder: Any


def plain_rtp(b0: int, pt: int, end: int, ip_end: int, size: int) -> bool:
    """Does an Ethernet/IPv4/UDP frame of ``size`` bytes carry plain RTP the fast lane can
    take: version 2 with no padding, extension or CSRCs, a payload (the UDP length ``end``
    bounded by the IP length ``ip_end``, bounded by the frame), and no RTCP payload type
    (RFC 5761 multiplexing)?"""
    return b0 == 0x80 and _RTP_PAYLOAD_AT < end <= ip_end <= size and not 72 <= pt <= 76


def _break_of(run: _Run) -> int:
    """Index of the first frame of a turned-down run that does not continue the sequence
    (the stream's last packet, then each frame's predecessor); the whole run if none does."""
    expected = run.ctx.stream.next_seq
    for i, frame in enumerate(run.frames):
        seq = (frame[44] << 8) | frame[45]
        if seq != expected:
            return i
        expected = (seq + 1) & 0xFFFF
    return len(run.frames)


def _discard(index: dict[Any, set[bytes]], name: Any, key: bytes) -> None:
    """Take ``key`` out of ``index[name]``, and the entry out of the index once empty."""
    keys = index.get(name)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[name]


def _ranges(firsts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``firsts[i] .. firsts[i] + lengths[i] - 1`` for every ``i``, one after the other."""
    before = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=before[1:])
    return np.repeat(firsts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _key_hash(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint64]:
    """64-bit hash of a 12-byte flow key split in its first 8 and last 4 bytes."""
    return hi ^ (lo.astype(np.uint64) * _HASH_MUL)


class FastLane:
    """Flows, their queued frames, and the block loop (see the module docstring)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.flows: dict[bytes, FastFlow] = {}
        self._slots: list[FastFlow | None] = []
        self._free: list[int] = []
        # Slots of flows closed with frames still queued: freed by the next full drain.
        self._closing: list[int] = []
        # Slots taken out of the lookup during the block in progress (its frames of them
        # go back to the general path: their slot numbers may be given to new flows).
        self._removed: list[int] = []
        self._learned = False  # flows learned since the block in progress was matched
        self._at = 0  # the first frame of the block in progress not yet queued or fed
        self._by_recorder: dict[int, set[bytes]] = {}  # id(recorder) → its flows' keys
        self._by_endpoint: dict[tuple[bytes, int], set[bytes]] = {}  # (address, port) → keys
        self._queued = np.zeros(64, dtype=np.int64)  # frames queued per slot
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        # sorted key hashes, then the key halves and slot of each (None: rebuild)
        self._lookup: tuple[npt.NDArray[Any], ...] | None = None

    # -- flows ------------------------------------------------------------------------------

    def learn(self, key: bytes, recorder: CallRecorder, sender: str, dg: Datagram) -> FastFlow:
        """A packet of ``key`` just went to ``recorder`` as ``sender``'s RTP: its next ones
        may take the lane."""
        known = self.flows.get(key)
        if known is not None:
            return known
        slot = self._free.pop() if self._free else len(self._slots)
        flow = FastFlow(key, slot, recorder, sender, dg)
        if slot == len(self._slots):
            self._slots.append(flow)
            if slot >= len(self._queued):
                self._queued = np.concatenate([self._queued, np.zeros_like(self._queued)])
        else:
            self._slots[slot] = flow
        self.flows[key] = flow
        self._by_recorder.setdefault(id(recorder), set()).add(key)
        for endpoint in ((flow.src, flow.sport), (flow.dst, flow.dport)):
            self._by_endpoint.setdefault(endpoint, set()).add(key)
        self._lookup = None
        self._learned = True
        return flow

    def forget_routes(self, recorder: CallRecorder, endpoints: set[tuple[bytes, int]]) -> None:
        """Routes changed: forget, after placing what they hold, the flows of ``recorder``
        and every flow from or to one of ``endpoints`` (packed address, port)."""
        keys = set(self._by_recorder.get(id(recorder), ()))
        for endpoint in endpoints:
            keys |= self._by_endpoint.get(endpoint, set())
        self._forget([self.flows[key] for key in keys if key in self.flows])

    def _unindex(self, flow: FastFlow) -> None:
        """Take a flow out of the dictionaries (its slot is the caller's business)."""
        del self.flows[flow.key]
        _discard(self._by_recorder, id(flow.recorder), flow.key)
        _discard(self._by_endpoint, (flow.src, flow.sport), flow.key)
        _discard(self._by_endpoint, (flow.dst, flow.dport), flow.key)
        self._removed.append(flow.slot)
        self._lookup = None

    def close_recorder(self, recorder: CallRecorder) -> bool:
        """A call ended: no frame takes the lane to it any more.  What its flows already
        queued stays queued, placed by the next full drain (a call ending costs no drain of
        its own); True if there is any, so the caller finishes the call after that drain."""
        waiting = False
        for key in list(self._by_recorder.get(id(recorder), ())):
            flow = self.flows[key]
            self._unindex(flow)
            if self._queued[flow.slot]:
                self._closing.append(flow.slot)
                waiting = True
            else:
                self._slots[flow.slot] = None
                self._free.append(flow.slot)
        return waiting

    def drain_recorder(self, recorder: CallRecorder) -> None:
        """Place what a call's flows hold (its media is about to change)."""
        keys = self._by_recorder.get(id(recorder), ())
        slots = {self.flows[key].slot for key in keys if key in self.flows}
        if slots and self._queued[list(slots)].any():
            self._drain(slots)

    def _forget(self, flows: list[FastFlow]) -> None:
        if not flows:
            return
        self._drain({flow.slot for flow in flows})
        for flow in flows:
            self._unindex(flow)
            self._slots[flow.slot] = None
            self._free.append(flow.slot)

    def _table(self) -> tuple[npt.NDArray[Any], ...] | None:
        if self._lookup is None and self.flows:
            # the keys read as the block keys are (_BlockKeys.of): 8 bytes, then 4
            joined = b"".join(self.flows)
            at = np.arange(0, len(joined), 12, dtype=np.int64)
            hi = values_at(joined, at, "<u8")
            lo = values_at(joined, at + 8, "<u4")
            hashes = _key_hash(hi, lo)
            order = np.argsort(hashes)
            slots = np.array([flow.slot for flow in self.flows.values()], dtype=np.int64)
            self._lookup = (hashes[order], hi[order], lo[order], slots[order])
        return self._lookup

    # -- the block loop ---------------------------------------------------------------------

    def run_block(self, block: FrameBlock) -> None:
        """Every frame of ``block``, in order: flows' frames queued, the rest to ``feed``.

        A bug met in the lane costs a counted ``internal_error`` and the lane for the rest of
        the block, whose frames then all go through ``feed``: never a crash.
        """
        n = len(block)
        self._at = 0
        try:
            self._run_block(block, n)
        except Exception as exc:  # noqa: BLE001 - isolate: the general path takes over
            p = self.p
            first = self._at
            p.internal_error(float(block.times[min(first, n - 1)]), exc)
            for i in range(first, n):
                p.feed(float(block.times[i]), int(block.linktypes[i]), block.frame(i))

    def _run_block(self, block: FrameBlock, n: int) -> None:
        """:meth:`run_block`; ``_at`` is always the first frame not yet queued or fed."""
        if not n:
            return
        p = self.p
        times = block.times
        linktypes = block.linktypes
        reach = np.maximum.accumulate(times)  # the capture clock after each frame
        keys = _BlockKeys.of(block)
        self._removed = []
        removed = 0
        next_tick = p.next_tick
        base = 0
        slots = self._match(keys, n, 0)
        general = np.flatnonzero((slots < 0) | (times >= next_tick)).tolist()
        gi = 0
        pos = 0
        while pos < n:
            g = base + general[gi] if gi < len(general) else n
            if g > pos:
                self._queue(block, pos, g, slots[pos - base : g - base])
                self._at = g
                if reach[g - 1] > p.now:
                    p.now = float(reach[g - 1])
            if g >= n:
                break
            p.feed(float(times[g]), int(linktypes[g]), block.frame(g))
            pos = self._at = g + 1
            gi += 1
            if self._learned and pos - base >= _RECLASSIFY_AFTER:
                # Flows learned a while ago: match the rest again (forgotten ones too).
                slots = self._match(keys, n, pos)
            elif len(self._removed) != removed:
                # Flows forgotten: the rest of their frames go back to the general path, a
                # must before their slot numbers are given to new flows.
                slots = slots[pos - base :]
                slots[np.isin(slots, self._removed[removed:])] = -1
            elif p.next_tick != next_tick:
                slots = slots[pos - base :]  # a tick passed: later frames may take the lane
            else:
                continue
            removed = len(self._removed)
            next_tick = p.next_tick
            base = pos
            general = np.flatnonzero((slots < 0) | (times[pos:] >= next_tick)).tolist()
            gi = 0

    def _match(self, keys: _BlockKeys, n: int, first: int) -> npt.NDArray[np.int64]:
        """The flow slot of every frame of an ``n``-frame block from ``first`` on, -1 for
        the general path."""
        slots = np.full(n - first, -1, dtype=np.int64)
        self._learned = False
        table = self._table()
        if table is None:
            return slots
        i = int(np.searchsorted(keys.rows, first))
        if i >= len(keys.rows):
            return slots
        hashes, hi, lo = keys.hashes[i:], keys.hi[i:], keys.lo[i:]
        sorted_hashes, sorted_hi, sorted_lo, sorted_slots = table
        at = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
        ok = (sorted_hashes[at] == hashes) & (sorted_hi[at] == hi) & (sorted_lo[at] == lo)
        slots[keys.rows[i:][ok] - first] = sorted_slots[at[ok]]
        return slots

    def _queue(self, block: FrameBlock, lo: int, hi: int, slots: npt.NDArray[np.int64]) -> None:
        """Queue frames ``lo`` to ``hi`` of ``block`` (all of flows): everything that can
        fail is computed before anything is queued."""
        p = self.p
        counts = np.bincount(slots, minlength=len(self._queued))
        size = int(block.lengths[lo:hi].sum())
        rows = np.arange(lo, hi, dtype=np.int64)
        if not self._pending or self._pending[-1].block is not block:
            self._pending.append(_Pending(block))
        pending = self._pending[-1]
        pending.rows.append(rows)
        pending.slots.append(slots)
        self._pending_rows += hi - lo
        self._queued += counts
        p.frames += hi - lo
        p.bytes += size
        if self._pending_rows >= _MAX_PENDING or int(self._queued.max()) >= _MAX_RUN:
            self.drain_all()

    # -- draining ---------------------------------------------------------------------------

    def drain_all(self) -> None:
        """Place every queued frame."""
        if self._pending_rows:
            self._drain(None)

    def drain(self, flow: FastFlow) -> None:
        """Place the frames ``flow`` has queued (before one of its packets takes the general
        path, or its routes change)."""
        if self._queued[flow.slot]:
            self._drain({flow.slot})

    def _drain(self, wanted: set[int] | None) -> None:
        """Take the queued frames of ``wanted`` slots (all if None) out of the queue, then
        place them: clean runs together, the rest frame by frame."""
        parts: list[tuple[FrameBlock, npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        if wanted is None:
            for pending in self._pending:
                rows, slots = pending.joined()
                keep = slots >= 0
                parts.append((pending.block, rows[keep], slots[keep]))
            self._pending = []
            self._pending_rows = 0
            self._queued[:] = 0
            closing, self._closing = self._closing, []
        else:
            closing = []
            for pending in self._pending:
                rows, slots = pending.joined()
                hit = np.zeros(len(slots), dtype=np.bool_)
                for slot in wanted:
                    hit |= slots == slot
                at = np.flatnonzero(hit)
                if len(at):
                    parts.append((pending.block, rows[at], slots[at]))
                    slots[at] = -1
                    self._pending_rows -= len(at)
            self._queued[list(wanted)] = 0
            if not self._pending_rows:
                self._pending = []
        parts = [part for part in parts if len(part[1])]
        try:
            if parts:
                self._place(parts)
        except Exception as exc:  # noqa: BLE001 - a bug costs these frames, not the process
            self.p.internal_error(self.p.now, exc)
        finally:
            for slot in closing:  # closed flows: their last frames are placed
                self._slots[slot] = None
                self._free.append(slot)

    def _place(
        self, parts: list[tuple[FrameBlock, npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    ) -> None:
        """Place frames taken from the queue: ``(block, rows, slots)`` in capture order."""
        part_of = np.concatenate(
            [np.full(len(rows), i, dtype=np.int64) for i, (_b, rows, _s) in enumerate(parts)]
        )
        rows = np.concatenate([rows for _b, rows, _s in parts])
        slots = np.concatenate([slots for _b, _r, slots in parts])
        order = np.argsort(slots, kind="stable")  # by flow, each in capture order
        rows, slots, part_of = rows[order], slots[order], part_of[order]
        m = len(rows)
        # the header fields of every frame, one gather each (frames are longer than 54 bytes)
        fields = {name: np.empty(m, dtype=np.uint64) for name, _at, _type in _FIELDS}
        arrivals = np.empty(m, dtype=np.float64)
        sizes = np.empty(m, dtype=np.int64)
        for i, (block, _r, _s) in enumerate(parts):
            at = np.flatnonzero(part_of == i) if len(parts) > 1 else slice(None)
            mine = rows[at]
            for name, offset, kind in _FIELDS:
                fields[name][at] = block.field(mine, offset, kind)
            arrivals[at] = block.times[mine]
            sizes[at] = block.lengths[mine]
        ip_end = _IP_AT + fields["ip_len"].astype(np.int64)
        end = _IP_AT + 20 + fields["udp_len"].astype(np.int64)
        rtp = fields["rtp"]
        b0 = (rtp >> np.uint64(56)).astype(np.int64)
        pt = ((rtp >> np.uint64(48)) & np.uint64(0x7F)).astype(np.int64)
        seq = ((rtp >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64)
        rts = (rtp & np.uint64(0xFFFFFFFF)).astype(np.int64)
        ssrc = fields["ssrc"].astype(np.int64)
        plain = (b0 == 0x80) & (end > _RTP_PAYLOAD_AT) & (end <= ip_end) & (ip_end <= sizes)
        plain &= (pt < 72) | (pt > 76)

        # one entry per flow: where its rows start, how many
        firsts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        counts = np.diff(np.r_[firsts, m])
        flow_of = np.repeat(np.arange(len(firsts)), counts)
        lead = firsts[flow_of]
        odd = ~plain | (ssrc != ssrc[lead]) | (pt != pt[lead]) | (end != end[lead])
        odd |= sizes != sizes[lead]
        odd[1:] |= (((seq[1:] - seq[:-1]) & 0xFFFF) != 1) & (flow_of[1:] == flow_of[:-1])
        clean = (np.bincount(flow_of[odd], minlength=len(firsts)) == 0) & (counts <= _MAX_RUN)

        runs: list[tuple[FastFlow, Any, Any, int, int]] = []  # flow, ctx, decoder, first, n
        rest: list[tuple[int, int, int]] = []  # (first row, n, flow index) frame by frame
        for f, (first, n, ok) in enumerate(
            zip(firsts.tolist(), counts.tolist(), clean.tolist(), strict=True)
        ):
            flow = self._slots[int(slots[first])]
            assert flow is not None
            if ok:
                ctx = flow.contexts.get(int(ssrc[first]))
                decoder = None if ctx is None else flow.recorder.audio_decoder(ctx, int(pt[first]))
                if decoder is not None:
                    runs.append((flow, ctx, decoder, first, n))
                    continue
            rest.append((first, n, f))
        if runs:
            rest.extend(self._place_clean(parts, runs, rows, part_of, arrivals, seq, rts, pt, end))
        if rest:
            # frame by frame, flows in the order of their first frame (as ``feed`` meets them)
            rest.sort(key=lambda item: int(order[item[0]]))
            queues = []
            for first, n, _f in rest:
                flow = self._slots[int(slots[first])]
                assert flow is not None
                frames = [
                    parts[i][0].frame(r)
                    for i, r in zip(
                        part_of[first : first + n].tolist(),
                        rows[first : first + n].tolist(),
                        strict=True,
                    )
                ]
                queues.append((flow, arrivals[first : first + n].tolist(), frames))
            self._drain_queues(queues)

    def _place_clean(
        self,
        parts: list[tuple[FrameBlock, npt.NDArray[np.int64], npt.NDArray[np.int64]]],
        runs: list[tuple[FastFlow, Any, Any, int, int]],
        rows: npt.NDArray[np.int64],
        part_of: npt.NDArray[np.int64],
        arrivals: npt.NDArray[np.float64],
        seq: npt.NDArray[np.int64],
        rts: npt.NDArray[np.int64],
        pt: npt.NDArray[np.int64],
        end: npt.NDArray[np.int64],
    ) -> list[tuple[int, int, int]]:
        """Place clean runs with one ``place_runs``; the runs it turned down come back."""
        p = self.p
        firsts = np.array([first for *_x, first, _n in runs], dtype=np.int64)
        lengths = np.array([n for *_x, n in runs], dtype=np.int64)
        starts = np.zeros(len(runs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        take = _ranges(firsts, lengths)
        psizes = (end[firsts] - _RTP_PAYLOAD_AT).tolist()
        placed = place_runs(
            [ctx.stream for _f, ctx, *_x in runs],
            starts,
            arrivals[take],
            seq[take].astype(np.uint16),
            rts[take].astype(np.uint32),
            pt[firsts].tolist(),
            psizes,
            np.ones(len(runs), dtype=np.bool_),
        )
        # The placed runs' payloads, cut out of their blocks and decoded: one gather and one
        # table lookup per payload size and codec, for every call at once.
        groups: dict[tuple[int, Any], list[int]] = {}
        for r, ((_f, _c, decoder, _first, _n), size, pos) in enumerate(
            zip(runs, psizes, placed, strict=True)
        ):
            if pos is not None:
                groups.setdefault((size, decoder), []).append(r)
        decoded: dict[int, tuple[npt.NDArray[np.int16], int]] = {}  # run → (samples, offset)
        for (size, decoder), members in groups.items():
            mine = _ranges(
                np.array([runs[r][3] for r in members], dtype=np.int64),
                np.array([runs[r][4] for r in members], dtype=np.int64),
            )
            data = np.empty((len(mine), size), dtype=np.uint8)
            sub_parts = part_of[mine]
            for i, (block, _r, _s) in enumerate(parts):
                at = np.flatnonzero(sub_parts == i) if len(parts) > 1 else slice(None)
                data[at] = block.window(rows[mine[at]], _RTP_PAYLOAD_AT, size)
            pcm = decoder(data.reshape(-1))
            offset = 0
            for r in members:
                decoded[r] = (pcm, offset)
                offset += runs[r][4] * size
        # which placed runs are back to back on the timeline (one step of their size each)
        kept = [pos for pos in placed if pos is not None]
        steps_ok: list[bool] = []
        if kept:
            together = np.concatenate(kept)
            sizes = np.repeat(
                [s for s, pos in zip(psizes, placed, strict=True) if pos is not None],
                [len(k) for k in kept],
            )
            bad = np.zeros(len(together), dtype=np.int64)
            bad[1:] = (together[1:] - together[:-1]) != sizes[:-1]
            bounds = np.cumsum([0] + [len(k) for k in kept])
            bad[bounds[:-1]] = 0  # a run's first packet has no step before it
            steps_ok = (np.add.reduceat(bad, bounds[:-1]) == 0).tolist()
        contiguous = iter(steps_ok)
        rejected: list[tuple[int, int, int]] = []
        for r, ((flow, ctx, _decoder, first, n), size, positions) in enumerate(
            zip(runs, psizes, placed, strict=True)
        ):
            if positions is None:
                rejected.append((first, n, -1))
                continue
            p.rtp_packets += n
            p.counters["rtp_placed_in_runs"] += n
            pcm, offset = decoded[r]
            last = float(arrivals[first + n - 1])
            try:
                flow.recorder.queue_run(
                    ctx,
                    positions,
                    pcm[offset : offset + n * size],
                    size,
                    last,
                    next(contiguous),
                )
            except Exception as exc:  # noqa: BLE001 - one call's bug stays in that call
                p.internal_error(last, exc)
        return rejected

    # -- the per-frame lane -------------------------------------------------------------------

    def _drain_queues(self, queues: list[tuple[FastFlow, list[float], list[bytes]]]) -> None:
        """Frames of flows that were not one clean run: flows whose queue is a run of one
        stream (equal-size plain RTP frames, one SSRC and payload type, audio of an anchored
        stream) are split at their breaks and placed by :func:`place_runs` a piece at a
        time; every other frame, and every piece turned down, goes packet by packet."""
        groups: dict[tuple[int, int], list[_Run]] = {}
        single: list[tuple[FastFlow, list[float], list[bytes]]] = []
        for flow, arrivals, frames in queues:
            run = self._run_of(flow, arrivals, frames)
            if run is None:
                single.append((flow, arrivals, frames))
            else:
                groups.setdefault((len(frames[0]), run.end), []).append(run)
        for flow, arrivals, frames in single:
            for ts, frame in zip(arrivals, frames, strict=True):
                self._fast_frame(flow, ts, frame)
        for attempt in range(_RUN_ATTEMPTS):
            retry: dict[tuple[int, int], list[_Run]] = {}
            for (size, end), runs in groups.items():
                try:
                    rejected = self._place_group(size, end, runs)
                except Exception as exc:  # noqa: BLE001 - isolate, then go packet by packet
                    self.p.internal_error(runs[0].arrivals[-1], exc)
                    rejected = runs
                for run in rejected:
                    # Up to the first packet that does not continue the sequence (loss,
                    # reordering, a duplicate) packet by packet; the rest is tried again.
                    cut = len(run.frames) if attempt == _RUN_ATTEMPTS - 1 else _break_of(run)
                    for ts, frame in zip(
                        run.arrivals[: cut + 1], run.frames[: cut + 1], strict=False
                    ):
                        self._fast_frame(run.flow, ts, frame)
                    if cut + 2 < len(run.frames):
                        rest = _Run(
                            run.flow,
                            run.arrivals[cut + 1 :],
                            run.frames[cut + 1 :],
                            run.ctx,
                            run.pt,
                            run.end,
                            run.decoder,
                        )
                        retry.setdefault((size, end), []).append(rest)
                    else:
                        for ts, frame in zip(
                            run.arrivals[cut + 1 :], run.frames[cut + 1 :], strict=True
                        ):
                            self._fast_frame(run.flow, ts, frame)
            if not retry:
                break
            groups = retry

    def _run_of(self, flow: FastFlow, arrivals: list[float], frames: list[bytes]) -> _Run | None:
        """What a flow's queue would be as one run, judged on its first frame; None if it
        cannot be one (the rest is checked over the whole group in ``_place_group``)."""
        size = len(frames[0])
        if size <= _RTP_PAYLOAD_AT or len(set(map(len, frames))) != 1:
            return None
        ip_len, udp_len, b0, b1, _seq, _ts, ssrc = _RUN_HEADER_FIRST.unpack_from(frames[0], 16)
        end = 34 + udp_len
        pt = b1 & 0x7F
        if not plain_rtp(b0, pt, end, 14 + ip_len, size):
            return None  # not plain RTP (RTCP-mux, CSRCs, padding…): the general path decides
        ctx = flow.contexts.get(ssrc)
        if ctx is None:
            return None  # a new stream starts packet by packet
        decoder = flow.recorder.audio_decoder(ctx, pt)
        if decoder is None:
            return None
        return _Run(flow, arrivals, frames, ctx, pt, end, decoder)

    def _place_group(self, size: int, end: int, runs: list[_Run]) -> list[_Run]:
        """Place runs of ``size``-byte frames with payload up to ``end``; the runs turned down."""
        p = self.p
        frames = [frame for run in runs for frame in run.frames]
        arrivals = np.array([ts for run in runs for ts in run.arrivals], dtype=np.float64)
        lengths = np.array([len(run.frames) for run in runs], dtype=np.int64)
        starts = np.zeros(len(runs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        data = b"".join(frames)
        rows = np.frombuffer(data, dtype=np.uint8).reshape(len(frames), size)
        sid = np.repeat(np.arange(len(runs)), lengths)
        # IP and UDP lengths, RTP flags and SSRC as in the run's first frame; one payload type
        fixed = rows[:, _RUN_FIXED_BYTES]
        odd = (fixed != fixed[starts][sid]).any(axis=1)
        odd |= (rows[:, 43] & 0x7F) != np.array([run.pt for run in runs], dtype=np.uint8)[sid]
        usable = np.bincount(sid[odd], minlength=len(runs)) == 0
        hdr = np.ndarray((len(frames),), dtype=_RUN_HEADER, buffer=data, offset=42, strides=(size,))
        psize = end - _RTP_PAYLOAD_AT
        placed = place_runs(
            [run.ctx.stream for run in runs],
            starts,
            arrivals,
            hdr["seq"].astype(np.uint16),
            hdr["ts"].astype(np.uint32),
            [run.pt for run in runs],
            [psize] * len(runs),
            usable,
        )
        payload = rows[:, _RTP_PAYLOAD_AT:end].tobytes()
        rejected: list[_Run] = []
        for run, positions, first in zip(runs, placed, starts.tolist(), strict=True):
            if positions is None:
                rejected.append(run)
                continue
            n = len(run.frames)
            p.rtp_packets += n
            p.counters["rtp_placed_in_runs"] += n
            try:
                run.flow.recorder.queue_run(
                    run.ctx,
                    positions,
                    run.decoder(payload[first * psize : (first + n) * psize]),
                    psize,
                    run.arrivals[-1],
                )
            except Exception as exc:  # noqa: BLE001 - one call's bug stays in that call
                p.internal_error(run.arrivals[-1], exc)
        return rejected

    def _fast_frame(self, flow: FastFlow, ts: float, frame: bytes) -> None:
        """One queued frame: straight to its stream if it is plain RTP, else the general path."""
        p = self.p
        # the UDP length bounds the payload; the IP length bounds the UDP length
        end = 34 + ((frame[38] << 8) | frame[39])
        ip_end = 14 + ((frame[16] << 8) | frame[17])
        b0 = frame[42] if len(frame) > _RTP_PAYLOAD_AT else 0
        b1 = frame[43] if b0 else 0
        if not plain_rtp(b0, b1 & 0x7F, end, ip_end, len(frame)):
            p.frames -= 1
            p.bytes -= len(frame)
            p.feed(ts, LINKTYPE_ETHERNET, frame)  # counts the frame again
            return
        seq, rts, ssrc = _RTP_FIXED.unpack_from(frame, 44)
        ctx = flow.contexts.get(ssrc)
        rec = flow.recorder
        try:
            if ctx is None:
                ctx = flow.contexts[ssrc] = rec.stream_for(
                    flow.sender, flow.src, flow.sport, flow.dst, flow.dport, ssrc, ts
                )
            p.rtp_packets += 1
            rec.push(ctx, ts, b1 & 0x7F, seq, rts, frame[_RTP_PAYLOAD_AT:end])
        except Exception as exc:  # noqa: BLE001 - as in feed: isolate one packet
            p.internal_error(ts, exc)
