"""TCP stream reassembly for a passive observer: segments in, in-order byte chunks out.

SIP over TCP (RFC 3261 §18.3) is a byte stream: one message may span several segments and
one segment may carry several messages, so the SIP framer needs the stream in order.  A
passive recorder sees what the wire carried, not what the receiver accepted: segments come
reordered, retransmitted, overlapping, or not at all (capture drops), and the capture may
start in the middle of a connection.  This module turns that into the byte stream, per
direction, bounded in memory:

* the first segment of a flow (a SYN, or any segment when the capture joined mid-stream)
  fixes the expected sequence number;
* out-of-order segments wait (up to ``max_buffer`` bytes per flow) for the gap to fill;
* bytes already delivered are never delivered twice (retransmissions, overlaps);
* a gap that never fills is skipped once the buffer bound is hit, so a lost segment costs
  the message it belonged to, not the rest of the connection;
* FIN or RST ends the flow once its bytes are delivered.

Sequence numbers are 32-bit and wrap (RFC 9293 §3.4); all comparisons go through the
helpers below.  Inside a flow they are unwrapped to a 64-bit stream offset once, on entry.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Final

from callcap.capture.decode import Datagram

SEQ_MOD: Final = 1 << 32
_HALF: Final = 1 << 31

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04

# A segment this far beyond the next expected byte is not treated as part of the stream
# (the largest window TCP can advertise is 2**30 bytes, RFC 7323 §2.3).
MAX_AHEAD: Final = 1 << 30

FlowKey = tuple[bytes, int, bytes, int]


def seq_add(seq: int, n: int) -> int:
    """``seq`` advanced by ``n`` bytes, modulo 2**32."""
    return (seq + n) % SEQ_MOD


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` taken the short way round the 2**32 wrap (RFC 1982 style)."""
    d = (a - b) % SEQ_MOD
    return d - SEQ_MOD if d >= _HALF else d


def seq_lt(a: int, b: int) -> bool:
    """True if sequence number ``a`` comes before ``b``."""
    return seq_diff(a, b) < 0


class _Flow:
    """One direction of one connection.

    ``next_seq`` is the wire sequence number of the next byte to deliver and ``next_off``
    the same position as an unwrapped stream offset; pending segments are kept by offset.
    """

    __slots__ = (
        "buffered",
        "closed",
        "fin_off",
        "last_ts",
        "next_off",
        "next_seq",
        "pending",
        "starts",
    )

    def __init__(self, next_seq: int, ts: float) -> None:
        self.next_seq = next_seq
        self.next_off = 0
        self.pending: list[tuple[int, bytes]] = []  # heap of (stream offset, data)
        self.starts: dict[int, int] = {}  # offset → longest length pending there
        self.buffered = 0
        self.fin_off: int | None = None
        self.closed = False
        self.last_ts = ts

    def offset_of(self, seq: int) -> int:
        return self.next_off + seq_diff(seq, self.next_seq)

    def advance_to(self, off: int) -> None:
        self.next_seq = seq_add(self.next_seq, off - self.next_off)
        self.next_off = off


