"""IP fragment reassembly (RFC 791 §3.2, RFC 8200 §4.5, RFC 815), bounded in time and space.

A SIP INVITE with a rich SDP easily exceeds a 1500-byte MTU when sent over UDP, so a passive
recorder must reassemble, and must do so without trusting the sender: fragment sets are
capped in number (oldest evicted first), in size (65535 bytes, RFC 791 §3.1) and in age
(``timeout_s`` of *capture* time, like the reassembly timer of RFC 791 §3.2).  Overlapping
fragments that disagree about the bytes they share poison their datagram: it is dropped,
and later fragments of it are discarded until its timer runs out — RFC 5722 §4 for IPv6,
and the only safe reading for IPv4 too, since a recorder cannot know which copy the
receiver kept.  Exact duplicates (retransmissions, a SPAN port seeing both directions
through one switch) are harmless and ignored.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from callcap.errors import ParseError

MAX_DATAGRAM: Final = 65535

FragmentKey = tuple[bytes, bytes, int, int]


class _FragmentSet:
    __slots__ = ("data", "first_ts", "pieces", "poisoned", "proto", "total")

    def __init__(self, first_ts: float) -> None:
        self.first_ts = first_ts
        self.data = bytearray()
        self.pieces: list[tuple[int, int]] = []  # sorted, merged [start, end) ranges held
        self.total: int | None = None  # datagram length, known once the last fragment is in
        self.proto = -1  # from the offset-0 fragment (RFC 8200 §4.5: only its value counts)
        self.poisoned = False


class FragmentReassembler:
    """Collects fragments per ``(src, dst, id, proto)`` and returns each datagram once whole.

    Counters (shared with the caller): ``fragments_reassembled``, ``fragments_expired``,
    ``fragments_evicted``, ``fragments_duplicate``, ``fragments_overlap_dropped``,
    ``fragments_discarded`` (arrived for an already dropped datagram).
    """

    def __init__(
        self, *, max_datagrams: int, timeout_s: float, counters: Counter[str] | None = None
    ) -> None:
        if max_datagrams < 1:
            raise ValueError("max_datagrams must be at least 1")
        self.max_datagrams = max_datagrams
        self.timeout_s = timeout_s
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._sets: dict[FragmentKey, _FragmentSet] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def add(
        self, ts: float, key: FragmentKey, *, proto: int, offset: int, more: bool, data: bytes
    ) -> tuple[int, bytes] | None:
        """One fragment → ``(protocol, whole datagram payload)`` when complete, else None.

        ``offset`` is in bytes; ``proto`` is the upper-layer protocol this fragment names.
        Raises ParseError for a fragment that breaks the rules by itself (a non-final
        fragment whose length is not a multiple of 8, RFC 791 §3.1 / RFC 8200 §4.5, or a
        datagram that would exceed 65535 bytes — the "ping of death").
        """
        end = offset + len(data)
        if more and len(data) % 8:
            raise ParseError(
                "ip_fragment_bad_length",
                f"non-final fragment carries {len(data)} bytes, not a multiple of 8",
            )
        sets = self._sets
        if sets:
            self.expire(ts)
        frag = sets.get(key)
        if end > MAX_DATAGRAM:
            if frag is not None:
                del sets[key]
            raise ParseError(
                "ip_fragment_too_big", f"fragment ends at byte {end}, beyond {MAX_DATAGRAM}"
            )
        if frag is None:
            if len(sets) >= self.max_datagrams:
                oldest = next(iter(sets))
                if not sets.pop(oldest).poisoned:
                    self.counters["fragments_evicted"] += 1
            frag = sets[key] = _FragmentSet(ts)
        elif frag.poisoned:
            self.counters["fragments_discarded"] += 1
            return None
        if not more:
            if (frag.total is not None and frag.total != end) or (
                frag.pieces and frag.pieces[-1][1] > end
            ):
                self._poison(frag)  # two different "last" fragments
                return None
            frag.total = end
        elif frag.total is not None and end > frag.total:
            self._poison(frag)  # data beyond the end the last fragment announced
            return None
        if offset == 0:
            frag.proto = proto
        # Bytes shared with fragments already held must agree.
        held = frag.data
        covered = 0
        for start, stop in frag.pieces:
            lo = max(start, offset)
            hi = min(stop, end)
            if lo < hi:
                if held[lo:hi] != data[lo - offset : hi - offset]:
                    self._poison(frag)
                    return None
                covered += hi - lo
        if covered == len(data) and data:
            self.counters["fragments_duplicate"] += 1
        else:
            if len(held) < end:
                held.extend(bytes(end - len(held)))
            held[offset:end] = data
            frag.pieces = _merge(frag.pieces, offset, end)
        total = frag.total
        if total is not None and frag.pieces == [(0, total)]:
            del sets[key]
            self.counters["fragments_reassembled"] += 1
            return frag.proto, bytes(held[:total])
        return None

    def _poison(self, frag: _FragmentSet) -> None:
        frag.poisoned = True
        frag.data = bytearray()
        frag.pieces = []
        self.counters["fragments_overlap_dropped"] += 1

    def expire(self, now: float) -> int:
        """Drop fragment sets whose first fragment is older than the timeout → sets dropped.

        Sets are kept in creation order, so this stops at the first one still young: calling
        it for every fragment costs nothing when nothing is stale.
        """
        sets = self._sets
        limit = now - self.timeout_s
        dropped = 0
        while sets:
            key = next(iter(sets))
            if sets[key].first_ts >= limit:
                break
            if not sets.pop(key).poisoned:
                dropped += 1
        if dropped:
            self.counters["fragments_expired"] += dropped
        return dropped


def _merge(pieces: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Insert ``[start, end)`` into sorted disjoint ranges, joining touching ones."""
    out: list[tuple[int, int]] = []
    for s, e in pieces:
        if e < start or s > end:
            out.append((s, e))
        else:
            start = min(start, s)
            end = max(end, e)
    out.append((start, end))
    out.sort()
    return out
