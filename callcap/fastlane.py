"""The pipeline's fast lane: RTP of known flows, found and placed a block at a time.

Nearly every frame a recorder sees is RTP of a call it already follows.  The general path
(``feed``) decodes each frame through the link, IP and UDP layers, asks the media router
whose it is and pushes it to its stream: correct for anything, but a few microseconds of
Python per packet.  The fast lane gets the same result for the common case with array
operations over a whole :class:`~callcap.capture.block.FrameBlock`:

1. **Classify** — for every frame of the block, the link header (Ethernet with up to two
   VLAN tags, Linux cooked SLL and SLL2, raw IP) and the IPv4 or IPv6 header are read with a
   few gathers each; a frame whose addresses and ports are a *flow* (a 5-tuple the general
   path has already tied to a call's stream) is the flow's, every other frame goes to
   ``feed`` in capture order.  Flows are looked up with a sorted array of 64-bit hashes of
   their keys, then checked word for word, so a collision only ever costs speed.  A flow of
   a call another worker records (:mod:`callcap.workers`) is dropped right there, counted.
2. **Queue** — frames of flows wait (as row numbers of their block) until anything could
   depend on them: a tick, a general-path packet of the same flow, a change of routes, the
   end of the input.  A flow whose routes change is drained first; the rest of the block
   then goes back to the general path for it.  A call that ends only closes its flows: what
   they queued is placed by the next full drain, and the pipeline publishes the call then.
3. **Place** — each flow's queued frames are cut into *runs* (plain RTP, one SSRC, payload
   type and size, consecutive sequence numbers); the next run of every flow is placed with
   one :func:`~callcap.capture.stream.place_runs` call, and the payloads of all of them are
   cut out of their blocks and decoded with one gather and one table lookup per codec.  A
   run ``place_runs`` turns down (the stream is new, or the run re-anchors it) gives its
   first packet to the stream one by one and the rest is tried again in the next round;
   frames that are not plain RTP (RTCP multiplexed on the port, CSRCs, padding) go back to
   ``feed``, and DTMF events and other payloads to the stream packet by packet.  There is
   one way to place a run; the per-packet path is the slow, simple twin for what runs
   cannot take.

The lane never decides anything the general path would decide differently: a flow exists
only while the routes that made it stand, and every frame it is unsure of goes back.
``tests/test_fast_lane.py`` holds it to that, bit for bit.
"""

from __future__ import annotations

import builtins
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from callcap.capture.block import FrameBlock, values_at
from callcap.capture.ip import PROTO_UDP
from callcap.capture.link import (
    DLT_EN10MB,
    DLT_LINUX_SLL,
    DLT_LINUX_SLL2,
    DLT_RAW,
    DLT_RAW_12,
    DLT_RAW_14,
    ETH_IPV4,
    ETH_IPV6,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    VLAN_TAGS,
)
from callcap.capture.stream import place_runs
from callcap.codecs.g711 import CODE_PER_SAMPLE

if TYPE_CHECKING:
    from callcap.recorder import CallRecorder

_UDP_HEADER: Final = 8
_RTP_HEADER: Final = 12
_PAYLOAD_AT: Final = _UDP_HEADER + _RTP_HEADER  # from the UDP header
_VXLAN_PORT: Final = 4789  # the general path may open it as a tunnel
_MIN_TAIL: Final = _PAYLOAD_AT + 1  # UDP, RTP header and at least one payload byte

_MAX_RUN: Final = 512
"""Frames one flow queues before the lane is drained (bounds the memory of a capture whose
clock stalls, so that no tick comes, and keeps runs inside ``place_runs``' limit)."""

_MAX_PENDING: Final = 1 << 16
"""Frames all flows together queue before the lane is drained (about a third of a second at
2,000 calls: the blocks they are in stay in memory until then)."""

_PLACE_FRAMES: Final = 1 << 13
"""Frames placed at once (whole flows; see :meth:`_Frames.groups`): a drain of the whole
lane at 2,000 calls holds up to ``_MAX_PENDING``, and placing them all at once would make
its arrays (payloads, audio, index temporaries) tens of MiB that glibc then keeps."""

_RECLASSIFY_AFTER: Final = 256
"""Frames after which a block is classified again when flows were learned meanwhile (the
frames of a new flow take the general path until then)."""

_ROUNDS: Final = 48
"""Rounds of run placement per drain: a run turned down gives one packet to the per-packet
path and its rest is tried again, up to this many times; then the rest goes packet by
packet."""

_FOREIGN: Final = -3
"""A frame whose flow is a call another worker records is matched to ``_FOREIGN - slot``
(so that a forgotten flow's frames can still be told apart): counted, not decoded."""