class TcpReassembler:
    """Per-direction TCP reassembly, keyed by ``(src, sport, dst, dport)``.

    Counters: ``tcp_out_of_order`` (segments held), ``tcp_retransmitted`` (segments with
    nothing new), ``tcp_overlap_trimmed`` (segments partly new), ``tcp_out_of_window``,
    ``tcp_gap_skipped`` and ``tcp_gap_bytes_skipped``, ``tcp_flows_closed``,
    ``tcp_flows_expired``, ``tcp_flows_evicted``.

    A flow joined mid-stream starts at the first segment seen: if that one arrived ahead of
    an earlier one, the earlier bytes count as already passed and are not delivered.
    """

    def __init__(
        self, *, max_buffer: int = 256 * 1024, max_flows: int = 10000, idle_timeout_s: float = 300.0
    ) -> None:
        if max_buffer < 1 or max_flows < 1:
            raise ValueError("max_buffer and max_flows must be positive")
        self.max_buffer = max_buffer
        self.max_flows = max_flows
        self.idle_timeout_s = idle_timeout_s
        self.counters: Counter[str] = Counter()
        # Least recently used first: ``feed`` moves a flow to the end, so ``expire`` and
        # eviction look only at the front.
        self._flows: dict[FlowKey, _Flow] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def feed(self, ts: float, seg: Datagram) -> list[bytes]:
        """One TCP segment at capture time ``ts`` → newly contiguous payload, in order."""
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        flags = seg.tcp_flags
        data = seg.payload
        flows = self._flows
        flow = flows.pop(key, None)
        if flags & TCP_SYN:
            # A SYN starts a connection (or restarts one on a reused port): its sequence
            # number is the ISN, the first data byte is ISN + 1 (RFC 9293 §3.4.1).
            if flow is not None and not flow.closed and flow.offset_of(seg.tcp_seq) == -1:
                pass  # retransmitted SYN of the connection we already follow
            else:
                flow = _Flow(seq_add(seg.tcp_seq, 1), ts)
            seq = seq_add(seg.tcp_seq, 1)
        else:
            seq = seg.tcp_seq
            if flow is None:
                if not data and not flags & (TCP_FIN | TCP_RST):
                    return []  # a bare ACK of a flow we do not follow teaches nothing
                flow = _Flow(seq, ts)  # the capture joined mid-stream
            elif flow.closed and data and not seq_lt(seq, flow.next_seq):
                flow = _Flow(seq, ts)  # new data after the end: ports reused, SYN not seen
        if len(flows) >= self.max_flows:
            del flows[next(iter(flows))]
            self.counters["tcp_flows_evicted"] += 1
        flows[key] = flow
        flow.last_ts = ts
        if flow.closed:
            if data:
                self.counters["tcp_retransmitted"] += 1
            return []
        out: list[bytes] = []
        if data:
            self._accept(flow, flow.offset_of(seq), data, out)
        if flags & TCP_RST:
            flow.closed = True
            flow.pending = []
            flow.starts = {}
            flow.buffered = 0
            self.counters["tcp_flows_closed"] += 1
        elif flags & TCP_FIN:
            fin = flow.offset_of(seq) + len(data)
            if flow.fin_off is None or fin < flow.fin_off:
                flow.fin_off = fin
        if flow.fin_off is not None and not flow.closed and flow.next_off >= flow.fin_off:
            # All bytes up to the FIN delivered; the FIN itself takes one sequence number.
            flow.advance_to(flow.fin_off + 1)
            flow.closed = True
            flow.pending = []
            flow.starts = {}
            flow.buffered = 0
            self.counters["tcp_flows_closed"] += 1
        return out

    def _accept(self, flow: _Flow, off: int, data: bytes, out: list[bytes]) -> None:
        end = off + len(data)
        if off - flow.next_off > MAX_AHEAD:
            # Not this stream's bytes (a stray or forged segment): holding it would let a gap
            # skip jump past everything real.
            self.counters["tcp_out_of_window"] += 1
            return
        if end <= flow.next_off:
            self.counters["tcp_retransmitted"] += 1
            return
        if off <= flow.next_off:
            if off < flow.next_off:
                self.counters["tcp_overlap_trimmed"] += 1
                data = data[flow.next_off - off :]
            out.append(data)
            flow.advance_to(end)
            self._drain(flow, out)
            return
        # A gap before this segment: hold it.
        if flow.starts.get(off, -1) >= len(data):
            self.counters["tcp_retransmitted"] += 1
            return
        self.counters["tcp_out_of_order"] += 1
        flow.starts[off] = len(data)
        heapq.heappush(flow.pending, (off, data))
        flow.buffered += len(data)
        while flow.buffered > self.max_buffer and flow.pending:
            # The hole is not going to fill: give up on it and go on after it.
            start = flow.pending[0][0]
            self.counters["tcp_gap_skipped"] += 1
            self.counters["tcp_gap_bytes_skipped"] += start - flow.next_off
            flow.advance_to(start)
            self._drain(flow, out)

    def _drain(self, flow: _Flow, out: list[bytes]) -> None:
        """Deliver pending segments that the stream has now reached."""
        pending = flow.pending
        while pending and pending[0][0] <= flow.next_off:
            off, data = heapq.heappop(pending)
            flow.buffered -= len(data)
            if flow.starts.get(off) == len(data):
                del flow.starts[off]
            end = off + len(data)
            if end <= flow.next_off:
                continue  # wholly delivered already (an overlapping copy)
            out.append(data[flow.next_off - off :] if off < flow.next_off else data)
            flow.advance_to(end)

    def expire(self, now: float) -> int:
        """Forget flows idle for longer than ``idle_timeout_s`` of capture time → how many."""
        flows = self._flows
        limit = now - self.idle_timeout_s
        dropped = 0
        while flows:
            key = next(iter(flows))
            if flows[key].last_ts >= limit:
                break
            del flows[key]
            dropped += 1
        if dropped:
            self.counters["tcp_flows_expired"] += dropped
        return dropped

    def reset_flow(self, key: FlowKey) -> None:
        """Forget one direction's state; its next segment starts it afresh (mid-stream).

        For the SIP framer, when the stream it is given cannot be parsed and it wants to
        resynchronise on the next segment boundary rather than on buffered bytes.
        """
        self._flows.pop(key, None)
