"""Captured frame → UDP or TCP datagram: link, IP (with reassembly), tunnels, transport.

``PacketDecoder.decode`` runs once per captured packet, so the case that is nearly all of a
recorder's traffic — RTP in untagged Ethernet / IPv4 without options or fragmentation /
UDP — is decoded by a single ``unpack_from`` of the first 42 bytes and one tuple
construction.  Everything else (VLANs, cooked and loopback links, IPv6, options, fragments,
GRE/ERSPAN/VXLAN mirror tunnels, TCP, malformed input) takes the general path, which
re-checks from scratch, so the fast path only has to be right when it answers.

Outcomes: a :class:`Datagram`; ``None`` for a frame that is valid but of no interest (ARP,
ICMP, a fragment still waiting for the rest …), counted in :attr:`PacketDecoder.counters`;
or :class:`~callcap.errors.ParseError` for a malformed frame, its ``reason`` naming the rule.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Final, NamedTuple

from callcap.capture.fragments import FragmentReassembler
from callcap.capture.ip import (
    NOT_FRAGMENT,
    PROTO_GRE,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_TCP,
    PROTO_UDP,
    parse_ipv4,
    parse_ipv6,
    walk_ipv6_extensions,
)
from callcap.capture.link import (
    ETH_IPV4,
    ETH_IPV6,
    ETH_TEB,
    ethernet,
    ip_version_type,
    link_payload,
)
from callcap.errors import ParseError

VXLAN_PORT: Final = 4789  # RFC 7348 §5
ETH_ERSPAN_II: Final = 0x88BE  # also ERSPAN type I, which has no ERSPAN header
ETH_ERSPAN_III: Final = 0x22EB
MAX_TUNNEL_DEPTH: Final = 4

# Ethernet (EtherType) + IPv4 without options + UDP header, the fast path's one unpack:
# ethertype, version/IHL, total length, flags/fragment offset, protocol, src, dst,
# source port, destination port, UDP length.
_fast_unpack = struct.Struct("!12xHBxHxxHxBxx4s4sHHH").unpack_from
_UDP = struct.Struct("!HHH")
_TCP = struct.Struct("!HHI4xBB")  # ports, sequence number, data offset, flags
_GRE = struct.Struct("!HH")
_new = tuple.__new__


class Datagram(NamedTuple):
    """A transport-layer datagram (UDP) or segment (TCP), with packed IP addresses."""

    proto: int  # 17 UDP, 6 TCP
    src: bytes  # packed IP address, 4 or 16 bytes
    sport: int
    dst: bytes
    dport: int
    payload: bytes
    tcp_seq: int  # TCP only, else 0
    tcp_flags: int  # TCP only, else 0 (CWR ECE URG ACK PSH RST SYN FIN, as on the wire)


class PacketDecoder:
    """Sans-IO frame decoder holding the only cross-packet state: IP fragments in flight."""

    def __init__(
        self, *, max_fragment_datagrams: int = 1024, fragment_timeout_s: float = 30.0
    ) -> None:
        self.counters: Counter[str] = Counter()
        self.fragments = FragmentReassembler(
            max_datagrams=max_fragment_datagrams,
            timeout_s=fragment_timeout_s,
            counters=self.counters,
        )

    def decode(self, ts: float, linktype: int, frame: bytes) -> Datagram | None:
        """Decode one captured frame taken at capture time ``ts`` (seconds)."""
        # Fast path; literals instead of the named constants save a global lookup each:
        # 1 = DLT_EN10MB, 0x0800 = IPv4, 0x45 = version 4 without options, 17 = UDP,
        # 0x3FFF = MF flag and fragment offset, 4789 = VXLAN.
        if linktype == 1 and len(frame) >= 42:
            etype, vihl, total, frag, proto, src, dst, sport, dport, ulen = _fast_unpack(frame)
            if (
                etype == 0x0800
                and vihl == 0x45
                and proto == 17
                and not frag & 0x3FFF
                and 8 <= ulen <= total - 20
                and total + 14 <= len(frame)
                and dport != 4789
            ):
                return _new(Datagram, (17, src, sport, dst, dport, frame[42 : 34 + ulen], 0, 0))
        return self.decode_general(ts, linktype, frame)

    def decode_general(self, ts: float, linktype: int, frame: bytes) -> Datagram | None:
        """:meth:`decode` without its fast path; tests use it to check the two agree."""
        etype, off = link_payload(linktype, frame)
        return self._network(ts, etype, frame, off, len(frame), 0)

    def expire(self, now: float) -> int:
        """Drop fragment sets older than the timeout at capture time ``now`` → how many."""
        return self.fragments.expire(now)

    # -- general path ----------------------------------------------------------------------------

    def _network(
        self, ts: float, etype: int, buf: bytes, off: int, end: int, depth: int
    ) -> Datagram | None:
        if etype == ETH_IPV4:
            pkt = parse_ipv4(buf, off, end)
        elif etype == ETH_IPV6:
            pkt = parse_ipv6(buf, off, end)
        else:
            self.counters["non_ip"] += 1
            return None
        proto = pkt.proto
        start = pkt.start
        stop = pkt.end
        if pkt.frag_id != NOT_FRAGMENT:
            if len(pkt.src) == 4:
                key = (pkt.src, pkt.dst, pkt.frag_id, proto)
            else:  # RFC 8200 §4.5: (src, dst, id); only the first fragment's next header counts
                key = (pkt.src, pkt.dst, pkt.frag_id, -1)
            whole = self.fragments.add(
                ts,
                key,
                proto=proto,
                offset=pkt.frag_offset,
                more=pkt.more_fragments,
                data=buf[start:stop],
            )
            if whole is None:
                return None
            proto, buf = whole
            start = 0
            stop = len(buf)
            if len(pkt.src) == 16:
                proto, start, again = walk_ipv6_extensions(proto, buf, 0, stop)
                if again is not None:
                    raise ParseError(
                        "ip_bad_header", "fragment header inside a reassembled datagram"
                    )
        return self._transport(ts, proto, pkt.src, pkt.dst, buf, start, stop, depth)

    def _transport(
        self,
        ts: float,
        proto: int,
        src: bytes,
        dst: bytes,
        buf: bytes,
        off: int,
        end: int,
        depth: int,
    ) -> Datagram | None:
        avail = end - off
        if proto == PROTO_UDP:
            if avail < 8:
                raise ParseError("udp_truncated", f"UDP header: need 8 bytes, have {avail}")
            sport, dport, ulen = _UDP.unpack_from(buf, off)
            if ulen < 8:
                raise ParseError("udp_bad_length", f"UDP length {ulen} < 8")
            if ulen > avail:
                raise ParseError(
                    "udp_truncated", f"UDP length {ulen}, only {avail} bytes in packet"
                )
            if dport == VXLAN_PORT and _is_vxlan(buf, off + 8, off + ulen, depth):
                self.counters["vxlan"] += 1
                return self._inner_ethernet(ts, buf, off + 16, off + ulen, depth)
            return _new(
                Datagram, (PROTO_UDP, src, sport, dst, dport, buf[off + 8 : off + ulen], 0, 0)
            )
        if proto == PROTO_TCP:
            if avail < 20:
                raise ParseError("tcp_truncated", f"TCP header: need 20 bytes, have {avail}")
            sport, dport, seq, doff, flags = _TCP.unpack_from(buf, off)
            hlen = (doff >> 4) * 4
            if hlen < 20:
                raise ParseError("tcp_bad_header", f"TCP data offset {hlen} < 20 bytes")
            if hlen > avail:
                raise ParseError(
                    "tcp_truncated", f"TCP header of {hlen} bytes, only {avail} in packet"
                )
            return _new(
                Datagram, (PROTO_TCP, src, sport, dst, dport, buf[off + hlen : end], seq, flags)
            )
        if proto == PROTO_GRE:
            return self._gre(ts, buf, off, end, depth)
        if proto in (PROTO_IPIP, PROTO_IPV6):  # IP in IP (RFC 2003) / IPv6 in IP (RFC 4213)
            self._check_depth(depth)
            etype = ETH_IPV4 if proto == PROTO_IPIP else ETH_IPV6
            return self._network(ts, etype, buf[off:end], 0, end - off, depth + 1)
        self.counters["ip_other_proto"] += 1
        return None

    @staticmethod
    def _check_depth(depth: int) -> None:
        if depth >= MAX_TUNNEL_DEPTH:
            raise ParseError("tunnel_too_deep", f"more than {MAX_TUNNEL_DEPTH} nested tunnels")

    def _gre(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> Datagram | None:
        """GRE (RFC 2784, key and sequence RFC 2890) as used by port mirroring.

        ERSPAN type I has no header of its own (GRE without sequence number), type II an
        8-byte header (GRE with sequence number), type III 12 bytes plus an optional 8-byte
        platform sub-header when its O flag is set; all carry the mirrored Ethernet frame.
        """
        self._check_depth(depth)
        if end - off < 4:
            raise ParseError("gre_truncated", "GRE header cut short")
        flags, etype = _GRE.unpack_from(buf, off)
        if flags & 0x4007:  # version 1 (PPTP, RFC 2637) or source routing (RFC 1701)
            self.counters["gre_unsupported"] += 1
            return None
        pos = off + 4 + 4 * (bool(flags & 0x8000) + bool(flags & 0x2000) + bool(flags & 0x1000))
        if etype == ETH_ERSPAN_II:
            if flags & 0x1000:
                pos += 8
            return self._inner_ethernet(ts, buf, pos, end, depth)
        if etype == ETH_ERSPAN_III:
            if pos + 12 > end:
                raise ParseError("gre_truncated", "ERSPAN type III header cut short")
            frame_type = (buf[pos + 10] >> 2) & 0x1F
            sub_header = buf[pos + 11] & 0x01
            pos += 20 if sub_header else 12
            if frame_type == 0:
                return self._inner_ethernet(ts, buf, pos, end, depth)
            if frame_type == 2 and pos < end:  # IP frame without link header
                inner = buf[pos:end]
                return self._network(ts, ip_version_type(inner, 0), inner, 0, len(inner), depth + 1)
            self.counters["gre_unsupported"] += 1
            return None
        if etype == ETH_TEB:
            return self._inner_ethernet(ts, buf, pos, end, depth)
        if etype in (ETH_IPV4, ETH_IPV6):
            inner = buf[pos:end]
            return self._network(ts, etype, inner, 0, len(inner), depth + 1)
        self.counters["gre_unsupported"] += 1
        return None

    def _inner_ethernet(
        self, ts: float, buf: bytes, pos: int, end: int, depth: int
    ) -> Datagram | None:
        if pos > end:
            raise ParseError("gre_truncated", "tunnel header longer than the packet")
        inner = buf[pos:end]
        etype, off = ethernet(inner, 0)
        return self._network(ts, etype, inner, off, len(inner), depth + 1)


def _is_vxlan(buf: bytes, off: int, end: int, depth: int) -> bool:
    """A VXLAN header (RFC 7348 §5: I flag set) followed by room for an Ethernet header.

    Port 4789 is odd, so it is never an RTP port (RFC 3550 §11), but it can be RTCP: a
    payload without the I flag stays plain UDP.
    """
    return end - off >= 8 + 14 and buf[off] & 0x08 != 0 and depth < MAX_TUNNEL_DEPTH