_H1: Final = np.uint64(0x9E3779B97F4A7C15)
_H2: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_H3: Final = np.uint64(0x165667B19E3779F9)
_H4: Final = np.uint64(0x27D4EB2F165667C5)


class LaneHost(Protocol):
    """What the lane needs of the pipeline it serves (it never imports the pipeline)."""

    now: float
    frames: int
    bytes: int
    rtp_packets: int
    counters: Counter[str]

    @property
    def next_tick(self) -> float: ...

    def feed(self, ts: float, linktype: int, frame: builtins.bytes) -> None: ...

    def internal_error(self, ts: float, exc: Exception) -> None: ...


def flow_key(src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """A UDP flow's key: packed addresses then ports, as they lie in the IP and UDP headers
    (IPv4 12 bytes, IPv6 36)."""
    return src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


def _key_words(key: bytes) -> tuple[int, int, int, int, int, bool]:
    """A flow key as the lane reads keys out of frames: the address bytes as up to four
    little-endian 64-bit words, the ports as one 32-bit word, and the family."""
    v6 = len(key) == 36
    n = 32 if v6 else 8
    words = [int.from_bytes(key[i : i + 8], "little") for i in range(0, n, 8)]
    words += [0] * (4 - len(words))
    return words[0], words[1], words[2], words[3], int.from_bytes(key[n : n + 4], "little"), v6


def _hash(
    a0: npt.NDArray[np.uint64],
    a1: npt.NDArray[np.uint64],
    a2: npt.NDArray[np.uint64],
    a3: npt.NDArray[np.uint64],
    ports: npt.NDArray[np.uint32],
    v6: npt.NDArray[np.bool_],
) -> npt.NDArray[np.uint64]:
    h = a0 ^ (ports.astype(np.uint64) * _H1)
    h ^= a1 * _H2
    h ^= a2 * _H3
    h ^= a3 * _H4
    h ^= v6.astype(np.uint64)
    return h


def _hash_one(words: tuple[int, int, int, int, int, bool]) -> int:
    """:func:`_hash` of one flow's key words (uint64 arithmetic, wrapping)."""
    a0, a1, a2, a3, ports, v6 = words
    mask = (1 << 64) - 1
    h = a0 ^ ((ports * int(_H1)) & mask)
    h ^= (a1 * int(_H2)) & mask
    h ^= (a2 * int(_H3)) & mask
    h ^= (a3 * int(_H4)) & mask
    return h ^ int(v6)


class FastFlow:
    """A UDP flow the general path has tied to one call's RTP (``sender`` is its side);
    ``recorder`` is None for a call another worker records."""

    __slots__ = (
        "call_id",
        "contexts",
        "dport",
        "dst",
        "key",
        "recorder",
        "sender",
        "slot",
        "sport",
        "src",
        "words",
    )

    def __init__(
        self,
        key: bytes,
        slot: int,
        call_id: str,
        recorder: CallRecorder | None,
        sender: str,
        endpoints: tuple[bytes, int, bytes, int],
    ) -> None:
        self.key = key
        self.slot = slot
        self.call_id = call_id
        self.recorder = recorder
        self.sender = sender
        self.src, self.sport, self.dst, self.dport = endpoints
        self.words = _key_words(key)
        self.contexts: dict[int, Any] = {}  # SSRC → the recorder's stream context


@dataclass(frozen=True, slots=True)
class _BlockKeys:
    """The frames of a block that could be fast-lane RTP — a link header the lane knows,
    IPv4 without options or IPv6 without extension headers, not a fragment, UDP, longer
    than the RTP header — with where their UDP header starts, where their IP payload ends,
    and their flow keys: read once per block, matched against the flows as often as they
    change."""

    rows: npt.NDArray[np.int64]
    l4: npt.NDArray[np.int64]  # offset of the UDP header in the frame
    ip_end: npt.NDArray[np.int64]  # offset of the end of the IP packet in the frame
    v6: npt.NDArray[np.bool_]
    words: tuple[npt.NDArray[np.uint64], ...]  # a0..a3 (address bytes), then the ports word
    hashes: npt.NDArray[np.uint64]

    @classmethod
    def of(cls, block: FrameBlock) -> _BlockKeys:
        lengths = block.lengths
        linktypes = block.linktypes
        rows = np.flatnonzero(lengths >= _MIN_TAIL + 20)
        lt = linktypes[rows]
        l3 = np.full(len(rows), -1, dtype=np.int64)
        etype = np.zeros(len(rows), dtype=np.int64)
        # Ethernet, then up to two VLAN tags (802.1Q, QinQ)
        eth = np.flatnonzero(lt == DLT_EN10MB)
        if len(eth):
            et = block.field(rows[eth], 12, ">u2").astype(np.int64)
            off = np.full(len(eth), 14, dtype=np.int64)
            for _tag in range(2):
                tagged = np.isin(et, _VLAN_LIST)
                if not tagged.any():
                    break
                at = np.flatnonzero(tagged)
                et[at] = values_at(
                    block.data, block.starts[rows[eth[at]]] + off[at] + 2, ">u2"
                ).astype(np.int64)
                off[at] += 4
            et[np.isin(et, _VLAN_LIST)] = 0  # three tags or more: the general path
            etype[eth] = et
            l3[eth] = off
        for kind, proto_at, header in ((DLT_LINUX_SLL, 14, 16), (DLT_LINUX_SLL2, 0, 20)):
            sll = np.flatnonzero(lt == kind)
            if len(sll):
                etype[sll] = block.field(rows[sll], proto_at, ">u2")
                l3[sll] = header
        raw = np.flatnonzero(np.isin(lt, _RAW_LIST))
        if len(raw):
            version = block.field(rows[raw], 0, "u1") >> 4
            # LINKTYPE_IPV4 / LINKTYPE_IPV6 fix the version: a packet of the other one is
            # malformed there (the general path drops it), not a packet of the other family
            version[(lt[raw] == LINKTYPE_IPV4) & (version != 4)] = 0
            version[(lt[raw] == LINKTYPE_IPV6) & (version != 6)] = 0
            etype[raw] = np.where(version == 4, ETH_IPV4, np.where(version == 6, ETH_IPV6, 0))
            l3[raw] = 0
        ip4 = etype == ETH_IPV4
        ip6 = etype == ETH_IPV6
        data = block.data
        start = block.starts[rows] + l3
        # one gather of the IP header window per frame (it must lie inside the buffer; a
        # frame shorter than the window only has its own bytes believed, below)
        keep = np.flatnonzero((ip4 | ip6) & (start + _NET.itemsize <= len(data)))
        rows, l3, v6, start = rows[keep], l3[keep], ip6[keep], start[keep]
        size = lengths[rows] - l3
        net = values_at(data, start, _NET)
        head = net["head"]
        word2 = net["word2"]
        # IPv4: version 4 and a 20-byte header, not a fragment, UDP; IPv6: next header UDP
        v4_ok = ((head >> 24) == 0x45) & ((word2 & 0x3FFF) == 0) & (size >= 20 + _MIN_TAIL)
        v4_ok &= net["proto"] == PROTO_UDP
        v6_ok = ((head >> 28) == 6) & (((word2 >> 8) & 0xFF) == PROTO_UDP)
        v6_ok &= (word2 >> 16) > 0
        v6_ok &= size >= 40 + _MIN_TAIL
        total = np.where(v6, 40 + (word2 >> 16), head & 0xFFFF).astype(np.int64)
        ok = np.where(v6, v6_ok, v4_ok) & (total <= size)
        ok &= np.where(v6, net["dport6"], net["dport4"]) != _VXLAN_PORT
        keep = np.flatnonzero(ok)
        rows, l3, v6, total = rows[keep], l3[keep], v6[keep], total[keep]
        net = net.view(_NET_ITEM)[keep].view(_NET)  # records by the memcpy (block.values_at)
        # The key: IPv4 source and destination (8 bytes at 12) and ports, or IPv6's (32 at 8)
        if v6.any():
            zero = np.uint64(0)
            a0 = np.where(v6, net["a0"], net["key4"])
            a1, a2, a3 = (np.where(v6, net[name], zero) for name in ("a1", "a2", "a3"))
            ports = np.where(v6, net["ports6"], net["ports4"])
        else:
            a0 = net["key4"].copy()
            a1 = a2 = a3 = np.zeros(len(rows), dtype=np.uint64)
            ports = net["ports4"].copy()
        return cls(
            rows=rows,
            l4=l3 + np.where(v6, 40, 20),
            ip_end=l3 + total,
            v6=v6,
            words=(a0, a1, a2, a3, ports),
            hashes=_hash(a0, a1, a2, a3, ports, v6),
        )


# The IP header and the UDP ports as one record per frame, from the start of the IP header:
# what _BlockKeys reads of every frame of a block, in one gather.
_NET: Final = np.dtype(
    {
        "names": [
            "head", "word2", "proto", "key4", "ports4", "dport4",
            "a0", "a1", "a2", "a3", "ports6", "dport6",
        ],
        "formats": [
            ">u4", ">u4", "u1", "<u8", "<u4", ">u2",
            "<u8", "<u8", "<u8", "<u8", "<u4", ">u2",
        ],
        "offsets": [0, 4, 9, 12, 20, 22, 8, 16, 24, 32, 40, 42],
        "itemsize": 44,
    }
)  # fmt: skip
_NET_ITEM: Final = np.dtype(f"V{_NET.itemsize}")
# The UDP and RTP headers of a queued frame, from the start of the UDP header.
_UDP_RTP: Final = np.dtype(
    {"names": ["udp_len", "rtp", "ssrc"], "formats": [">u2", ">u8", ">u4"], "offsets": [4, 8, 16],
     "itemsize": _PAYLOAD_AT}
)  # fmt: skip
_VLAN_LIST: Final = np.array(sorted(VLAN_TAGS), dtype=np.int64)
_RAW_LIST: Final = np.array([DLT_RAW, DLT_RAW_12, DLT_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6])


@dataclass(slots=True)
class _Pending:
    """Frames of one block waiting in the lane: their index among the block's keys, and the
    flow slot of each (-1 once taken).

    Indices come in as one piece per stretch between general-path frames and are joined
    into one array the first time the lane needs to look into them.
    """

    block: FrameBlock
    keys: _BlockKeys
    idx: list[npt.NDArray[np.int64]] = field(default_factory=list)
    slots: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def joined(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if len(self.idx) > 1:
            self.idx = [np.concatenate(self.idx)]
            self.slots = [np.concatenate(self.slots)]
        return self.idx[0], self.slots[0]


@dataclass(slots=True)
class _Frames:
    """Queued frames taken out of the lane, one flow after the other, each flow's in capture
    order, with the header fields placing needs."""

    flows: list[FastFlow]
    firsts: list[int]  # first frame of each flow
    counts: list[int]
    block_of: list[FrameBlock]  # per part
    part: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    at: npt.NDArray[np.int64]  # where the RTP payload starts, from the frame's start
    end: npt.NDArray[np.int64]  # where the UDP payload ends
    arrivals: npt.NDArray[np.float64]
    plain: npt.NDArray[np.bool_]
    pt: npt.NDArray[np.int64]
    seq: npt.NDArray[np.int64]
    rts: npt.NDArray[np.int64]
    ssrc: npt.NDArray[np.int64]

    def groups(self, limit: int) -> list[_Frames]:
        """These frames cut between flows into pieces of about ``limit`` frames (a flow is
        never cut): placing is flow by flow, so piece by piece is the same, and the arrays
        placing makes (payloads, decoded audio, index temporaries) stay that small."""
        total = len(self.rows)
        if total <= limit:
            return [self]
        pieces: list[_Frames] = []
        f0 = 0
        n_flows = len(self.flows)
        while f0 < n_flows:
            lo = self.firsts[f0]
            f1 = f0 + 1
            while f1 < n_flows and self.firsts[f1] - lo < limit:
                f1 += 1
            hi = self.firsts[f1] if f1 < n_flows else total
            pieces.append(
                _Frames(
                    flows=self.flows[f0:f1],
                    firsts=[first - lo for first in self.firsts[f0:f1]],
                    counts=self.counts[f0:f1],
                    block_of=self.block_of,
                    part=self.part[lo:hi],
                    rows=self.rows[lo:hi],
                    at=self.at[lo:hi],
                    end=self.end[lo:hi],
                    arrivals=self.arrivals[lo:hi],
                    plain=self.plain[lo:hi],
                    pt=self.pt[lo:hi],
                    seq=self.seq[lo:hi],
                    rts=self.rts[lo:hi],
                    ssrc=self.ssrc[lo:hi],
                )
            )
            f0 = f1
        return pieces

    def frame(self, i: int) -> tuple[float, int, bytes]:
        block = self.block_of[int(self.part[i])]
        row = int(self.rows[i])
        return float(self.arrivals[i]), int(block.linktypes[row]), block.frame(row)

    def payload(self, i: int) -> bytes:
        block = self.block_of[int(self.part[i])]
        start = int(block.starts[int(self.rows[i])])
        return block.data[start + int(self.at[i]) : start + int(self.end[i])]


@dataclass(slots=True)
class _Run:
    """Frames ``first .. first + n - 1`` of one flow: one run of one stream, or (n == 1,
    or not ``plain``) frames for the per-packet path."""

    flow: FastFlow
    first: int
    n: int
    plain: bool


class FastLane:
    """Flows, their queued frames, and the block loop (see the module docstring)."""

    def __init__(self, host: LaneHost) -> None:
        self.p = host
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
        self._by_call: dict[str, set[bytes]] = {}  # call → its flows' keys
        self._by_endpoint: dict[tuple[bytes, int], set[bytes]] = {}  # (address, port) → keys
        self._queued = np.zeros(64, dtype=np.int64)  # frames queued per slot
        # Per slot, kept as flows come and go (so that a lookup table is a sort, not a
        # walk over every flow): the key words (a0..a3, ports), family, hash, the value a
        # matched frame gets (its slot, or _FOREIGN - slot) and whether a flow holds it.
        self._words = np.zeros((64, 5), dtype=np.uint64)
        self._v6 = np.zeros(64, dtype=np.bool_)
        self._hashes = np.zeros(64, dtype=np.uint64)
        self._values = np.zeros(64, dtype=np.int64)
        self._live = np.zeros(64, dtype=np.bool_)
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        # sorted key hashes, then the key words, family and slot of each (None: rebuild)
        self._lookup: tuple[npt.NDArray[Any], ...] | None = None

    # -- flows ------------------------------------------------------------------------------

    def learn(
        self,
        key: bytes,
        call_id: str,
        recorder: CallRecorder | None,
        sender: str,
        endpoints: tuple[bytes, int, bytes, int],
    ) -> FastFlow:
        """A packet of ``key`` just went to ``call_id``'s RTP as ``sender``'s (to
        ``recorder``; None when another worker records the call): its next ones may take
        the lane."""
        known = self.flows.get(key)
        if known is not None:
            return known
        slot = self._free.pop() if self._free else len(self._slots)
        flow = FastFlow(key, slot, call_id, recorder, sender, endpoints)
        if slot == len(self._slots):
            self._slots.append(flow)
            if slot >= len(self._queued):
                self._grow()
        else:
            self._slots[slot] = flow
        *words, v6 = flow.words
        self._words[slot] = words
        self._v6[slot] = v6
        self._hashes[slot] = _hash_one(flow.words)
        self._values[slot] = _FOREIGN - slot if recorder is None else slot
        self._live[slot] = True
        self.flows[key] = flow
        self._by_call.setdefault(call_id, set()).add(key)
        for endpoint in ((flow.src, flow.sport), (flow.dst, flow.dport)):
            self._by_endpoint.setdefault(endpoint, set()).add(key)
        self._lookup = None
        self._learned = True
        return flow

    def _grow(self) -> None:
        """Twice the slots (the per-slot arrays)."""
        self._queued = np.concatenate([self._queued, np.zeros_like(self._queued)])
        self._words = np.concatenate([self._words, np.zeros_like(self._words)])
        self._v6 = np.concatenate([self._v6, np.zeros_like(self._v6)])
        self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._values = np.concatenate([self._values, np.zeros_like(self._values)])
        self._live = np.concatenate([self._live, np.zeros_like(self._live)])

    def forget_routes(self, call_id: str, endpoints: set[tuple[bytes, int]]) -> None:
        """Routes changed: forget, after placing what they hold, the flows of ``call_id``
        and every flow from or to one of ``endpoints`` (packed address, port)."""
        keys = set(self._by_call.get(call_id, ()))
        for endpoint in endpoints:
            keys |= self._by_endpoint.get(endpoint, set())
        self._forget([self.flows[key] for key in keys if key in self.flows])

    def _unindex(self, flow: FastFlow) -> None:
        """Take a flow out of the dictionaries (its slot is the caller's business)."""
        del self.flows[flow.key]
        _discard(self._by_call, flow.call_id, flow.key)
        _discard(self._by_endpoint, (flow.src, flow.sport), flow.key)
        _discard(self._by_endpoint, (flow.dst, flow.dport), flow.key)
        self._removed.append(flow.slot)
        self._live[flow.slot] = False
        self._lookup = None

    def close_call(self, call_id: str) -> bool:
        """A call ended: no frame takes the lane to it any more.  What its flows already
        queued stays queued, placed by the next full drain (a call ending costs no drain of
        its own); True if there is any, so the caller finishes the call after that drain."""
        waiting = False
        for key in list(self._by_call.get(call_id, ())):
            flow = self.flows[key]
            self._unindex(flow)
            if self._queued[flow.slot]:
                self._closing.append(flow.slot)
                waiting = True
            else:
                self._slots[flow.slot] = None
                self._free.append(flow.slot)
        return waiting

    def drain_call(self, call_id: str) -> None:
        """Place what a call's flows hold (its media is about to change)."""
        keys = self._by_call.get(call_id, ())
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
        """The flows sorted by key hash: hashes, a0..a3, ports, family, matched value."""
        if self._lookup is None and self.flows:
            live = np.flatnonzero(self._live)
            live = live[np.argsort(self._hashes[live], kind="stable")]
            words = self._words[live]
            self._lookup = (
                self._hashes[live],
                *(np.ascontiguousarray(words[:, c]) for c in range(4)),
                words[:, 4].astype(np.uint32),
                self._v6[live],
                self._values[live],
            )
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
        general = np.flatnonzero((slots == -1) | (times >= next_tick)).tolist()
        gi = 0
        pos = 0
        while pos < n:
            g = base + general[gi] if gi < len(general) else n
            if g > pos:
                self._queue(block, keys, pos, g, slots[pos - base : g - base])
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
                gone = np.array(self._removed[removed:], dtype=np.int64)
                slots[np.isin(slots, gone) | np.isin(slots, _FOREIGN - gone)] = -1
            elif p.next_tick != next_tick:
                slots = slots[pos - base :]  # a tick passed: later frames may take the lane
            else:
                continue
            removed = len(self._removed)
            next_tick = p.next_tick
            base = pos
            general = np.flatnonzero((slots == -1) | (times[pos:] >= next_tick)).tolist()
            gi = 0

    def _match(self, keys: _BlockKeys, n: int, first: int) -> npt.NDArray[np.int64]:
        """The flow slot of every frame of an ``n``-frame block from ``first`` on: -1 for
        the general path, ``_FOREIGN - slot`` for another worker's call."""
        slots = np.full(n - first, -1, dtype=np.int64)
        self._learned = False
        table = self._table()
        if table is None:
            return slots
        i = int(np.searchsorted(keys.rows, first))
        if i >= len(keys.rows):
            return slots
        hashes = keys.hashes[i:]
        t_hash, t_a0, t_a1, t_a2, t_a3, t_ports, t_v6, t_slots = table
        at = np.minimum(np.searchsorted(t_hash, hashes), len(t_hash) - 1)
        ok = (t_hash[at] == hashes) & (t_v6[at] == keys.v6[i:])
        for mine, theirs in zip(keys.words, (t_a0, t_a1, t_a2, t_a3, t_ports), strict=True):
            ok &= theirs[at] == mine[i:]
        slots[keys.rows[i:][ok] - first] = t_slots[at[ok]]
        return slots

    def _queue(
        self,
        block: FrameBlock,
        keys: _BlockKeys,
        lo: int,
        hi: int,
        slots: npt.NDArray[np.int64],
    ) -> None:
        """Queue frames ``lo`` to ``hi`` of ``block`` (all of flows, so all among its keys):
        everything that can fail is computed before anything is queued."""
        p = self.p
        size = int(block.lengths[lo:hi].sum())
        first = int(np.searchsorted(keys.rows, lo))
        idx = np.arange(first, first + hi - lo, dtype=np.int64)
        foreign = slots <= _FOREIGN
        if foreign.any():
            p.counters["rtp_other_worker"] += int(foreign.sum())
            keep = ~foreign
            idx, slots = idx[keep], slots[keep]
        counts = np.bincount(slots, minlength=len(self._queued)) if len(slots) else None
        p.frames += hi - lo
        p.bytes += size
        if counts is None:
            return
        if not self._pending or self._pending[-1].block is not block:
            self._pending.append(_Pending(block, keys))
        pending = self._pending[-1]
        pending.idx.append(idx)
        pending.slots.append(slots)
        self._pending_rows += len(idx)
        self._queued += counts
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
        place them."""
        parts: list[tuple[_Pending, npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        if wanted is None:
            for pending in self._pending:
                idx, slots = pending.joined()
                keep = slots >= 0
                parts.append((pending, idx[keep], slots[keep]))
            self._pending = []
            self._pending_rows = 0
            self._queued[:] = 0
            closing, self._closing = self._closing, []
        else:
            closing = []
            for pending in self._pending:
                idx, slots = pending.joined()
                hit = np.isin(slots, list(wanted))
                at = np.flatnonzero(hit)
                if len(at):
                    parts.append((pending, idx[at], slots[at]))
                    slots[at] = -1
                    self._pending_rows -= len(at)
            self._queued[list(wanted)] = 0
            if not self._pending_rows:
                self._pending = []
        parts = [part for part in parts if len(part[1])]
        try:
            if parts:
                for piece in self._gather(parts).groups(_PLACE_FRAMES):
                    self._place(piece)
        except Exception as exc:  # noqa: BLE001 - a bug costs these frames, not the process
            self.p.internal_error(self.p.now, exc)
        finally:
            for slot in closing:  # closed flows: their last frames are placed
                self._slots[slot] = None
                self._free.append(slot)

    def _gather(
        self, parts: list[tuple[_Pending, npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    ) -> _Frames:
        """The queued frames' header fields, one gather per field and block, flow by flow."""
        part = np.concatenate(
            [np.full(len(idx), i, dtype=np.int64) for i, (_p, idx, _s) in enumerate(parts)]
        )
        idx = np.concatenate([idx for _p, idx, _s in parts])
        slots = np.concatenate([slots for _p, _i, slots in parts])
        order = np.argsort(slots, kind="stable")  # by flow, each in capture order
        idx, slots, part = idx[order], slots[order], part[order]
        m = len(idx)
        rows = np.empty(m, dtype=np.int64)
        l4 = np.empty(m, dtype=np.int64)
        ip_end = np.empty(m, dtype=np.int64)
        udp_len = np.empty(m, dtype=np.int64)
        rtp = np.empty(m, dtype=np.uint64)
        ssrc = np.empty(m, dtype=np.int64)
        arrivals = np.empty(m, dtype=np.float64)
        for i, (pending, _i, _s) in enumerate(parts):
            at = np.flatnonzero(part == i) if len(parts) > 1 else slice(None)
            keys = pending.keys
            mine = idx[at]
            r = keys.rows[mine]
            rows[at] = r
            off = keys.l4[mine]
            l4[at] = off
            ip_end[at] = keys.ip_end[mine]
            headers = values_at(pending.block.data, pending.block.starts[r] + off, _UDP_RTP)
            udp_len[at] = headers["udp_len"]
            rtp[at] = headers["rtp"]
            ssrc[at] = headers["ssrc"]
            arrivals[at] = pending.block.times[r]
        end = l4 + udp_len
        b0 = (rtp >> np.uint64(56)).astype(np.int64)
        pt = ((rtp >> np.uint64(48)) & np.uint64(0x7F)).astype(np.int64)
        # RFC 3550 §5.1 version 2, no padding, extension or CSRCs; a payload bounded by the
        # IP packet; RTCP payload types multiplexed on the port (RFC 5761) are not RTP
        plain = (b0 == 0x80) & (udp_len >= _MIN_TAIL) & (end <= ip_end)
        plain &= (pt < 72) | (pt > 76)
        firsts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        counts = np.diff(np.r_[firsts, m])
        flows = []
        for slot in slots[firsts].tolist():
            flow = self._slots[slot]
            assert flow is not None
            flows.append(flow)
        return _Frames(
            flows=flows,
            firsts=firsts.tolist(),
            counts=counts.tolist(),
            block_of=[pending.block for pending, _i, _s in parts],
            part=part,
            rows=rows,
            at=l4 + _PAYLOAD_AT,
            end=end,
            arrivals=arrivals,
            plain=plain,
            pt=pt,
            seq=((rtp >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64),
            rts=(rtp & np.uint64(0xFFFFFFFF)).astype(np.int64),
            ssrc=ssrc,
        )

    # -- placing ----------------------------------------------------------------------------

    def _place(self, fr: _Frames) -> None:
        """Cut each flow's frames into runs and place them, round by round (module
        docstring, step 3)."""
        m = len(fr.rows)
        size = fr.end - fr.at
        # a run breaks where a frame is not plain RTP, or changes SSRC, payload type or
        # size, or does not follow its predecessor's sequence number
        cut = np.zeros(m, dtype=np.bool_)
        cut[fr.firsts] = True
        cut[1:] |= ~fr.plain[1:] | ~fr.plain[:-1]
        cut[1:] |= (fr.ssrc[1:] != fr.ssrc[:-1]) | (fr.pt[1:] != fr.pt[:-1])
        cut[1:] |= (size[1:] != size[:-1]) | (((fr.seq[1:] - fr.seq[:-1]) & 0xFFFF) != 1)
        starts = np.flatnonzero(cut)
        lengths = np.diff(np.r_[starts, m]).tolist()
        plain = fr.plain[starts].tolist()
        # each flow's runs, in order (flows are contiguous, so runs of a flow are too)
        owner = np.searchsorted(np.array(fr.firsts), starts, side="right") - 1
        queues: list[list[_Run]] = [[] for _ in fr.flows]
        for f, first, n, ok in zip(owner.tolist(), starts.tolist(), lengths, plain, strict=True):
            queues[f].append(_Run(fr.flows[f], first, n, ok))
        for queue in queues:
            queue.reverse()  # popped from the end
        live = [q for q in queues if q]
        for attempt in range(_ROUNDS + 1):
            batch: list[tuple[_Run, Any, Any]] = []  # run, stream context, decoder
            for queue in live:
                while queue:
                    run = queue[-1]
                    if attempt < _ROUNDS and run.plain and run.n > 1:
                        ctx = run.flow.contexts.get(int(fr.ssrc[run.first]))
                        rec = run.flow.recorder
                        decoder = (
                            None
                            if ctx is None or rec is None
                            else rec.audio_decoder(ctx, int(fr.pt[run.first]))
                        )
                        if decoder is not None:
                            batch.append((run, ctx, decoder))
                            break
                        if ctx is None:  # a new stream starts packet by packet
                            self._one(fr, run.flow, run.first)
                            run.first += 1
                            run.n -= 1
                            continue
                    queue.pop()
                    for i in range(run.first, run.first + run.n):
                        self._one(fr, run.flow, i)
            if not batch:
                break
            for run in self._place_runs(fr, batch):
                # turned down: its first packet one by one (it anchors a stream, or opens
                # its gap), the rest is tried again in the next round
                self._one(fr, run.flow, run.first)
                run.first += 1
                run.n -= 1
            live = [q for q in live if q]
            for queue in live:
                if queue[-1].n == 0:
                    queue.pop()
            live = [q for q in live if q]

    def _place_runs(self, fr: _Frames, batch: list[tuple[_Run, Any, Any]]) -> list[_Run]:
        """Place one run per flow with one ``place_runs``; the runs it turned down come back
        (untouched), the others are taken off their queues' ends."""
        p = self.p
        firsts = np.array([run.first for run, _c, _d in batch], dtype=np.int64)
        lengths = np.array([run.n for run, _c, _d in batch], dtype=np.int64)
        starts = np.zeros(len(batch), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        take = _ranges(firsts, lengths)
        psizes = (fr.end[firsts] - fr.at[firsts]).tolist()
        placed = place_runs(
            [ctx.stream for _r, ctx, _d in batch],
            starts,
            fr.arrivals[take],
            fr.seq[take].astype(np.uint16),
            fr.rts[take].astype(np.uint32),
            fr.pt[firsts].tolist(),
            psizes,
            np.ones(len(batch), dtype=np.bool_),
        )
        # The placed runs' payloads, cut out of their blocks: one gather per payload size and
        # codec, for every call at once.  G.711 waits in the calls' queues as codes, decoded
        # when written (half the memory); another codec is decoded here, one lookup a group.
        groups: dict[tuple[int, Any], list[int]] = {}
        for r, ((_run, _c, decoder), size, pos) in enumerate(
            zip(batch, psizes, placed, strict=True)
        ):
            if pos is not None:
                groups.setdefault((size, decoder), []).append(r)
        # run → (samples or codes, offset, the codes' decoder)
        decoded: dict[int, tuple[npt.NDArray[Any], int, Any]] = {}
        for (size, decoder), members in groups.items():
            mine = _ranges(firsts[members], lengths[members])
            data = np.empty((len(mine), size), dtype=np.uint8)
            sub_parts = fr.part[mine]
            for i, block in enumerate(fr.block_of):
                at = np.flatnonzero(sub_parts == i) if len(fr.block_of) > 1 else slice(None)
                rows = fr.rows[mine[at]]
                if len(rows):
                    data[at] = values_at(
                        block.data,
                        block.starts[rows] + fr.at[mine[at]],
                        np.dtype((np.uint8, (size,))),
                    )
            lazy = decoder in CODE_PER_SAMPLE
            pcm = data.reshape(-1) if lazy else decoder(data.reshape(-1))
            offset = 0
            for r in members:
                decoded[r] = (pcm, offset, decoder if lazy else None)
                offset += batch[r][0].n * size
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
        rejected: list[_Run] = []
        for r, ((run, ctx, _decoder), size, positions) in enumerate(
            zip(batch, psizes, placed, strict=True)
        ):
            if positions is None:
                rejected.append(run)
                continue
            n = run.n
            run.n = 0  # taken
            p.rtp_packets += n
            p.counters["rtp_placed_in_runs"] += n
            pcm, offset, codes_of = decoded[r]
            last = float(fr.arrivals[run.first + n - 1])
            recorder = run.flow.recorder
            assert recorder is not None
            try:
                recorder.queue_run(
                    ctx,
                    positions,
                    pcm[offset : offset + n * size],
                    size,
                    last,
                    next(contiguous),
                    codes_of,
                )
            except Exception as exc:  # noqa: BLE001 - one call's bug stays in that call
                p.internal_error(last, exc)
        return rejected

    def _one(self, fr: _Frames, flow: FastFlow, i: int) -> None:
        """One queued frame: straight to its stream if it is plain RTP, else the general path."""
        p = self.p
        if not fr.plain[i] or flow.recorder is None:
            ts, linktype, frame = fr.frame(i)
            p.frames -= 1
            p.bytes -= len(frame)
            p.feed(ts, linktype, frame)  # counts the frame again
            return
        ts = float(fr.arrivals[i])
        ssrc = int(fr.ssrc[i])
        rec = flow.recorder
        try:
            ctx = flow.contexts.get(ssrc)
            if ctx is None:
                ctx = flow.contexts[ssrc] = rec.stream_for(
                    flow.sender, flow.src, flow.sport, flow.dst, flow.dport, ssrc, ts
                )
            p.rtp_packets += 1
            rec.push(ctx, ts, int(fr.pt[i]), int(fr.seq[i]), int(fr.rts[i]), fr.payload(i))
        except Exception as exc:  # noqa: BLE001 - as in feed: isolate one packet
            p.internal_error(ts, exc)


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
