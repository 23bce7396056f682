"""RFC 4733 telephone-events: real captures in, one digit per event out."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.utils import PcapNgReader, PcapReader

from callcap.codecs.dtmf import (
    EVENT_DIGITS,
    MAX_EVENT_PAYLOAD,
    DtmfDigit,
    EventTracker,
    TelephoneEvent,
)

_RTP = struct.Struct("!BBHII")


def _rtp_packets(path: Path) -> list[tuple[int, int, int, int, bytes]]:
    """(ssrc, payload type, seq, timestamp, payload) of every RTP-looking UDP datagram.

    The RTP header is taken apart here by hand (RFC 3550 §5.1: CSRCs, extension, padding) so
    the tracker sees exactly the payload bytes a receiver would.
    """
    reader = PcapNgReader(str(path)) if path.suffix == ".pcapng" else PcapReader(str(path))
    out = []
    with reader:
        for pkt in reader:
            if UDP not in pkt:
                continue
            data = bytes(pkt[UDP].payload)
            if len(data) < 12 or data[0] >> 6 != 2:
                continue
            b0, b1, seq, ts, ssrc = _RTP.unpack_from(data)
            offset = 12 + 4 * (b0 & 0x0F)
            if b0 & 0x10:
                if len(data) < offset + 4:
                    continue
                offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
            end = len(data) - (data[-1] if b0 & 0x20 else 0)
            if offset > end:
                continue
            out.append((ssrc, b1 & 0x7F, seq, ts, data[offset:end]))
    return out


def _track(packets: list[tuple[int, int, int, int, bytes]]) -> tuple[list[DtmfDigit], EventTracker]:
    tracker = EventTracker()
    digits = []
    for _ssrc, _pt, _seq, ts, payload in packets:
        digits += tracker.feed(ts, payload)
    digits += tracker.flush()
    return digits, tracker


def test_sipp_digit_with_triple_end_packet_yields_one_digit(corpus: Path) -> None:
    packets = _rtp_packets(corpus / "sipp_dtmf_2833_1.pcap")
    assert len(packets) == 10
    assert sum(TelephoneEvent.parse(p[4]).end for p in packets) == 3  # same seq, sent 3×
    digits, tracker = _track(packets)
    assert digits == [DtmfDigit(digit="1", start_ts=13280, duration=2240, ended=True)]
    assert tracker.ignored == 0


def test_digit_is_returned_when_its_first_end_packet_arrives(corpus: Path) -> None:
    packets = _rtp_packets(corpus / "sipp_dtmf_2833_1.pcap")
    tracker = EventTracker()
    returned = [tracker.feed(ts, payload) for _s, _p, _q, ts, payload in packets]
    assert [len(r) for r in returned] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert tracker.flush() == []


def test_sip_dtmf2_yields_its_seven_digits_once_each(corpus: Path) -> None:
    packets = [p for p in _rtp_packets(corpus / "SIP_DTMF2.pcap") if p[0] == 0x5711BF84]
    events = [p for p in packets if p[1] == 96]
    assert len(events) == 35
    digits, tracker = _track(events)
    assert "".join(d.digit for d in digits) == "6789123"
    assert all(d.ended and d.duration == 960 for d in digits)  # 120 ms at 8 kHz
    assert [d.start_ts for d in digits] == [
        3931130841,
        3931143081,
        3931146921,
        3931150521,
        3931155321,
        3931159401,
        3931163961,
    ]
    assert tracker.ignored == tracker.malformed == 0


def test_parse_reads_the_first_event_block() -> None:
    """``01 8a 08 c0``: event 1, E bit, volume 10 (-dBm0), duration 2240 (RFC 4733 §2.3)."""
    ev = TelephoneEvent.parse(bytes.fromhex("018a08c0"))
    assert ev == TelephoneEvent(event=1, end=True, volume=10, duration=2240)
    # SIP_DTMF2's payloads carry two trailing bytes after the 4-byte block.
    assert TelephoneEvent.parse(bytes.fromhex("068703c00000")).duration == 960
    # The reserved bit (0x40) is neither the E bit nor part of the volume.
    assert TelephoneEvent.parse(bytes.fromhex("05c50100")) == TelephoneEvent(5, True, 5, 256)


def test_parse_rejects_short_payloads() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        TelephoneEvent.parse(b"\x01\x8a\x08")


@given(st.binary(max_size=16))
def test_parse_of_random_bytes_raises_only_value_error(data: bytes) -> None:
    try:
        ev = TelephoneEvent.parse(data)
    except ValueError:
        assert len(data) < 4
    else:
        assert 0 <= ev.event <= 255 and 0 <= ev.volume <= 63 and 0 <= ev.duration <= 0xFFFF


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=8)), max_size=40))
def test_tracker_never_raises_and_reports_each_timestamp_once(
    feed: list[tuple[int, bytes]],
) -> None:
    tracker = EventTracker()
    digits = [d for ts, payload in feed for d in tracker.feed(ts, payload)] + tracker.flush()
    starts = [d.start_ts for d in digits]
    assert len(starts) == len(set(starts))
    assert all(d.digit in EVENT_DIGITS.values() for d in digits)


def _event(code: int, duration: int, *, end: bool = False) -> bytes:
    return struct.pack("!BBH", code, (0x80 if end else 0) | 10, duration)


def test_event_without_end_packets_is_closed_by_the_next_event() -> None:
    tracker = EventTracker()
    assert tracker.feed(1000, _event(5, 160)) == []
    assert tracker.feed(1000, _event(5, 320)) == []
    # End packets of digit 5 lost; digit # starts at a new timestamp.
    assert tracker.feed(3000, _event(11, 160)) == [DtmfDigit("5", 1000, 320, ended=False)]
    assert tracker.feed(3000, _event(11, 480, end=True)) == [DtmfDigit("#", 3000, 480, ended=True)]
    assert tracker.flush() == []


def test_event_open_at_stream_end_is_flushed_unended() -> None:
    tracker = EventTracker()
    tracker.feed(7, _event(10, 160))
    tracker.feed(7, _event(10, 800))
    assert tracker.flush() == [DtmfDigit("*", 7, 800, ended=False)]
    assert tracker.flush() == []


def test_late_update_after_the_end_does_not_reopen_the_event() -> None:
    tracker = EventTracker()
    assert tracker.feed(500, _event(12, 960, end=True)) == [DtmfDigit("A", 500, 960, ended=True)]
    assert tracker.feed(500, _event(12, 640)) == []  # reordered update
    assert tracker.feed(500, _event(12, 960, end=True)) == []  # repeated end
    assert tracker.flush() == []


def test_end_packet_duration_never_shrinks_the_event() -> None:
    tracker = EventTracker()
    tracker.feed(9, _event(0, 800))
    assert tracker.feed(9, _event(0, 640, end=True)) == [DtmfDigit("0", 9, 800, ended=True)]


def test_flash_is_event_16() -> None:
    assert EVENT_DIGITS[16] == "flash"
    assert [EVENT_DIGITS[i] for i in range(16)] == list("0123456789*#ABCD")


def test_non_dtmf_event_codes_are_counted_not_reported() -> None:
    tracker = EventTracker()
    assert tracker.feed(1, _event(238, 160, end=True)) == []
    assert tracker.feed(2, _event(107, 160)) == []
    assert tracker.feed(3, b"\x01") == []
    assert tracker.flush() == []
    assert (tracker.ignored, tracker.malformed) == (2, 1)


def test_mislabelled_telephone_event_flow_invents_no_digits(corpus: Path) -> None:
    """ndpi_rtp.pcapng: PT 101 carries ~1 kB video frames, which tshark reads as events 238/107…"""
    packets = [p for p in _rtp_packets(corpus / "ndpi_rtp.pcapng") if p[1] == 101]
    assert packets
    # Read as events, some of these video frames would start with a digit code (0x10 = flash).
    assert any(TelephoneEvent.parse(p[4]).event in EVENT_DIGITS for p in packets)
    digits, tracker = _track(packets)
    assert digits == []
    assert tracker.ignored == len(packets)


def test_padded_event_payload_is_still_an_event() -> None:
    tracker = EventTracker()
    padded = _event(9, 320, end=True) + bytes(MAX_EVENT_PAYLOAD - 4)
    assert tracker.feed(1, padded) == [DtmfDigit("9", 1, 320, ended=True)]
    assert tracker.feed(2, _event(9, 320, end=True) + bytes(MAX_EVENT_PAYLOAD - 3)) == []
    assert tracker.ignored == 1
