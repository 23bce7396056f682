"""Every link layer and mirror tunnel decodes to the same UDP datagram."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III, ERSPAN_PlatformSpecific
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import GRE, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import (
    ARP,
    LLC,
    SNAP,
    CookedLinux,
    CookedLinuxV2,
    Dot1AD,
    Dot1Q,
    Ether,
    Loopback,
    LoopbackOpenBSD,
)
from scapy.layers.ppp import PPP, PPPoE
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet

from callcap.capture.decode import Datagram, PacketDecoder
from callcap.capture.pcapfile import CaptureReader
from callcap.errors import ParseError

SIP = b"INVITE sip:bob@example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n"

A4, B4 = "192.0.2.10", "198.51.100.20"
A6, B6 = "2001:db8::10", "2001:db8::20"
PACKED_A4, PACKED_B4 = bytes([192, 0, 2, 10]), bytes([198, 51, 100, 20])
PACKED_A6 = bytes.fromhex("20010db8000000000000000000000010")
PACKED_B6 = bytes.fromhex("20010db8000000000000000000000020")


def _eth(**fields: int) -> Packet:
    """Ethernet with fixed MACs: scapy would otherwise resolve the destination (slow)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **fields)


def _ip4() -> Packet:
    return IP(src=A4, dst=B4) / UDP(sport=5060, dport=5080) / SIP


def _ip6() -> Packet:
    return IPv6(src=A6, dst=B6) / UDP(sport=5060, dport=5080) / SIP


def _decode(linktype: int, frame: bytes) -> Datagram | None:
    return PacketDecoder().decode(1.0, linktype, frame)


def _assert_sip4(dg: Datagram | None) -> None:
    assert dg == Datagram(17, PACKED_A4, 5060, PACKED_B4, 5080, SIP, 0, 0)


def _assert_sip6(dg: Datagram | None) -> None:
    assert dg == Datagram(17, PACKED_A6, 5060, PACKED_B6, 5080, SIP, 0, 0)


ETHERNET_FRAMES = {
    "plain": _eth() / _ip4(),
    "dot1q": _eth() / Dot1Q(vlan=100) / _ip4(),
    "qinq_88a8": _eth() / Dot1AD(vlan=10) / Dot1Q(vlan=20) / _ip4(),
    "qinq_9100": _eth(type=0x9100) / Dot1Q(vlan=10) / Dot1Q(vlan=20) / Dot1Q(vlan=30) / _ip4(),
    "pppoe": _eth() / PPPoE(sessionid=7) / PPP(proto=0x0021) / _ip4(),
    "mpls": _eth() / MPLS(label=16, s=0) / MPLS(label=17, s=1) / _ip4(),
    "snap": _eth(type=None) / LLC(dsap=0xAA, ssap=0xAA, ctrl=3) / SNAP(code=0x0800) / _ip4(),
}


@pytest.mark.parametrize("name", sorted(ETHERNET_FRAMES))
def test_ethernet_variants_reach_the_udp_payload(name: str) -> None:
    _assert_sip4(_decode(1, bytes(ETHERNET_FRAMES[name])))


def test_ethernet_ipv6_reaches_the_udp_payload() -> None:
    _assert_sip6(_decode(1, bytes(_eth() / Dot1Q(vlan=5) / _ip6())))


