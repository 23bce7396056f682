"""IP fragment reassembly: order, duplicates, conflicts, time and space bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from callcap.capture.decode import Datagram, PacketDecoder
from callcap.capture.pcapfile import CaptureReader
from callcap.errors import ParseError

A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
# A SIP INVITE with SDP larger than one MTU, the case reassembly exists for.
SIP = (
    b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1\r\n"
    b"Content-Length: 2000\r\n\r\n" + bytes(range(256)) * 8
)[:2100]


def _eth(pkt: Packet) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt)


def _fragments4(ident: int = 4242, size: int = 600, payload: bytes = SIP) -> list[bytes]:
    pkt = IP(src=A4, dst=B4, id=ident) / UDP(sport=5060, dport=5060) / payload
    return [_eth(f) for f in fragment(pkt, fragsize=size)]


def _expected4(payload: bytes = SIP) -> Datagram:
    return Datagram(17, bytes([192, 0, 2, 1]), 5060, bytes([192, 0, 2, 2]), 5060, payload, 0, 0)


def _feed(decoder: PacketDecoder, frames: list[bytes], ts: float = 1.0) -> list[Datagram]:
    out = []
    for frame in frames:
        dg = decoder.decode(ts, 1, frame)
        if dg is not None:
            out.append(dg)
    return out


def test_ipv4_fragments_in_order_reassemble() -> None:
    decoder = PacketDecoder()
    frames = _fragments4()
    assert len(frames) == 4
    assert _feed(decoder, frames) == [_expected4()]
    assert decoder.counters["fragments_reassembled"] == 1
    assert len(decoder.fragments) == 0


def test_ipv4_fragments_in_reverse_order_reassemble() -> None:
    decoder = PacketDecoder()
    assert _feed(decoder, _fragments4()[::-1]) == [_expected4()]


def test_duplicate_fragments_are_ignored() -> None:
    decoder = PacketDecoder()
    frames = _fragments4()
    assert _feed(decoder, [frames[1], frames[1], frames[0], frames[2], frames[0], frames[3]]) == [
        _expected4()
    ]
    assert decoder.counters["fragments_duplicate"] == 2
    # A copy arriving after completion starts a new set that never completes: no second datagram.
    assert _feed(decoder, [frames[2]]) == []


def test_consistent_overlap_is_accepted() -> None:
    pkt = IP(src=A4, dst=B4, id=9, proto=17) / UDP(sport=5060, dport=5060) / SIP
    whole = bytes(pkt)
    body = whole[20:]
    first = IP(src=A4, dst=B4, id=9, proto=17, flags="MF", frag=0) / body[:800]
    overlapping = (
        IP(src=A4, dst=B4, id=9, proto=17, flags="MF", frag=50) / body[400:1200]
    )  # 400..1200
    last = IP(src=A4, dst=B4, id=9, proto=17, frag=100) / body[800:]
    decoder = PacketDecoder()
    assert _feed(decoder, [_eth(first), _eth(overlapping), _eth(last)]) == [_expected4()]


def test_conflicting_overlap_drops_the_datagram_and_its_later_fragments() -> None:
    frames = _fragments4()
    forged = bytearray(frames[1])
    forged[-1] ^= 0xFF  # same offset and length as fragment 1, different bytes
    decoder = PacketDecoder()
    assert _feed(decoder, [frames[0], frames[1], bytes(forged), frames[2], frames[3]]) == []
    assert decoder.counters["fragments_overlap_dropped"] == 1
    assert decoder.counters["fragments_discarded"] == 2
    assert decoder.counters["fragments_reassembled"] == 0


def test_two_different_last_fragments_drop_the_datagram() -> None:
    frames = _fragments4()
    short_last = IP(src=A4, dst=B4, id=4242, proto=17, frag=150) / (b"\x00" * 8)
    decoder = PacketDecoder()
    assert _feed(decoder, [frames[3], _eth(short_last), frames[0], frames[1], frames[2]]) == []
    assert decoder.counters["fragments_overlap_dropped"] == 1


def test_incomplete_set_expires_after_the_timeout() -> None:
    decoder = PacketDecoder(fragment_timeout_s=30.0)
    frames = _fragments4()
    assert _feed(decoder, frames[:3], ts=100.0) == []
    assert decoder.expire(129.0) == 0
    assert decoder.expire(131.0) == 1
    assert decoder.counters["fragments_expired"] == 1
    assert _feed(decoder, frames[3:], ts=131.5) == []  # the rest alone cannot complete it


def test_late_fragment_expires_the_stale_set_through_decode() -> None:
    decoder = PacketDecoder(fragment_timeout_s=30.0)
    frames = _fragments4()
    _feed(decoder, frames[:2], ts=0.0)
    assert _feed(decoder, frames[2:], ts=45.0) == []
    assert decoder.counters["fragments_expired"] == 1


def test_oldest_set_is_evicted_when_too_many_are_in_flight() -> None:
    decoder = PacketDecoder(max_fragment_datagrams=2)
    sets = [_fragments4(ident=i) for i in (1, 2, 3)]
    for frames in sets:
        _feed(decoder, frames[:1])
    assert decoder.counters["fragments_evicted"] == 1
    assert _feed(decoder, sets[0][1:]) == []  # evicted: its first fragment is gone
    assert _feed(decoder, sets[2][1:]) == [_expected4()]


def test_fragment_beyond_65535_bytes_is_a_parse_error() -> None:
    bad = IP(src=A4, dst=B4, id=5, proto=17, frag=8189) / (b"\x00" * 64)
    with pytest.raises(ParseError) as err:
        PacketDecoder().decode(0.0, 1, _eth(bad))
    assert err.value.reason == "ip_fragment_too_big"


def test_non_final_fragment_not_multiple_of_8_is_a_parse_error() -> None:
    bad = IP(src=A4, dst=B4, id=5, proto=17, flags="MF") / (b"\x00" * 13)
    with pytest.raises(ParseError) as err:
        PacketDecoder().decode(0.0, 1, _eth(bad))
    assert err.value.reason == "ip_fragment_bad_length"


def _fragments6(payload: bytes = SIP, *, dest_opts: bool = False) -> list[bytes]:
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=0xABCDEF)
    if dest_opts:
        pkt = pkt / IPv6ExtHdrDestOpt()
    pkt = pkt / UDP(sport=5060, dport=5062) / payload
    return [_eth(f) for f in fragment6(pkt, 700)]


@pytest.mark.parametrize("dest_opts", [False, True])
def test_ipv6_fragments_reassemble_in_any_order(dest_opts: bool) -> None:
    frames = _fragments6(dest_opts=dest_opts)
    assert len(frames) >= 3
    expected = Datagram(
        17,
        bytes.fromhex("20010db8000000000000000000000001"),
        5060,
        bytes.fromhex("20010db8000000000000000000000002"),
        5062,
        SIP,
        0,
        0,
    )
    assert _feed(PacketDecoder(), frames) == [expected]
    assert _feed(PacketDecoder(), frames[::-1]) == [expected]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_arrival_order_with_duplicates_gives_the_datagram_once(data: st.DataObject) -> None:
    frames = _fragments4(size=200)
    extra = data.draw(st.lists(st.sampled_from(frames), max_size=5))
    order = data.draw(st.permutations(frames + extra))
    got = _feed(PacketDecoder(), list(order))
    assert got == [_expected4()]


def test_corpus_fragmented_sip_message_is_reassembled(corpus: Path) -> None:
    decoder = PacketDecoder()
    whole = []
    with CaptureReader(corpus / "SIP-SRTP-Normal_Call_two_parties.pcap") as reader:
        for ts, linktype, frame in reader:
            before = decoder.counters["fragments_reassembled"]
            dg = decoder.decode(ts, linktype, frame)
            if decoder.counters["fragments_reassembled"] > before:
                whole.append(dg)
    assert len(whole) == 1
    dg = whole[0]
    assert dg is not None
    head, _, body = dg.payload.partition(b"\r\n\r\n")
    first_line = head.split(b"\r\n", 1)[0]
    assert first_line.endswith(b" SIP/2.0") or first_line.startswith(b"SIP/2.0 ")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert len(dg.payload) > 1480
    assert len(body) == length
