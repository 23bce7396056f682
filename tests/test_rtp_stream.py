"""RTP header parsing, sequence arithmetic and per-stream placement on the call timeline."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.rtp import RTP

from callcap.capture.rtp import RtpHeader, parse_rtp, seq_distance, seq_gt, ts_delta
from callcap.capture.stream import RtpStream
from callcap.errors import ParseError

PTIME = 160  # 20 ms at 8 kHz


def _stream(origin: float = 1000.0) -> RtpStream:
    return RtpStream(
        src=("10.0.0.1", 4000), dst=("10.0.0.2", 5000), ssrc=0x1234, side="caller", origin=origin
    )


# -- header ---------------------------------------------------------------------------------------


def test_rtp_header_parses_scapy_built_packet() -> None:
    raw = bytes(
        RTP(
            version=2,
            marker=1,
            payload_type=8,
            sequence=65535,
            timestamp=0xFFFFFF00,
            sourcesync=0xDEADBEEF,
        )
        / (b"\xd5" * 160)
    )
    hdr = RtpHeader.parse(raw)
    assert (hdr.payload_type, hdr.marker, hdr.sequence, hdr.timestamp, hdr.ssrc) == (
        8,
        True,
        65535,
        0xFFFFFF00,
        0xDEADBEEF,
    )
    assert hdr.payload == b"\xd5" * 160
    assert RtpHeader.parse(bytes(hdr)) == hdr


def test_rtp_csrc_extension_and_padding_are_stripped_from_payload() -> None:
    # V=2 P=1 X=1 CC=2, then two CSRCs, a one-word extension, payload, 3 padding octets.
    head = (
        bytes([0xB2, 0x00])
        + (7).to_bytes(2, "big")
        + (160).to_bytes(4, "big")
        + (5).to_bytes(4, "big")
    )
    csrcs = b"\x00\x00\x00\x01\x00\x00\x00\x02"
    ext = b"\xbe\xde\x00\x01" + b"\x11\x22\x33\x44"
    raw = head + csrcs + ext + b"AUDIO" + b"\x00\x00\x03"
    pt, _m, seq, ts, ssrc, cc, payload = parse_rtp(raw)
    assert (pt, seq, ts, ssrc, cc, payload) == (0, 7, 160, 5, 2, b"AUDIO")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x80\x00", "rtp_short"),
        (b"\x40" + b"\x00" * 11, "rtp_bad_version"),
        (bytes([0x8F]) + b"\x00" * 11, "rtp_short"),  # claims 15 CSRCs
        (bytes([0xA0]) + b"\x00" * 11 + b"\x00", "rtp_bad_padding"),
        (bytes([0xA0]) + b"\x00" * 11 + b"\x10", "rtp_short"),  # padding longer than packet
    ],
)
def test_malformed_rtp_is_a_parse_error_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_rtp(raw)
    assert err.value.reason == reason


@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_parse_error(raw: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_rtp(raw)


@given(st.integers(0, 0xFFFF), st.integers(-30000, 30000))
def test_seq_distance_is_signed_across_the_wrap(a: int, d: int) -> None:
    b = (a + d) & 0xFFFF
    assert seq_distance(a, b) == d
    assert seq_gt(b, a) == (d > 0)


@given(st.integers(0, 0xFFFFFFFF), st.integers(-(2**31) + 1, 2**31 - 1))
def test_ts_delta_is_signed_across_the_wrap(a: int, d: int) -> None:
    assert ts_delta(a, (a + d) & 0xFFFFFFFF) == d


# -- placement ------------------------------------------------------------------------------------


def test_in_order_packets_land_back_to_back_from_first_arrival() -> None:
    s = _stream()
    positions = [s.push(1000.5 + i * 0.02, 100 + i, 5000 + i * PTIME, 0, PTIME) for i in range(50)]
    assert positions == [4000 + i * PTIME for i in range(50)]
    assert (s.stats.packets, s.lost, s.stats.duplicates, s.stats.reordered) == (50, 0, 0, 0)


def test_sequence_and_timestamp_wrap_keep_positions_continuous() -> None:
    s = _stream()
    seq0, ts0 = 65530, 0xFFFFFFFF - 3 * PTIME
    positions = [
        s.push(1000.0 + i * 0.02, (seq0 + i) & 0xFFFF, (ts0 + i * PTIME) & 0xFFFFFFFF, 0, PTIME)
        for i in range(20)
    ]
    assert positions == [i * PTIME for i in range(20)]
    assert s.lost == 0
    assert s.expected == 20


def test_reordered_packets_land_at_their_timestamp_not_their_arrival() -> None:
    s = _stream()
    delayed = {2: 0.03, 5: 0.035}  # these two are held up in the network and overtaken
    arrivals = sorted((1000.0 + i * 0.02 + delayed.get(i, 0.0), i) for i in range(8))
    assert [i for _, i in arrivals] == [0, 1, 3, 2, 4, 6, 5, 7]
    placed = {}
    for arrival, i in arrivals:
        placed[i] = s.push(arrival, i, i * PTIME, 0, PTIME)
    assert placed == {i: i * PTIME for i in range(8)}
    assert s.stats.reordered == 2
    assert s.lost == 0
    s.finish()
    assert s.closed_gaps == []


def test_duplicates_are_dropped_and_counted() -> None:
    s = _stream()
    assert s.push(1000.0, 10, 0, 0, PTIME) == 0
    assert s.push(1000.02, 11, PTIME, 0, PTIME) == PTIME
    assert s.push(1000.021, 11, PTIME, 0, PTIME) is None
    assert s.push(1000.04, 12, 2 * PTIME, 0, PTIME) == 2 * PTIME
    assert s.push(1000.05, 10, 0, 0, PTIME) is None  # old duplicate after newer packets
    assert (s.stats.packets, s.stats.duplicates, s.lost) == (5, 2, 0)


def test_loss_leaves_a_gap_of_the_right_length() -> None:
    s = _stream()
    for i in [0, 1, 2, 6, 7]:
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    assert s.lost == 3
    # The gap closes once the stream has moved past the reorder window, or at the end.
    s.finish()
    assert [(g.from_pos, g.to_pos) for g in s.closed_gaps] == [(3 * PTIME, 6 * PTIME)]


def test_a_late_reordered_packet_splits_the_gap() -> None:
    s = _stream()
    for arrival, i in [(1000.0, 0), (1000.02, 1), (1000.1, 5), (1000.11, 3), (1000.12, 6)]:
        s.push(arrival, i, i * PTIME, 0, PTIME)
    s.finish()
    assert [(g.from_pos, g.to_pos) for g in s.closed_gaps] == [
        (2 * PTIME, 3 * PTIME),
        (4 * PTIME, 5 * PTIME),
    ]
    assert s.lost == 2


def test_jitter_does_not_move_packets_off_their_timestamp_slot() -> None:
    rng = random.Random(7)
    s = _stream()
    positions = []
    for i in range(500):
        delay = rng.uniform(0, 0.06)  # up to 60 ms of queueing, never less than the first packet
        positions.append(s.push(1000.0 + i * 0.02 + delay if i else 1000.0, i, i * PTIME, 0, PTIME))
    assert positions == [i * PTIME for i in range(500)]
    assert 0 < s.jitter_ms < 60


def test_sender_clock_drift_is_followed_within_one_packet() -> None:
    """A sender whose clock runs 100 ppm fast over an hour: placement follows capture time."""
    s = _stream()
    drift = 1.0001
    worst = 0.0
    for i in range(0, 180_000):  # one hour of 20 ms packets
        arrival = 1000.0 + i * 0.02
        pos = s.push(arrival, i & 0xFFFF, int(i * PTIME * drift) & 0xFFFFFFFF, 0, PTIME)
        if i % 50 == 49:
            s.end_window()
        assert pos is not None
        worst = max(worst, abs(pos - (arrival - 1000.0) * 8000))
    assert worst <= PTIME + 1  # one packet, give or take float rounding


def test_sender_clock_running_slow_is_followed_within_one_packet() -> None:
    s = _stream()
    worst = 0.0
    for i in range(0, 90_000):
        arrival = 1000.0 + i * 0.02
        pos = s.push(arrival, i & 0xFFFF, int(i * PTIME * 0.9999) & 0xFFFFFFFF, 0, PTIME)
        if i % 50 == 49:
            s.end_window()
        assert pos is not None
        worst = max(worst, abs(pos - (arrival - 1000.0) * 8000))
    assert worst <= 2 * PTIME


def test_a_lag_that_stays_moves_the_timeline_and_the_hole_in_the_speech_is_a_gap() -> None:
    """From packet 50 on the sender's packets arrive 120 ms later (its path got longer, or
    it stalled): past the drift limit for a whole window, so the anchor follows at the
    window's end.  The next packet, whose media follows straight on, lands 120 ms after
    the one before ended: that hole is a closed gap."""
    s = _stream()
    positions = []
    for i in range(150):
        positions.append(
            s.push(1000.0 + i * 0.02 + (0.12 if i >= 50 else 0.0), i, i * PTIME, 0, PTIME)
        )
        if i % 50 == 49:
            s.end_window()
    assert positions[:100] == [i * PTIME for i in range(100)]  # the RTP clock in the spurt
    assert positions[100:] == [i * PTIME + 960 for i in range(100, 150)]
    assert [(g.from_pos, g.to_pos) for g in s.closed_gaps] == [(100 * PTIME, 100 * PTIME + 960)]
    assert s.lost == 0


def test_a_move_of_the_timeline_in_suppressed_silence_is_no_gap() -> None:
    """The same lag, but the sender stopped talking (silence suppression: the timestamp
    jumps by the pause) when the anchor moved: the move falls in silence, cuts no speech,
    and no gap is listed."""
    s = _stream()
    for i in range(100):
        s.push(1000.0 + i * 0.02 + (0.12 if i >= 50 else 0.0), i, i * PTIME, 0, PTIME)
        if i % 50 == 49:
            s.end_window()
    # half a second of silence: the next packet's media starts 25 packets after the last
    pos = s.push(1000.0 + 125 * 0.02 + 0.12, 100, 125 * PTIME, 0, PTIME)
    assert pos == 125 * PTIME + 960
    assert s.closed_gaps == [] and s.lost == 0


def test_sequence_jump_is_believed_on_the_second_packet_and_is_not_loss() -> None:
    """RFC 3550 A.1 probation: one wild sequence number is ignored; two in a row restart."""
    s = _stream()
    for i in range(10):
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    # The sender restarts: sequence and timestamp jump far away, media continues in real time.
    assert s.push(1000.2, 40010, 900_000 + 10 * PTIME, 0, PTIME) is None
    for i in range(11, 20):
        pos = s.push(1000.0 + i * 0.02, 40000 + i, 900_000 + i * PTIME, 0, PTIME)
        assert pos == i * PTIME
    assert s.lost == 0
    assert (s.stats.restarts, s.stats.probation) == (1, 1)


def test_a_single_stray_sequence_number_does_not_restart_the_stream() -> None:
    s = _stream()
    for i in range(10):
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    assert s.push(1000.19, 30000, 123, 0, PTIME) is None  # corrupt or foreign packet
    assert s.push(1000.2, 10, 10 * PTIME, 0, PTIME) == 10 * PTIME
    assert (s.stats.restarts, s.lost) == (0, 0)


def test_timestamp_jump_forward_reanchors_on_arrival() -> None:
    s = _stream()
    for i in range(10):
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    # Same sequence run, but the timestamp leaps 100 s ahead (a sender bug seen after hold).
    pos = s.push(1000.2, 10, 10 * PTIME + 800_000, 0, PTIME)
    assert pos == 10 * PTIME


@pytest.mark.parametrize("leap", [800_000, 2**31 - 1, 2**31, 2**31 + 1, 2**30])
def test_a_lone_timestamp_leap_costs_its_followers_nothing(leap: int) -> None:
    s = _stream()
    got = [s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME) for i in range(10)]
    got.append(s.push(1000.2, 10, (10 * PTIME + leap) & 0xFFFFFFFF, 0, PTIME))
    got += [s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME) for i in range(11, 30)]
    assert got == [i * PTIME for i in range(30)]  # the leapt one in its sequence slot
    assert s.stats.ts_leaps == 1 and s.stats.reanchors == 0


def test_a_timestamp_leap_the_next_packet_confirms_is_the_new_timing() -> None:
    s = _stream()
    for i in range(10):
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    rebased = [
        s.push(1000.0 + i * 0.02, i, (i * PTIME + 3_000_000) & 0xFFFFFFFF, 0, PTIME)
        for i in range(10, 20)
    ]
    assert rebased == [i * PTIME for i in range(10, 20)]  # on, back to back
    assert s.stats.ts_leaps == 1


def test_the_first_packet_after_a_hold_with_a_rebased_clock_lands_at_its_arrival() -> None:
    s = _stream()
    for i in range(10):
        s.push(1000.0 + i * 0.02, i, i * PTIME, 0, PTIME)
    # a minute of hold without media, then the sender's timestamps leap 10 minutes ahead
    first = s.push(1060.2, 10, 10 * PTIME + 4_800_000, 0, PTIME)
    second = s.push(1060.22, 11, 11 * PTIME + 4_800_000, 0, PTIME)
    assert first == round(60.2 * 8000) and second == first + PTIME


def test_events_do_not_move_the_anchor() -> None:
    s = _stream()
    s.push(1000.0, 1, 0, 0, PTIME)
    for k in range(5):  # an RFC 4733 event keeps its start timestamp while it lasts
        s.push(1000.02 + k * 0.05, 2 + k, PTIME, 101, 0, timing=False)
    assert s.position(PTIME) == PTIME
    assert s.stats.payload_types == {0: 1, 101: 5}
