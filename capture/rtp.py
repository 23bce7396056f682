"""RTP fixed header (RFC 3550 §5.1) and the wraparound arithmetic of its counters.

Sequence numbers wrap at 2**16 and timestamps at 2**32; every comparison of either goes
through the named helpers below so no caller writes ``% 65536`` inline (RFC 3550 A.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from callcap.errors import ParseError

RTP_VERSION = 2
_FIXED = struct.Struct("!BBHII")
_EXT = struct.Struct("!HH")

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


def seq_distance(a: int, b: int) -> int:
    """Signed distance from sequence number ``a`` to ``b`` the short way round the wrap."""
    d = (b - a) & 0xFFFF
    return d - SEQ_MOD if d >= 0x8000 else d


def seq_gt(a: int, b: int) -> bool:
    """True if ``a`` comes after ``b`` in sequence-number order (RFC 1982 serial arithmetic)."""
    return seq_distance(b, a) > 0


def ts_delta(a: int, b: int) -> int:
    """Signed distance from RTP timestamp ``a`` to ``b`` the short way round the 32-bit wrap."""
    d = (b - a) & 0xFFFFFFFF
    return d - TS_MOD if d >= 0x80000000 else d


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """An RTP packet split into header fields and payload.

    ``payload`` excludes CSRCs, the header extension and padding (RFC 3550 §5.1, §5.3.1).
    """

    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    csrc_count: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> RtpHeader:
        pt, marker, seq, ts, ssrc, cc, payload = parse_rtp(data)
        return cls(pt, marker, seq, ts, ssrc, cc, payload)

    def __bytes__(self) -> bytes:
        first = (RTP_VERSION << 6) | (self.csrc_count & 0x0F)
        second = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        head = _FIXED.pack(first, second, self.sequence, self.timestamp, self.ssrc)
        return head + b"\x00\x00\x00\x00" * self.csrc_count + self.payload


def parse_rtp(data: bytes) -> tuple[int, bool, int, int, int, int, bytes]:
    """Parse an RTP packet into ``(pt, marker, seq, ts, ssrc, csrc_count, payload)``.

    A plain tuple rather than a dataclass because this runs once per media packet.
    Raises :class:`ParseError` for anything that is not a well-formed version-2 packet.
    """
    n = len(data)
    if n < 12:
        raise ParseError("rtp_short", f"RTP packet needs 12 bytes, got {n}")
    b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise ParseError("rtp_bad_version", f"RTP version must be 2, got {b0 >> 6}")
    cc = b0 & 0x0F
    start = 12 + 4 * cc
    end = n
    if b0 & 0x10:  # header extension (RFC 3550 §5.3.1)
        if start + 4 > n:
            raise ParseError("rtp_short", "RTP header extension runs past the packet")
        _profile, words = _EXT.unpack_from(data, start)
        start += 4 + 4 * words
    if b0 & 0x20:  # padding: last octet counts the padding octets, itself included
        pad = data[-1]
        if pad == 0:
            raise ParseError("rtp_bad_padding", "RTP padding count is zero")
        end -= pad
    if start > end:
        raise ParseError(
            "rtp_short", f"RTP headers need {start} bytes, packet payload ends at {end}"
        )
    return b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, cc, data[start:end]


def looks_like_rtp(data: bytes) -> bool:
    """Cheap test for RTP version 2 with a payload type outside the RTCP range (RFC 5761 §4)."""
    return len(data) >= 12 and data[0] >> 6 == RTP_VERSION and not 72 <= (data[1] & 0x7F) <= 76