def test_linux_cooked_v1_and_v2() -> None:
    _assert_sip4(_decode(113, bytes(CookedLinux(pkttype=0, proto=0x0800) / _ip4())))
    _assert_sip6(_decode(113, bytes(CookedLinux(proto=0x86DD) / _ip6())))
    _assert_sip4(_decode(276, bytes(CookedLinuxV2(proto=0x0800) / _ip4())))
    # SLL2 by hand (draft-ietf-opsawg-pcaplinktype: protocol, reserved, ifindex, ARPHRD, type,
    # address length, 8 address bytes), to not depend on scapy's layout alone.
    header = struct.pack("!HHIHBB8s", 0x86DD, 0, 3, 1, 4, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00")
    _assert_sip6(_decode(276, header + bytes(_ip6())))


@pytest.mark.parametrize("linktype", [101, 12, 14])
def test_raw_ip_link_types_read_the_version_nibble(linktype: int) -> None:
    _assert_sip4(_decode(linktype, bytes(_ip4())))
    _assert_sip6(_decode(linktype, bytes(_ip6())))


def test_ipv4_and_ipv6_only_link_types() -> None:
    _assert_sip4(_decode(228, bytes(_ip4())))
    _assert_sip6(_decode(229, bytes(_ip6())))


@pytest.mark.parametrize("af_inet6", [24, 28, 30, 10])
@pytest.mark.parametrize("order", ["<", ">"])
def test_null_loopback_in_either_host_byte_order(order: str, af_inet6: int) -> None:
    _assert_sip4(_decode(0, struct.pack(order + "I", 2) + bytes(_ip4())))
    _assert_sip6(_decode(0, struct.pack(order + "I", af_inet6) + bytes(_ip6())))


def test_scapy_loopback_headers() -> None:
    _assert_sip4(_decode(0, bytes(Loopback(type=2) / _ip4())))
    _assert_sip4(_decode(108, bytes(LoopbackOpenBSD(type=2) / _ip4())))
    _assert_sip6(_decode(108, struct.pack("!I", 24) + bytes(_ip6())))


def test_non_ip_frames_are_counted_not_errors() -> None:
    decoder = PacketDecoder()
    assert decoder.decode(0.0, 1, bytes(_eth() / ARP())) is None
    assert (
        decoder.decode(0.0, 1, bytes(_eth(type=None) / LLC(dsap=0x42, ssap=0x42) / (b"stp" * 10)))
        is None
    )
    assert decoder.decode(0.0, 0, struct.pack("<I", 7) + bytes(_ip4())) is None  # unknown AF
    assert decoder.counters["non_ip"] == 3


def test_unknown_link_type_is_link_unsupported() -> None:
    with pytest.raises(ParseError) as err:
        _decode(147, bytes(_ip4()))
    assert err.value.reason == "link_unsupported"


# -- mirror tunnels -------------------------------------------------------------------------------

OUTER = IP(src="10.9.9.1", dst="10.9.9.2")
INNER = _eth() / _ip4()

TUNNELS = {
    "erspan_i": OUTER / GRE(proto=0x88BE) / INNER,
    "erspan_ii": OUTER
    / GRE(proto=0x88BE, seqnum_present=1, sequence_number=9)
    / ERSPAN_II(session_id=3)
    / INNER,
    "erspan_iii": OUTER / GRE(proto=0x22EB, seqnum_present=1) / ERSPAN_III(session_id=4) / INNER,
    "erspan_iii_subheader": OUTER
    / GRE(proto=0x22EB, seqnum_present=1)
    / ERSPAN_III(session_id=4, o=1)
    / ERSPAN_PlatformSpecific()
    / INNER,
    "gre_teb_with_key": OUTER / GRE(proto=0x6558, key_present=1, key=77) / INNER,
    "gre_ip": OUTER / GRE(proto=0x0800, chksum_present=1) / _ip4(),
    "ip_in_ip": OUTER / _ip4(),
    "vxlan": OUTER / UDP(sport=40000, dport=4789) / VXLAN(vni=5) / INNER,
}


@pytest.mark.parametrize("name", sorted(TUNNELS))
def test_mirror_tunnels_yield_the_inner_datagram(name: str) -> None:
    _assert_sip4(_decode(1, bytes(_eth() / TUNNELS[name])))


def test_gre_version_1_is_not_decoded() -> None:
    decoder = PacketDecoder()
    frame = bytes(_eth() / OUTER / GRE(version=1, proto=0x880B) / (b"\x00" * 8))
    assert decoder.decode(0.0, 1, frame) is None
    assert decoder.counters["gre_unsupported"] == 1


def test_rtcp_on_the_vxlan_port_stays_plain_udp() -> None:
    rtcp = b"\x80\xc8\x00\x06" + b"\x00" * 24  # sender report: no VXLAN I flag
    dg = _decode(1, bytes(_eth() / IP(src=A4, dst=B4) / UDP(sport=4788, dport=4789) / rtcp))
    assert dg is not None
    assert dg.payload == rtcp


def test_nested_tunnels_are_bounded() -> None:
    pkt: Packet = _ip4()
    for _ in range(6):
        pkt = IP(src="10.0.0.1", dst="10.0.0.2") / GRE(proto=0x0800) / pkt
    with pytest.raises(ParseError) as err:
        _decode(101, bytes(pkt))
    assert err.value.reason == "tunnel_too_deep"


def test_erspan_corpus_capture_yields_every_sip_message(
    corpus: Path, corpus_facts: dict[str, Any]
) -> None:
    name = "erspan_sip_ipv4_udp.pcapng"
    decoder = PacketDecoder()
    messages = 0
    with CaptureReader(corpus / name) as reader:
        for ts, linktype, frame in reader:
            dg = decoder.decode(ts, linktype, frame)
            assert dg is not None
            assert dg.proto == 17
            first_line = dg.payload.split(b"\r\n", 1)[0]
            assert first_line.endswith(b" SIP/2.0") or first_line.startswith(b"SIP/2.0 ")
            messages += 1
    assert messages == corpus_facts[name]["sip_messages"]


def test_fast_path_agrees_with_general_path_on_every_corpus_frame(
    corpus: Path, corpus_facts: dict[str, Any]
) -> None:
    fast, general = PacketDecoder(), PacketDecoder()
    compared = 0
    for name in sorted(corpus_facts):
        with CaptureReader(corpus / name) as reader:
            for ts, linktype, frame in reader:
                try:
                    want: object = general.decode_general(ts, linktype, frame)
                except ParseError as exc:
                    want = exc.reason
                try:
                    got: object = fast.decode(ts, linktype, frame)
                except ParseError as exc:
                    got = exc.reason
                assert got == want, (name, compared)
                compared += 1
    assert compared > 20000
