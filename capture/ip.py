"""IPv4 and IPv6 headers: addresses, upper-layer protocol, payload bounds, fragment fields.

Functions take ``(buf, off, end)`` and return offsets into ``buf`` instead of slices, so a
frame is copied once — when the transport payload is finally cut out of it.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from callcap.errors import ParseError

PROTO_HOPOPTS: Final = 0
PROTO_IPIP: Final = 4
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_IPV6: Final = 41
PROTO_ROUTING: Final = 43
PROTO_FRAGMENT: Final = 44
PROTO_GRE: Final = 47
PROTO_ESP: Final = 50
PROTO_AH: Final = 51
PROTO_NONE: Final = 59
PROTO_DSTOPTS: Final = 60

# Extension headers with the common "next header, length in 8-octet units minus one" layout
# (RFC 8200 §4.3–4.6; mobility 135, HIP 139, shim6 140 follow it per RFC 6564).
_GENERIC_EXT: Final = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS, 135, 139, 140})
_MAX_EXT: Final = 16

_IPV4 = struct.Struct("!BxHHHxBxx4s4s")  # ver/ihl, total length, id, flags/offset, proto, src, dst
_IPV6 = struct.Struct("!I H B x 16s16s")  # ver/class/label, payload length, next header, src, dst
_FRAG6 = struct.Struct("!BxHI")  # next header, offset/flags, identification

NOT_FRAGMENT: Final = -1


class IpPacket(NamedTuple):
    """One IP header's worth of facts; ``start:end`` bounds what follows it in ``buf``.

    For a fragment (``frag_id != NOT_FRAGMENT``) ``start:end`` is the fragment's data and
    ``proto`` the protocol of the whole datagram; for IPv6 the data may still begin with
    extension headers of the fragmentable part (RFC 8200 §4.5), walked after reassembly.
    """

    proto: int
    src: bytes
    dst: bytes
    start: int
    end: int
    frag_id: int
    frag_offset: int
    more_fragments: bool


def parse_ipv4(buf: bytes, off: int, end: int) -> IpPacket:
    """IPv4 header at ``off`` (RFC 791 §3.1); the packet must lie within ``buf[off:end]``.

    The total-length field, not the frame, says where the packet ends: Ethernet pads short
    frames to 60 bytes (IEEE 802.3 §4.2.3.3) and some captures keep the FCS, so bytes past
    the total length are cut off.  A total length of 0 is taken as "whatever was captured":
    that is how outgoing packets look in a capture taken on a host with TCP segmentation
    offload.  Options are skipped; the header checksum is not checked (offloaded checksums
    are often wrong in captures taken on the sending host).
    """
    avail = end - off
    if avail < 20:
        raise ParseError("ip_truncated", f"IPv4 header: need 20 bytes, have {avail}")
    vihl, total, ident, frag, proto, src, dst = _IPV4.unpack_from(buf, off)
    if vihl >> 4 != 4:
        raise ParseError("ip_bad_version", f"expected IP version 4, found {vihl >> 4}")
    hlen = (vihl & 0x0F) * 4
    if hlen < 20:
        raise ParseError("ip_bad_header", f"IPv4 header length {hlen} < 20")
    if total == 0:
        total = avail
    if total < hlen:
        raise ParseError("ip_bad_length", f"IPv4 total length {total} < header length {hlen}")
    if total > avail:
        raise ParseError("ip_truncated", f"IPv4 total length {total}, only {avail} bytes captured")
    more = bool(frag & 0x2000)
    offset = (frag & 0x1FFF) * 8
    frag_id = ident if (more or offset) else NOT_FRAGMENT
    return IpPacket(proto, src, dst, off + hlen, off + total, frag_id, offset, more)


def parse_ipv6(buf: bytes, off: int, end: int) -> IpPacket:
    """IPv6 header at ``off`` (RFC 8200 §3) and its extension-header chain (§4).

    A payload length of 0 means a jumbogram (RFC 2675) or a TSO capture; either way what
    was captured is taken.  Trailing link padding beyond the payload length is cut off.
    """
    avail = end - off
    if avail < 40:
        raise ParseError("ip_truncated", f"IPv6 header: need 40 bytes, have {avail}")
    first, plen, nxt, src, dst = _IPV6.unpack_from(buf, off)
    if first >> 28 != 6:
        raise ParseError("ip_bad_version", f"expected IP version 6, found {first >> 28}")
    start = off + 40
    if plen == 0:
        stop = end
    else:
        stop = start + plen
        if stop > end:
            raise ParseError(
                "ip_truncated", f"IPv6 payload length {plen}, only {avail - 40} captured"
            )
    proto, start, frag = walk_ipv6_extensions(nxt, buf, start, stop)
    if frag is None:
        return IpPacket(proto, src, dst, start, stop, NOT_FRAGMENT, 0, False)
    ident, offset, more = frag
    return IpPacket(proto, src, dst, start, stop, ident, offset, more)


def walk_ipv6_extensions(
    nxt: int, buf: bytes, pos: int, stop: int
) -> tuple[int, int, tuple[int, int, bool] | None]:
    """Follow the extension headers from ``nxt`` → (upper protocol, its offset, fragment).

    Stops at the first fragment header that is a real fragment, returning its next header
    and ``(identification, offset, more)``: what follows is the fragmentable part, only
    readable after reassembly.  An atomic fragment (offset 0, M=0, RFC 6946 §4) is walked
    through like any other extension header.  No Next Header (59) is returned as the protocol.
    """
    for _ in range(_MAX_EXT):
        if nxt in _GENERIC_EXT:
            if pos + 2 > stop:
                raise ParseError("ip_truncated", f"IPv6 extension header {nxt} cut short")
            size = (buf[pos + 1] + 1) * 8
        elif nxt == PROTO_AH:  # RFC 4302 §2.2: length in 4-octet units minus two
            if pos + 2 > stop:
                raise ParseError("ip_truncated", "IPv6 AH header cut short")
            size = (buf[pos + 1] + 2) * 4
        elif nxt == PROTO_FRAGMENT:
            if pos + 8 > stop:
                raise ParseError("ip_truncated", "IPv6 fragment header cut short")
            inner, offlg, ident = _FRAG6.unpack_from(buf, pos)
            offset = offlg & 0xFFF8
            more = bool(offlg & 1)
            pos += 8
            if offset or more:
                return inner, pos, (ident, offset, more)
            nxt = inner
            continue
        else:
            return nxt, pos, None
        if pos + size > stop:
            raise ParseError("ip_truncated", f"IPv6 extension header {nxt} longer than packet")
        nxt = buf[pos]
        pos += size
    raise ParseError("ip_bad_header", f"more than {_MAX_EXT} IPv6 extension headers")
