"""Link layers: from a captured frame to the network-layer protocol and where it starts.

Every link type a recorder meets on a SPAN port, a Linux ``any`` capture, a loopback
interface or a raw-IP tunnel device reduces to one answer: an EtherType-style protocol
number and an offset.  Numbers are the LINKTYPE_ values of pcap files
(https://www.tcpdump.org/linktypes.html), which equal the DLT_ values except where noted.
"""

from __future__ import annotations

import struct
from typing import Final

from callcap.errors import ParseError

# -- link types ----------------------------------------------------------------------------------
DLT_NULL: Final = 0  # BSD loopback: 4-byte address family in the *capturing host's* byte order
DLT_EN10MB: Final = 1
DLT_RAW_12: Final = 12  # raw IP as DLT_RAW is numbered by most BSDs / libpcap's DLT_RAW
DLT_RAW_14: Final = 14  # raw IP as DLT_RAW is numbered by OpenBSD
DLT_RAW: Final = 101  # LINKTYPE_RAW: what pcap files carry for raw IP
DLT_LOOP: Final = 108  # OpenBSD loopback: the same family field, always network byte order
DLT_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
DLT_LINUX_SLL2: Final = 276

# -- protocol numbers in EtherType space ----------------------------------------------------------
ETH_IPV4: Final = 0x0800
ETH_IPV6: Final = 0x86DD
ETH_TEB: Final = 0x6558  # transparent Ethernet bridging (an Ethernet frame inside GRE)
ETH_MPLS: Final = 0x8847
ETH_MPLS_MC: Final = 0x8848
ETH_PPPOE_SESSION: Final = 0x8864
# 802.1Q, 802.1ad and the pre-standard QinQ tags seen on older switches, at any depth.
VLAN_TAGS: Final = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
NON_IP: Final = 0  # returned for a frame that carries something other than IP

# Address families of the NULL/LOOP header.  AF_INET is 2 everywhere; AF_INET6 differs per OS
# (24 NetBSD/OpenBSD, 28 FreeBSD, 30 macOS; 10 is Linux, written by some tools).
_AF_TO_ETH: Final = {2: ETH_IPV4, 10: ETH_IPV6, 24: ETH_IPV6, 28: ETH_IPV6, 30: ETH_IPV6}

_U16 = struct.Struct("!H")
_U32_BE = struct.Struct("!I")
_U32_LE = struct.Struct("<I")
_RAW_TYPES: Final = frozenset({DLT_RAW, DLT_RAW_12, DLT_RAW_14})
_MAX_TAGS: Final = 8


def _skip_vlan_tags(buf: bytes, off: int, etype: int) -> tuple[int, int]:
    """Walk 802.1Q/802.1ad tags from ``off``: the inner EtherType and its offset."""
    n = len(buf)
    tags = 0
    while etype in VLAN_TAGS:
        tags += 1
        if tags > _MAX_TAGS:
            raise ParseError("link_bad_header", f"more than {_MAX_TAGS} VLAN tags")
        if off + 4 > n:
            raise _short("VLAN tag", 4, n - off)
        (etype,) = _U16.unpack_from(buf, off + 2)
        off += 4
    return etype, off


def _short(what: str, need: int, have: int) -> ParseError:
    return ParseError("link_truncated", f"{what}: need {need} bytes, frame has {have}")


def ip_version_type(buf: bytes, off: int) -> int:
    """EtherType for a bare IP packet, from its version nibble (raw-IP links, MPLS, GRE)."""
    if off >= len(buf):
        raise ParseError("ip_truncated", "raw IP frame is empty")
    version = buf[off] >> 4
    if version == 4:
        return ETH_IPV4
    if version == 6:
        return ETH_IPV6
    raise ParseError("ip_bad_version", f"raw IP packet: expected version 4 or 6, found {version}")


def ethernet(buf: bytes, off: int) -> tuple[int, int]:
    """Ethernet II / 802.3 header at ``off`` with any stack of VLAN tags → (ethertype, offset).

    Tags are popped whatever their TPID (802.1Q, 802.1ad, pre-standard QinQ); 802.3 frames
    with LLC/SNAP are followed to the SNAP EtherType (RFC 1042); PPPoE sessions (RFC 2516, the
    DSL uplink of many small offices) to the PPP protocol; MPLS label stacks are popped
    down to the bottom-of-stack label and the payload's IP version read from its first nibble
    (RFC 3032 §2.1 leaves the payload type to the label, which a passive observer cannot know).
    """
    n = len(buf)
    if off + 14 > n:
        raise _short("Ethernet header", 14, n - off)
    (etype,) = _U16.unpack_from(buf, off + 12)
    off += 14
    etype, off = _skip_vlan_tags(buf, off, etype)
    if etype < 0x0600:  # IEEE 802.3 length field: LLC follows
        if buf[off : off + 3] == b"\xaa\xaa\x03" and off + 8 <= n:  # SNAP
            (etype,) = _U16.unpack_from(buf, off + 6)
            return etype, off + 8
        return NON_IP, off
    if etype in (ETH_MPLS, ETH_MPLS_MC):
        return mpls(buf, off)
    if etype == ETH_PPPOE_SESSION:
        return pppoe(buf, off)
    return etype, off


