"""IPv4/IPv6 headers, UDP/TCP lengths, and what malformed or truncated frames cost."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import CookedLinux, Dot1Q, Ether
from scapy.packet import Packet

from callcap.capture.decode import Datagram, PacketDecoder
from callcap.errors import ParseError

A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
PAYLOAD = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"


def _eth(**fields: int) -> Packet:
    """Ethernet with fixed MACs: scapy would otherwise resolve the destination (slow)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **fields)


def _decode(frame: bytes, linktype: int = 1) -> Datagram | None:
    return PacketDecoder().decode(0.0, linktype, frame)


def _reason(frame: bytes, linktype: int = 1) -> str:
    with pytest.raises(ParseError) as err:
        _decode(frame, linktype)
    return err.value.reason


def test_ipv4_options_are_skipped() -> None:
    frame = bytes(
        _eth()
        / IP(src=A4, dst=B4, options=[IPOption_RR(routers=["10.0.0.1"])])
        / UDP(sport=1, dport=2)
        / PAYLOAD
    )
    assert frame[14] & 0x0F > 5
    dg = _decode(frame)
    assert dg is not None
    assert dg.payload == PAYLOAD
    assert (dg.sport, dg.dport) == (1, 2)


def test_ethernet_padding_beyond_ip_total_length_is_cut_off() -> None:
    frame = bytes(_eth() / IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"hi")
    padded = frame + b"\x00" * (60 - len(frame)) + b"FCS!"
    for candidate in (
        padded,
        bytes(_eth() / Dot1Q(vlan=3) / IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"hi")
        + b"\xee" * 20,
    ):
        dg = _decode(candidate)
        assert dg is not None
        assert dg.payload == b"hi"


def test_ipv6_padding_beyond_payload_length_is_cut_off() -> None:
    frame = (
        bytes(CookedLinux(proto=0x86DD) / IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"v6")
        + b"\x00" * 9
    )
    dg = _decode(frame, 113)
    assert dg is not None
    assert dg.payload == b"v6"


def test_udp_payload_is_cut_to_the_udp_length() -> None:
    ip = IP(src=A4, dst=B4) / UDP(sport=1, dport=2, len=8 + 3) / b"abcdef"
    dg = _decode(bytes(ip), 101)
    assert dg is not None
    assert dg.payload == b"abc"


def test_ipv6_extension_headers_are_walked_to_udp() -> None:
    pkt = (
        IPv6(src=A6, dst=B6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=["2001:db8::99"])
        / AH(spi=1, icv=b"\x00" * 12)
        / IPv6ExtHdrFragment(offset=0, m=0, id=7)  # atomic fragment (RFC 6946)
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5060, dport=5060)
        / PAYLOAD
    )
    dg = _decode(bytes(pkt), 101)
    assert dg is not None
    assert dg.payload == PAYLOAD
    assert dg.src == bytes.fromhex("20010db8000000000000000000000001")


def test_ipv6_no_next_header_is_not_interesting() -> None:
    decoder = PacketDecoder()
    assert decoder.decode(0.0, 229, bytes(IPv6(src=A6, dst=B6, nh=59) / b"junk")) is None
    assert decoder.counters["ip_other_proto"] == 1


def test_tcp_segment_fields_and_options() -> None:
    seg = TCP(
        sport=5060,
        dport=40000,
        seq=0xFFFFFFF0,
        flags="PA",
        options=[("MSS", 1460), ("NOP", None), ("WScale", 7)],
    )
    dg = _decode(bytes(_eth() / IP(src=A4, dst=B4) / seg / PAYLOAD))
    assert dg is not None
    assert (dg.proto, dg.sport, dg.dport, dg.tcp_seq, dg.tcp_flags) == (
        6,
        5060,
        40000,
        0xFFFFFFF0,
        0x18,
    )
    assert dg.payload == PAYLOAD


def test_other_ip_protocols_are_counted() -> None:
    decoder = PacketDecoder()
    assert decoder.decode(0.0, 101, bytes(IP(src=A4, dst=B4, proto=132) / (b"\x00" * 12))) is None
    assert decoder.counters["ip_other_proto"] == 1


def _ip4_header(**fields: int) -> bytes:
    return bytes(IP(src=A4, dst=B4, **fields) / UDP(sport=1, dport=2) / b"data")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x55" + bytes(IP())[1:], "ip_bad_version"),
        (b"\x44" + bytes(IP() / UDP())[1:], "ip_bad_header"),  # IHL 4
        (_ip4_header(len=200), "ip_truncated"),
        (_ip4_header(len=12, ihl=5), "ip_bad_length"),
        (bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2, len=4) / b"x"), "udp_bad_length"),
        (bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2, len=99) / b"x"), "udp_truncated"),
        (bytes(IP(src=A4, dst=B4) / TCP(dataofs=4)), "tcp_bad_header"),
        (bytes(IP(src=A4, dst=B4) / TCP(dataofs=15)), "tcp_truncated"),
        (bytes(IPv6(src=A6, dst=B6, plen=300) / UDP() / b"x"), "ip_truncated"),
        (bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt(len=20) / UDP()), "ip_truncated"),
    ],
)
def test_malformed_packets_raise_parse_error_with_reason(frame: bytes, reason: str) -> None:
    assert _reason(frame, 101) == reason


SAMPLES: dict[str, tuple[int, Packet]] = {
    "eth_ip4_udp": (1, _eth() / IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / PAYLOAD),
    "vlan_ip6_tcp": (
        1,
        _eth() / Dot1Q() / IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / TCP() / PAYLOAD,
    ),
    "sll_ip4_options": (
        113,
        CookedLinux(proto=0x0800) / IP(options=[IPOption_RR()]) / UDP() / b"x",
    ),
    "raw_ip6_frag": (101, IPv6() / IPv6ExtHdrFragment(m=1, id=3) / UDP() / b"12345678"),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_frame_cut_at_every_length_is_none_or_parse_error(name: str) -> None:
    linktype, pkt = SAMPLES[name]
    frame = bytes(pkt)
    for cut in range(len(frame)):
        with contextlib.suppress(ParseError):
            PacketDecoder().decode(0.0, linktype, frame[:cut])


LINKTYPES = st.sampled_from([0, 1, 12, 14, 101, 108, 113, 228, 229, 276])


@settings(max_examples=400, deadline=None)
@given(LINKTYPES, st.binary(max_size=200))
def test_random_bytes_raise_nothing_but_parse_error(linktype: int, data: bytes) -> None:
    with contextlib.suppress(ParseError):
        PacketDecoder().decode(0.0, linktype, data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 0xFF), st.integers(0, 0xFFFF))
def test_random_transport_behind_valid_ip_headers_is_contained(
    body: bytes, proto: int, frag: int
) -> None:
    header = bytearray(bytes(IP(src=A4, dst=B4, proto=proto)))
    total = len(header) + len(body)
    struct.pack_into("!HHH", header, 2, total, 1, frag)
    with contextlib.suppress(ParseError):
        PacketDecoder().decode(0.0, 1, bytes(_eth()) + bytes(header) + body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=150), st.sampled_from([0, 43, 44, 51, 60, 6, 17, 47, 4, 41]))
def test_random_ipv6_extension_chains_are_contained(body: bytes, nh: int) -> None:
    header = bytes(IPv6(src=A6, dst=B6, nh=nh, plen=len(body)))
    with contextlib.suppress(ParseError):
        PacketDecoder().decode(0.0, 229, header + body)
