"""TCP stream reassembly: order, retransmissions, the 2**32 wrap, gaps, close, corpus SIP/TCP."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from callcap.capture.decode import Datagram, PacketDecoder
from callcap.capture.pcapfile import CaptureReader
from callcap.capture.tcp import SEQ_MOD, TcpReassembler, seq_add, seq_diff, seq_lt

A, B = "192.0.2.1", "192.0.2.2"
KEY = (bytes([192, 0, 2, 1]), 40000, bytes([192, 0, 2, 2]), 5060)
INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.1:40000;branch=z9hG4bK776asdhds\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\nCSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)
_decoder = PacketDecoder()


def _seg(seq: int, payload: bytes = b"", flags: str = "PA") -> Datagram:
    """A segment built by scapy and decoded by us, as the pipeline would see it."""
    frame = bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=A, dst=B)
        / TCP(sport=40000, dport=5060, seq=seq % SEQ_MOD, flags=flags)
        / payload
    )
    dg = _decoder.decode(0.0, 1, frame)
    assert dg is not None
    return dg


def _run(tcp: TcpReassembler, segments: list[Datagram], ts: float = 1.0) -> bytes:
    return b"".join(b"".join(tcp.feed(ts, s)) for s in segments)


def _split(data: bytes, isn: int, cuts: list[int]) -> list[Datagram]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [_seg(isn + 1 + a, data[a:b]) for a, b in itertools.pairwise(bounds) if a < b]


def test_in_order_segments_are_delivered_as_they_come() -> None:
    tcp = TcpReassembler()
    assert tcp.feed(0.0, _seg(1000, flags="S")) == []
    assert tcp.feed(0.1, _seg(1001, INVITE[:50])) == [INVITE[:50]]
    assert tcp.feed(0.2, _seg(1051, INVITE[50:])) == [INVITE[50:]]


def test_one_message_over_several_segments() -> None:
    tcp = TcpReassembler()
    segs = [_seg(7, flags="S"), *_split(INVITE, 7, [10, 40, 41, 100])]
    assert _run(tcp, segs) == INVITE


def test_out_of_order_segments_wait_for_the_gap() -> None:
    tcp = TcpReassembler()
    first, second, third = _split(INVITE, 0, [60, 120])
    tcp.feed(0.0, _seg(0, flags="S"))
    assert tcp.feed(0.1, third) == []
    assert tcp.feed(0.2, second) == []
    assert b"".join(tcp.feed(0.3, first)) == INVITE
    assert tcp.counters["tcp_out_of_order"] == 2


def test_retransmitted_and_overlapping_bytes_are_not_delivered_twice() -> None:
    tcp = TcpReassembler()
    tcp.feed(0.0, _seg(99, flags="S"))
    out = _run(
        tcp,
        [
            _seg(100, INVITE[:80]),
            _seg(100, INVITE[:80]),  # plain retransmission
            _seg(100 + 40, INVITE[40:120]),  # overlaps 40 old bytes, brings 40 new
            _seg(100 + 150, INVITE[150:]),  # out of order
            _seg(100 + 130, INVITE[130:]),  # overlaps the held segment
            _seg(100 + 150, INVITE[150:]),  # held copy retransmitted
            _seg(100 + 120, INVITE[120:130]),
        ],
    )
    assert out == INVITE
    assert len(INVITE) == 178
    assert tcp.counters["tcp_retransmitted"] == 2


def test_sequence_numbers_wrap_at_2_32() -> None:
    isn = SEQ_MOD - 30
    tcp = TcpReassembler()
    segs = [_seg(isn, flags="S"), *_split(INVITE, isn, [20, 29, 30, 31, 90])]
    assert [s.tcp_seq for s in segs] == [isn, isn + 1, isn + 21, 0, 1, 2, 61]
    # seq numbers go ... 2**32-1, 0, 1 ...: deliver them shuffled across the wrap.
    assert _run(tcp, [segs[i] for i in (0, 3, 6, 5, 1, 4, 2)]) == INVITE


def test_capture_joining_mid_stream_starts_at_the_first_segment_seen() -> None:
    tcp = TcpReassembler()
    assert tcp.feed(0.0, _seg(5_000_000, flags="A")) == []  # a bare ACK teaches nothing
    assert b"".join(tcp.feed(0.1, _seg(5_000_000, INVITE))) == INVITE


def test_unfillable_gap_is_skipped_when_the_buffer_bound_is_hit() -> None:
    tcp = TcpReassembler(max_buffer=300)
    lost = b"X" * 100
    after = [INVITE, INVITE]
    tcp.feed(0.0, _seg(0, flags="S"))
    out = []
    seq = 1 + len(lost)  # the segment carrying ``lost`` never arrives
    for message in after:
        out += tcp.feed(0.1, _seg(seq, message))
        seq += len(message)
    assert b"".join(out) == b"".join(after)
    assert tcp.counters["tcp_gap_skipped"] == 1
    assert tcp.counters["tcp_gap_bytes_skipped"] == 100
    assert b"".join(tcp.feed(0.2, _seg(seq, b"more"))) == b"more"  # stream goes on


def test_fin_closes_after_held_data_is_delivered() -> None:
    tcp = TcpReassembler()
    tcp.feed(0.0, _seg(0, flags="S"))
    tail = _seg(1 + 100, INVITE[100:], flags="FA")  # FIN arrives before the middle bytes
    assert tcp.feed(0.1, tail) == []
    assert b"".join(tcp.feed(0.2, _seg(1, INVITE[:100]))) == INVITE
    assert tcp.counters["tcp_flows_closed"] == 1
    assert tcp.feed(0.3, _seg(1 + 100, INVITE[100:], flags="FA")) == []  # retransmitted FIN


def test_rst_closes_the_flow_and_a_new_syn_reopens_it() -> None:
    tcp = TcpReassembler()
    tcp.feed(0.0, _seg(0, flags="S"))
    assert tcp.feed(0.1, _seg(1, b"hello", flags="RA")) == [b"hello"]
    assert tcp.feed(0.2, _seg(1, b"hello")) == []
    tcp.feed(0.3, _seg(777, flags="S"))
    assert tcp.feed(0.4, _seg(778, INVITE)) == [INVITE]


def test_idle_flows_expire_and_reset_flow_resyncs() -> None:
    tcp = TcpReassembler(idle_timeout_s=60.0)
    tcp.feed(0.0, _seg(0, flags="S"))
    tcp.feed(10.0, _seg(1, b"abc"))
    assert tcp.expire(69.0) == 0
    assert tcp.expire(71.0) == 1
    assert len(tcp) == 0
    tcp.feed(80.0, _seg(100, b"first"))
    tcp.reset_flow(KEY)
    assert tcp.feed(81.0, _seg(100, b"first")) == [b"first"]  # re-learnt from this segment


def test_flow_count_is_bounded_least_recently_used_first() -> None:
    tcp = TcpReassembler(max_flows=2)
    for sport in (1, 2, 3):
        frame = bytes(
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src=A, dst=B)
            / TCP(sport=sport, dport=5060, seq=10, flags="S")
        )
        dg = _decoder.decode(0.0, 1, frame)
        assert dg is not None
        tcp.feed(0.0, dg)
    assert len(tcp) == 2
    assert tcp.counters["tcp_flows_evicted"] == 1


@settings(max_examples=60, deadline=None)
@given(
    isn=st.one_of(st.integers(0, SEQ_MOD - 1), st.integers(SEQ_MOD - len(INVITE), SEQ_MOD - 1)),
    cuts=st.lists(st.integers(1, len(INVITE) - 1), max_size=8),
    data=st.data(),
)
def test_segments_in_any_order_with_duplicates_rebuild_the_stream(
    isn: int, cuts: list[int], data: st.DataObject
) -> None:
    segs = _split(INVITE, isn, cuts)
    dupes = data.draw(st.lists(st.sampled_from(segs), max_size=3))
    order = data.draw(st.permutations(segs + dupes))
    tcp = TcpReassembler()
    tcp.feed(0.0, _seg(isn, flags="S"))
    assert _run(tcp, list(order)) == INVITE


@given(st.integers(0, SEQ_MOD - 1), st.integers(0, (1 << 31) - 1))
def test_sequence_helpers_across_the_wrap(a: int, n: int) -> None:
    b = seq_add(a, n)
    assert 0 <= b < SEQ_MOD
    assert seq_diff(b, a) == n
    assert seq_diff(a, b) == -n
    assert seq_lt(a, b) == (n > 0)
    assert not seq_lt(b, a)


# -- corpus: SIP over TCP on port 6060, messages split across segments --------------------------

START_LINE = re.compile(rb"(?:[A-Z]+ sip:[^ \r\n]+ SIP/2\.0|SIP/2\.0 \d{3} [^\r\n]*)\r\n")
CONTENT_LENGTH = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$")


def _split_messages(stream: bytes) -> list[bytes]:
    """Frame a SIP/TCP byte stream by Content-Length (RFC 3261 §18.3)."""
    messages = []
    pos = 0
    while pos < len(stream):
        while stream.startswith(b"\r\n", pos):  # CRLF keep-alives (RFC 5626 §3.5.1)
            pos += 2
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        match = CONTENT_LENGTH.search(stream, pos, end + 2)
        stop = end + 4 + (int(match.group(1)) if match else 0)
        messages.append(stream[pos:stop])
        pos = stop
    return messages


def test_corpus_sip_over_tcp_reassembles_every_message(
    corpus: Path, corpus_facts: dict[str, Any]
) -> None:
    name = "sip_ipv4_tcp_fragmented.pcap"
    decoder = PacketDecoder()
    tcp = TcpReassembler()
    streams: dict[tuple[bytes, int, bytes, int], bytearray] = defaultdict(bytearray)
    first_seq: dict[tuple[bytes, int, bytes, int], int] = {}
    raw_lines: dict[tuple[bytes, int, bytes, int], dict[int, bytes]] = defaultdict(dict)
    with CaptureReader(corpus / name) as reader:
        for ts, linktype, frame in reader:
            dg = decoder.decode(ts, linktype, frame)
            assert dg is not None
            assert dg.proto == 6
            key = (dg.src, dg.sport, dg.dst, dg.dport)
            if dg.payload:
                # Start lines visible in the raw segment, at their stream offset.
                base = seq_diff(dg.tcp_seq, first_seq.setdefault(key, dg.tcp_seq))
                for m in START_LINE.finditer(dg.payload):
                    if m.start() == 0 or dg.payload[m.start() - 2 : m.start()] == b"\r\n":
                        raw_lines[key][base + m.start()] = m.group()
            for chunk in tcp.feed(ts, dg):
                streams[key] += chunk
    assert set(streams) == set(raw_lines)
    assert tcp.counters["tcp_gap_skipped"] == 0
    for key, lines in raw_lines.items():
        stream = bytes(streams[key])
        for offset, line in sorted(lines.items()):  # every one, in order, where it belongs
            assert stream[offset : offset + len(line)] == line, (key, offset)

    # Count messages the way a SIP/TCP reader must: frame each reassembled stream on
    # Content-Length and look at the first line of each message.  Searching the stream for
    # "INVITE sip:" would be imprecise both ways — it also matches inside bodies (a sipfrag or
    # an embedded request) and it cannot see a request line cut by a segment boundary in the
    # raw segments.  tshark (decoding port 6060 as SIP) reports 406 messages, 37 of them INVITE.
    methods: dict[bytes, int] = defaultdict(int)
    total = 0
    for stream in streams.values():
        for message in _split_messages(bytes(stream)):
            first_line = message.split(b"\r\n", 1)[0]
            assert START_LINE.match(first_line + b"\r\n"), first_line[:60]
            total += 1
            if not first_line.startswith(b"SIP/2.0 "):
                methods[first_line.split(b" ", 1)[0]] += 1
    facts = corpus_facts[name]
    assert total == facts["sip_messages"]
    assert methods[b"INVITE"] == facts["sip_message_counts"]["INVITE"]