# PPP protocol numbers (RFC 1332 §2 for IPv4, RFC 5072 §3 for IPv6) → EtherType space
_PPP_TO_ETH: Final = {0x0021: ETH_IPV4, 0x0057: ETH_IPV6}


def pppoe(buf: bytes, off: int) -> tuple[int, int]:
    """PPPoE session header (RFC 2516 §4) and the PPP protocol field → (ethertype, offset).

    The protocol field may be compressed to one byte (RFC 1661 §6.5: odd first byte).
    """
    n = len(buf)
    if off + 7 > n:
        raise _short("PPPoE session header", 8, n - off)
    off += 6
    if buf[off] & 0x01:
        proto = buf[off]
        off += 1
    else:
        if off + 2 > n:
            raise _short("PPP protocol field", 2, n - off)
        (proto,) = _U16.unpack_from(buf, off)
        off += 2
    return _PPP_TO_ETH.get(proto, NON_IP), off


def mpls(buf: bytes, off: int) -> tuple[int, int]:
    """Pop an MPLS label stack (RFC 3032 §2.1) → (ethertype of the payload, offset)."""
    n = len(buf)
    for _ in range(_MAX_TAGS):
        if off + 4 > n:
            raise _short("MPLS label", 4, n - off)
        bottom = buf[off + 2] & 0x01
        off += 4
        if bottom:
            if off >= n:
                raise _short("MPLS payload", 1, 0)
            version = buf[off] >> 4
            if version == 4:
                return ETH_IPV4, off
            if version == 6:
                return ETH_IPV6, off
            return NON_IP, off  # pseudowire with control word, or something else
    raise ParseError("link_bad_header", f"more than {_MAX_TAGS} MPLS labels")


def link_payload(linktype: int, frame: bytes) -> tuple[int, int]:
    """Strip the link header of ``frame`` → (EtherType-space protocol, offset of its payload).

    Raises ParseError ``link_unsupported`` for a link type we do not decode and
    ``link_truncated`` for a frame shorter than its link header.
    """
    n = len(frame)
    if linktype == DLT_EN10MB:
        return ethernet(frame, 0)
    if linktype == DLT_LINUX_SLL:
        # packet type, ARPHRD type, address length, 8 address bytes, protocol (16 bytes)
        if n < 16:
            raise _short("Linux cooked (SLL) header", 16, n)
        (proto,) = _U16.unpack_from(frame, 14)
        return _sll_proto(proto, frame, 16)
    if linktype == DLT_LINUX_SLL2:
        # protocol, reserved, ifindex, ARPHRD type, packet type, address length, address (20)
        if n < 20:
            raise _short("Linux cooked v2 (SLL2) header", 20, n)
        (proto,) = _U16.unpack_from(frame, 0)
        return _sll_proto(proto, frame, 20)
    if linktype in _RAW_TYPES:
        return ip_version_type(frame, 0), 0
    if linktype == LINKTYPE_IPV4:
        return ETH_IPV4, 0
    if linktype == LINKTYPE_IPV6:
        return ETH_IPV6, 0
    if linktype in (DLT_NULL, DLT_LOOP):
        if n < 4:
            raise _short("loopback header", 4, n)
        if linktype == DLT_LOOP:
            (family,) = _U32_BE.unpack_from(frame, 0)
        else:
            # Host byte order of a machine we do not know: families are small numbers, so a
            # value that only fits in the high half was written little-endian (libpcap does
            # the same swap test).
            (family,) = _U32_LE.unpack_from(frame, 0)
            if family > 0xFFFF:
                (family,) = _U32_BE.unpack_from(frame, 0)
        return _AF_TO_ETH.get(family, NON_IP), 4
    raise ParseError("link_unsupported", f"link type {linktype} is not decoded")


def _sll_proto(proto: int, frame: bytes, off: int) -> tuple[int, int]:
    """The SLL protocol field is an EtherType, except values < 0x0600 (802.3/LLC payloads)."""
    if proto < 0x0600:
        return NON_IP, off
    # a VLAN tag the kernel did not strip: walk it as an Ethernet tag stack
    proto, off = _skip_vlan_tags(frame, off, proto)
    if proto in (ETH_MPLS, ETH_MPLS_MC):
        return mpls(frame, off)
    if proto == ETH_PPPOE_SESSION:
        return pppoe(frame, off)
    return proto, off
