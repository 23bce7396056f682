"""Live capture through the TPACKET_V3 ring: the block parser on the kernel's exact layout,
and real rings inside namespaces the tests create.

``parse_block`` is held to blocks laid out here byte for byte as ``af_packet.c`` writes them
(block descriptor, ``tpacket3_hdr``, ``sockaddr_ll``, the MAC header at the kernel's aligned
offset, frames 8-byte aligned) and to every way such a block can lie about itself: each is
reported, the frames before the fault are kept, and nothing returned points outside the
block.  The live tests run a :class:`LiveCapture` inside a fresh network namespace (its
loopback carries nothing but the test's own datagrams) or on one end of a veth pair, and
check what the kernel really hands over: exact payloads, each datagram once, a ring forced to
overflow, frames cut by the snap length, and a link taken down and brought back up.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns_harness import NetnsPair, netns_exec

from callcap.capture.block import FrameBlock
from callcap.capture.ring import BlockReport, parse_block

# ---------------------------------------------------------------------------------------
# Blocks built the way the kernel builds them
# ---------------------------------------------------------------------------------------

BLOCK_SIZE = 1 << 16
BLOCK_DESC = 48  # tpacket_block_desc with tpacket_hdr_v1
FRAME_HDR = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
SLL_SIZE = 20  # sizeof(struct sockaddr_ll)
TP_STATUS_USER = 1
TP_STATUS_LOSING = 4
AF_PACKET = 17
PACKET_HOST, PACKET_OUTGOING = 0, 4
ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 65534
# tpacket_rcv: netoff = TPACKET_ALIGN(tp_hdrlen + max(maclen, 16)), macoff = netoff - maclen,
# with tp_hdrlen = 48 + 20 and TPACKET_ALIGNMENT 16: 96 - 14 for Ethernet, 96 - 0 for raw IP
NETOFF = 96
SEC = 1_700_000_000

# where the fields the parser trusts live (block descriptor, then within a frame header)
NUM_PKTS_AT, FIRST_AT, BLK_LEN_AT = 12, 16, 20
NEXT_AT, SNAPLEN_AT, LEN_AT, MAC_AT = 0, 12, 16, 24


@dataclass(frozen=True)
class Frame:
    data: bytes
    sec: int = SEC
    nsec: int = 0
    hatype: int = ARPHRD_ETHER
    pkttype: int = PACKET_HOST
    wire: int | None = None  # tp_len: more than len(data) for a frame cut by the snap length

    @property
    def time(self) -> float:
        return self.sec + self.nsec / 1e9  # as a nanosecond pcap reader computes it


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _macoff(hatype: int) -> int:
    return NETOFF if hatype == ARPHRD_NONE else NETOFF - 14


def build_block(
    frames: list[Frame], *, status: int = TP_STATUS_USER, seq: int = 1
) -> tuple[bytes, list[int]]:
    """One block as the kernel hands it over (``blk_len`` bytes, as ``RingSocket.take``
    copies it), and the offset of each frame's header."""
    body = bytearray()
    offsets = []
    at = BLOCK_DESC
    for i, f in enumerate(frames):
        mac = _macoff(f.hatype)
        space = _align8(mac + len(f.data))  # TOTAL_PKT_LEN_INCL_ALIGN
        last = i == len(frames) - 1
        header = struct.pack(
            "=6I2H", 0 if last else space, f.sec, f.nsec, len(f.data),
            len(f.data) if f.wire is None else f.wire, TP_STATUS_USER, mac, NETOFF,
        )  # fmt: skip
        header += struct.pack("=2IHH", 0x5EED, 0, 0, 0) + bytes(8)  # hv1, padding
        assert len(header) == FRAME_HDR
        halen = 0 if f.hatype == ARPHRD_NONE else 6
        sll = struct.pack("=H", AF_PACKET) + struct.pack(">H", 0x0800)
        sll += struct.pack("=iHBB8s", 3, f.hatype, f.pkttype, halen, b"\x02\x00\x00\x00\x00\x07")
        assert len(sll) == SLL_SIZE
        record = header + sll
        record += bytes(mac - len(record)) + f.data
        record += bytes(space - len(record))
        offsets.append(at)
        body += record
        at += space
    first, last_f = (frames[0], frames[-1]) if frames else (Frame(b""), Frame(b""))
    desc = struct.pack(
        "=6IQ4I", 0, BLOCK_DESC, status, len(frames), BLOCK_DESC, BLOCK_DESC + len(body), seq,
        first.sec, first.nsec, last_f.sec, last_f.nsec,
    )  # fmt: skip
    assert len(desc) == BLOCK_DESC
    return desc + bytes(body), offsets


def _set(block: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(block)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _get(block: bytes, at: int, fmt: str) -> int:
    return int(struct.unpack_from(fmt, block, at)[0])


def _frames(block: FrameBlock) -> list[bytes]:
    return [block.frame(i) for i in range(len(block))]


def _assert_inside(block: FrameBlock, data: bytes) -> None:
    n = len(block)
    assert len(block.lengths) == len(block.times) == len(block.linktypes) == n
    assert (block.starts >= 0).all()
    assert (block.lengths >= 0).all()
    assert (block.starts + block.lengths <= len(data)).all()
    assert block.data is data or n == 0


def _eth(payload: bytes, n: int) -> bytes:
    """An Ethernet/IPv4/UDP frame whose bytes say which one it is."""
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), n, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    udp = struct.pack(">HHHH", 5060, 5060, 8 + len(payload), 0)
    return bytes.fromhex("020000000002020000000001") + b"\x08\x00" + ip + udp + payload


def _sample() -> list[Frame]:
    """Four frames of different sizes (none a multiple of 8) on one Ethernet interface."""
    return [
        Frame(_eth(b"INVITE " + bytes([i]) * (5 + 37 * i), i), nsec=20_000_000 * i + 7)
        for i in range(4)
    ]


# ---------------------------------------------------------------------------------------
# parse_block on well-formed blocks
# ---------------------------------------------------------------------------------------


def test_frames_come_out_with_their_exact_bytes_times_and_link_types() -> None:
    frames = [
        Frame(_eth(b"SIP/2.0 200 OK\r\n\r\n", 1), nsec=123_456_789, hatype=ARPHRD_ETHER),
        Frame(bytes(12) + b"\x08\x00" + b"loopback" * 9, sec=SEC + 1, nsec=999_999_999,
              hatype=ARPHRD_LOOPBACK),
        Frame(b"\x45" + bytes(27) + b"raw ip from a tun device", sec=SEC + 2, nsec=1,
              hatype=ARPHRD_NONE),
    ]  # fmt: skip
    data, offsets = build_block(frames)
    block, report = parse_block(data, BLOCK_SIZE)
    assert _frames(block) == [f.data for f in frames]
    assert block.lengths.tolist() == [len(f.data) for f in frames]
    assert block.times.tolist() == [f.time for f in frames]
    assert block.times.tolist() == [
        1_700_000_000.123456789,
        1_700_000_001.999999999,
        SEC + 2 + 1e-9,
    ]
    assert block.linktypes.tolist() == [1, 1, 101]
    # the MAC header sits where the kernel's netoff alignment puts it
    assert block.starts.tolist() == [offsets[0] + 82, offsets[1] + 82, offsets[2] + 96]
    assert [o % 8 for o in offsets] == [0, 0, 0]
    assert report == BlockReport(
        frames=3, first_ts=frames[0].time, last_ts=frames[2].time, corrupt=None, losing=False
    )
    assert list(block.frames()) == [(f.time, [1, 1, 101][i], f.data) for i, f in enumerate(frames)]


def test_a_full_block_of_small_frames_is_read_whole() -> None:
    frames = [
        Frame(
            _eth(bytes([i % 251]) * (i % 61), i), nsec=(i * 20_000_000) % 10**9, sec=SEC + i // 50
        )
        for i in range(300)
    ]
    data, _ = build_block(frames)
    assert len(data) < BLOCK_SIZE
    block, report = parse_block(data, BLOCK_SIZE)
    assert report.corrupt is None and report.frames == 300
    assert _frames(block) == [f.data for f in frames]
    assert np.array_equal(block.times, np.array([f.time for f in frames]))
    assert (block.linktypes == 1).all()


def test_loopback_outgoing_copies_are_skipped_and_counted() -> None:
    # on lo the kernel shows each datagram leaving (PACKET_OUTGOING) and arriving (HOST)
    frames = []
    for i in range(3):
        data = bytes(12) + b"\x08\x00" + f"datagram {i}".encode()
        frames.append(Frame(data, nsec=1000 * i, hatype=ARPHRD_LOOPBACK, pkttype=PACKET_OUTGOING))
        frames.append(Frame(data, nsec=1000 * i + 5, hatype=ARPHRD_LOOPBACK))
    # an interface's own outgoing frames elsewhere are real traffic and kept
    sent = Frame(_eth(b"sent by this host", 9), nsec=9000, pkttype=PACKET_OUTGOING)
    data, _ = build_block([*frames, sent])
    block, report = parse_block(data, BLOCK_SIZE)
    assert _frames(block) == [frames[1].data, frames[3].data, frames[5].data, sent.data]
    assert block.times.tolist() == [frames[1].time, frames[3].time, frames[5].time, sent.time]
    assert report.outgoing == 3
    assert report.frames == 7 and report.truncated == 0 and report.corrupt is None
    # the block's span is that of every frame in it, skipped ones included
    assert report.first_ts == frames[0].time and report.last_ts == sent.time


def test_a_blocks_span_is_its_oldest_and_newest_frame_whatever_their_order() -> None:
    # an outgoing copy carries the time its sender stamped it, which may be before frames
    # the ring already holds: the span a loss window starts or ends at is the true one
    frames = [
        Frame(_eth(b"received", 1), nsec=500_000),
        Frame(_eth(b"received", 2), nsec=900_000),
        Frame(_eth(b"sent earlier", 3), nsec=100_000, pkttype=PACKET_OUTGOING),
    ]
    data, _ = build_block(frames)
    block, report = parse_block(data, BLOCK_SIZE)
    assert block.times.tolist() == [f.time for f in frames]  # frames keep their own times
    assert report.first_ts == frames[2].time and report.last_ts == frames[1].time


def test_frames_cut_by_the_snap_length_are_skipped_and_counted() -> None:
    whole = _sample()
    cut = [
        Frame(whole[0].data[:40], nsec=1, wire=len(whole[0].data)),
        Frame(whole[1].data[:100], nsec=2, wire=1514),
    ]
    data, _ = build_block([cut[0], whole[1], cut[1], whole[3]])
    block, report = parse_block(data, BLOCK_SIZE)
    assert _frames(block) == [whole[1].data, whole[3].data]
    assert report.truncated == 2 and report.outgoing == 0 and report.corrupt is None
    assert report.frames == 4
    assert report.first_ts == cut[0].time


def test_a_cut_loopback_outgoing_copy_counts_as_outgoing_not_as_cut() -> None:
    # one datagram cut by the snap length: its two loopback copies are one loss, not two
    data = bytes(12) + b"\x08\x00" + b"x" * 86
    copies = [
        Frame(data, hatype=ARPHRD_LOOPBACK, pkttype=PACKET_OUTGOING, wire=500),
        Frame(data, nsec=4, hatype=ARPHRD_LOOPBACK, wire=500),
    ]
    block, report = parse_block(build_block(copies)[0], BLOCK_SIZE)
    assert len(block) == 0
    assert report.truncated == 1 and report.outgoing == 1


def test_losing_status_says_the_kernel_dropped_frames_before_the_block_closed() -> None:
    frames = _sample()
    block, report = parse_block(
        build_block(frames, status=TP_STATUS_USER | TP_STATUS_LOSING)[0], BLOCK_SIZE
    )
    assert report.losing
    assert _frames(block) == [f.data for f in frames]  # the frames it holds are good
    _, report = parse_block(build_block(frames)[0], BLOCK_SIZE)
    assert not report.losing


def test_an_empty_block_has_no_frames_and_is_not_corrupt() -> None:
    data, _ = build_block([])
    block, report = parse_block(data, BLOCK_SIZE)
    assert len(block) == 0
    assert report.corrupt is None and report.frames == 0
    assert report.first_ts is None and report.last_ts is None


def test_a_mixed_block_gets_each_frames_own_link_type() -> None:
    frames = [
        Frame(b"\x45" + bytes(19), hatype=ARPHRD_NONE),
        Frame(_eth(b"a", 1), hatype=ARPHRD_ETHER),
        Frame(b"\x60" + bytes(39), hatype=ARPHRD_NONE),
        Frame(bytes(14), hatype=ARPHRD_LOOPBACK),
    ]
    block, _ = parse_block(build_block(frames)[0], BLOCK_SIZE)
    assert block.linktypes.tolist() == [101, 1, 101, 1]
    assert _frames(block) == [f.data for f in frames]


# ---------------------------------------------------------------------------------------
# parse_block on blocks that lie about themselves
# ---------------------------------------------------------------------------------------

SAMPLE, OFFSETS = build_block(_sample())


def _corrupt_cases() -> list[Any]:
    o = OFFSETS
    last_end = len(SAMPLE)
    frame1_len = _get(SAMPLE, o[1] + SNAPLEN_AT, "=I")
    cases = [
        # (id, corrupted block, block size, frames kept)
        ("num_pkts_far_more_than_fit", _set(SAMPLE, NUM_PKTS_AT, "=I", 10**6), BLOCK_SIZE, 4),
        ("num_pkts_one_more_than_chained", _set(SAMPLE, NUM_PKTS_AT, "=I", 5), BLOCK_SIZE, 4),
        ("first_frame_past_the_block", _set(SAMPLE, FIRST_AT, "=I", last_end + 64), BLOCK_SIZE, 0),
        ("first_frame_inside_the_descriptor", _set(SAMPLE, FIRST_AT, "=I", 16), BLOCK_SIZE, 0),
        ("first_frame_misaligned", _set(SAMPLE, FIRST_AT, "=I", BLOCK_DESC + 4), BLOCK_SIZE, 0),
        ("blk_len_beyond_the_block_size", _set(SAMPLE, BLK_LEN_AT, "=I", BLOCK_SIZE + 8), BLOCK_SIZE, 0),
        ("blk_len_cuts_the_last_frame", _set(SAMPLE, BLK_LEN_AT, "=I", o[3] + 100), BLOCK_SIZE, 3),
        ("next_offset_misaligned", _set(SAMPLE, o[1] + NEXT_AT, "=I", o[2] - o[1] + 4), BLOCK_SIZE, 2),
        ("next_offset_past_the_block", _set(SAMPLE, o[1] + NEXT_AT, "=I", 1 << 20), BLOCK_SIZE, 2),
        ("next_offset_zero_mid_chain", _set(SAMPLE, o[1] + NEXT_AT, "=I", 0), BLOCK_SIZE, 2),
        ("next_offset_into_own_header", _set(SAMPLE, o[0] + NEXT_AT, "=I", 8), BLOCK_SIZE, 0),
        ("snaplen_runs_into_the_next_frame",
         _set(_set(SAMPLE, o[1] + SNAPLEN_AT, "=I", frame1_len + 40), o[1] + LEN_AT, "=I", frame1_len + 40),
         BLOCK_SIZE, 1),
        ("mac_runs_into_the_next_frame", _set(SAMPLE, o[2] + MAC_AT, "=H", 4000), BLOCK_SIZE, 2),
        ("mac_inside_the_frame_header", _set(SAMPLE, o[2] + MAC_AT, "=H", 20), BLOCK_SIZE, 2),
        ("snaplen_runs_past_the_block",
         _set(_set(SAMPLE, o[3] + SNAPLEN_AT, "=I", 5000), o[3] + LEN_AT, "=I", 5000), BLOCK_SIZE, 3),
        ("snaplen_huge", _set(SAMPLE, o[0] + SNAPLEN_AT, "=I", 0xFFFFFFFF), BLOCK_SIZE, 0),
        ("copy_shorter_than_blk_len", SAMPLE[: o[3] + 90], BLOCK_SIZE, 3),
        ("copy_ends_inside_a_frame_header", SAMPLE[: o[2] + 30], BLOCK_SIZE, 2),
        ("block_larger_than_its_ring_slot", SAMPLE, 256, 0),
        ("block_shorter_than_its_header", SAMPLE[:40], BLOCK_SIZE, 0),
        ("nothing_at_all", b"", BLOCK_SIZE, 0),
    ]  # fmt: skip
    return [pytest.param(data, size, kept, id=name) for name, data, size, kept in cases]


@pytest.mark.parametrize(("data", "block_size", "kept"), _corrupt_cases())
def test_corrupt_blocks_are_reported_and_keep_the_frames_before_the_fault(
    data: bytes, block_size: int, kept: int
) -> None:
    block, report = parse_block(data, block_size)
    assert isinstance(report.corrupt, str) and report.corrupt
    assert _frames(block) == [f.data for f in _sample()[:kept]]
    assert block.times.tolist() == [f.time for f in _sample()[:kept]]
    _assert_inside(block, data)


def test_the_sample_block_itself_is_sound() -> None:
    # the corrupt cases above differ from it only in what they break
    block, report = parse_block(SAMPLE, BLOCK_SIZE)
    assert report.corrupt is None
    assert _frames(block) == [f.data for f in _sample()]


_frame_st = st.builds(
    Frame,
    data=st.binary(min_size=0, max_size=300),
    sec=st.integers(0, 2**32 - 1),
    nsec=st.integers(0, 999_999_999),
    hatype=st.sampled_from([ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE, 0xFFFF]),
    pkttype=st.sampled_from([PACKET_HOST, PACKET_OUTGOING, 3]),
)

# every field parse_block reads, in the block descriptor and in each frame
_HEAD_FIELDS = [NUM_PKTS_AT, FIRST_AT, BLK_LEN_AT, 8]
_FRAME_FIELDS = [NEXT_AT, SNAPLEN_AT, LEN_AT, MAC_AT, 4, 8, FRAME_HDR + 8, FRAME_HDR + 10]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_frame_st, min_size=1, max_size=12), data=st.data())
def test_mutated_or_cut_blocks_never_raise_and_never_point_outside(
    frames: list[Frame], data: st.DataObject
) -> None:
    block_bytes, offsets = build_block(frames)
    raw = bytearray(block_bytes)
    spots = st.one_of(
        st.integers(0, len(raw) - 1),
        st.sampled_from(_HEAD_FIELDS),
        st.builds(lambda o, f: o + f, st.sampled_from(offsets), st.sampled_from(_FRAME_FIELDS)),
    )
    for at, value in data.draw(st.lists(st.tuples(spots, st.integers(0, 255)), max_size=8)):
        raw[at] = value
    cut = data.draw(st.integers(0, len(raw)))
    blob = bytes(raw[:cut] if data.draw(st.booleans()) else raw)
    block_size = data.draw(st.sampled_from([BLOCK_SIZE, 4096, len(block_bytes), max(48, cut)]))
    block, report = parse_block(blob, block_size)
    _assert_inside(block, blob)
    assert set(block.linktypes.tolist()) <= {1, 101}
    assert report.frames >= len(block)
    assert report.corrupt is None or isinstance(report.corrupt, str)
    for i in range(len(block)):
        assert len(block.frame(i)) == int(block.lengths[i])


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(_frame_st, min_size=1, max_size=20))
def test_valid_blocks_give_back_every_kept_frame_exactly(frames: list[Frame]) -> None:
    data, _ = build_block(frames)
    block, report = parse_block(data, BLOCK_SIZE)
    kept = [f for f in frames if not (f.pkttype == PACKET_OUTGOING and f.hatype == ARPHRD_LOOPBACK)]
    assert report.corrupt is None and report.frames == len(frames)
    assert _frames(block) == [f.data for f in kept]
    assert block.times.tolist() == [f.time for f in kept]
    assert report.outgoing == len(frames) - len(kept)


# ---------------------------------------------------------------------------------------
# Real rings, inside namespaces of the test's own
# ---------------------------------------------------------------------------------------

# Runs inside a namespace: drives a LiveCapture through one scenario and prints what it saw
# as JSON (frames as hex, events, loss windows, counters, and wall-clock marks).
_CAPTURE = r"""
import ctypes, dataclasses, json, os, socket, subprocess, sys, time
from callcap.capture.live import LiveCapture
from callcap.capture.ring import RingSpec

args = json.loads(sys.argv[2])
frames, events, losses, marks = [], [], [], {}


def collect(cap, seconds, until=lambda: False):
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        got = cap.poll(0.02)
        for block in got.blocks:
            frames.extend({"t": t, "lt": lt, "hex": f.hex()} for t, lt, f in block.frames())
        events.extend(dataclasses.asdict(e) for e in got.events)
        losses.extend(dataclasses.asdict(w) for w in got.losses)


def tagged(tag):
    needle = tag.encode().hex()
    return sum(needle in f["hex"] for f in frames)


def kinds():
    return [e["kind"] for e in events]


def send(sock, where, tag, count, size=0):
    for n in range(count):
        sock.sendto(f"{tag} {n:05d} ".encode().ljust(size, b"."), where)


def socket_in(ns):
    # a socket of namespace `ns` (sockets keep the namespace they were made in)
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    other = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(other, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        if libc.setns(own, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(own)
        os.close(other)


def loopback_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no ICMP port unreachable
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return rx, tx, rx.getsockname()


def payloads():
    rx, tx, where = loopback_pair()
    with LiveCapture(["lo"], ring=RingSpec(1 << 16, 4, 5)) as cap:
        marks["from"] = time.time()
        for n, size in enumerate(args["sizes"]):
            tx.sendto(f"payload {n:05d} ".encode().ljust(size, bytes([65 + n])), where)
        marks["to"] = time.time()
        marks["port"] = where[1]
        marks["sport"] = tx.getsockname()[1]
        collect(cap, 3, lambda: tagged("payload ") >= len(args["sizes"]))
        collect(cap, 0.1)
        stats = cap.stats()
    return stats


def overrun():
    rx, tx, where = loopback_pair()
    spec = RingSpec(block_size=8192, blocks=4, retire_timeout_ms=1)
    with LiveCapture(["lo"], ring=spec) as cap:
        send(tx, where, "before", 5)
        collect(cap, 3, lambda: tagged("before ") >= 5)
        marks["before"] = len(frames)
        send(tx, where, "burst", args["burst"])  # far more than 4 blocks hold; nobody reads
        time.sleep(0.05)
        collect(cap, 0.2)
        marks["burst"] = len(frames)
        marks["events_after_burst"] = kinds()
        marks["stats_after_burst"] = dataclasses.asdict(cap.stats())
        send(tx, where, "after", 5)
        collect(cap, 3, lambda: tagged("after ") >= 5 and "overrun_ended" in kinds())
        collect(cap, 0.05)
        stats = cap.stats()
    return stats


def snaplen():
    rx, tx, where = loopback_pair()
    with LiveCapture(["lo"], snaplen=args["snaplen"], ring=RingSpec(1 << 16, 4, 5)) as cap:
        send(tx, where, "long", 5, 500)
        send(tx, where, "short", 5, 40)
        collect(cap, 3, lambda: tagged("short ") >= 5)
        collect(cap, 0.1)
        stats = cap.stats()
    return stats


def outage():
    dev, where = args["dev"], (args["ip"], args["port"])
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(where)
    tx = socket_in(args["peer_ns"])
    with LiveCapture([dev], ring=RingSpec(1 << 16, 8, args["retire_ms"])) as cap:
        send(tx, where, "before", 5)
        collect(cap, 3, lambda: tagged("before ") >= 5)
        send(tx, where, "late", 5)  # still in the ring when the link goes down
        time.sleep(0.03)
        marks["down_from"] = time.time()
        subprocess.run(["ip", "link", "set", dev, "down"], check=True)
        marks["down_to"] = time.time()
        collect(cap, 2, lambda: "interface_down" in kinds())
        collect(cap, 0.05)
        marks["up_from"] = time.time()
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        marks["up_to"] = time.time()
        collect(cap, 3, lambda: "interface_up" in kinds())
        marks["resumed"] = time.time()
        send(tx, where, "after", 5)
        collect(cap, 3, lambda: tagged("after ") >= 5 and losses)
        collect(cap, 0.05)
        stats = cap.stats()
    return stats


stats = globals()[sys.argv[1]]()
json.dump({"frames": frames, "events": events, "losses": losses, "marks": marks,
           "stats": dataclasses.asdict(stats)}, sys.stdout)
"""


def _run_capture(ns: str, scenario: str, **args: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [*netns_exec(ns), sys.executable, "-c", _CAPTURE, scenario, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Udp:
    t: float
    linktype: int
    frame: bytes
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes

    @property
    def tag(self) -> str:
        return self.payload.split(b" ", 1)[0].decode("ascii", "replace")

    @property
    def seq(self) -> int:
        return int(self.payload.split(b" ")[1])


def _udp(frames: list[dict[str, Any]]) -> list[Udp]:
    """The IPv4/UDP datagrams among captured Ethernet frames (ARP, IPv6 noise left out)."""
    out = []
    for f in frames:
        frame = bytes.fromhex(f["hex"])
        if f["lt"] != 1 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        assert len(frame) == 14 + total  # the whole datagram, nothing cut, nothing after
        sport, dport, ulen = struct.unpack_from(">HHH", frame, 14 + ihl)
        assert ulen == total - ihl
        payload = frame[14 + ihl + 8 : 14 + total]
        src, dst = (socket.inet_ntoa(frame[a : a + 4]) for a in (26, 30))
        out.append(Udp(f["t"], f["lt"], frame, src, dst, sport, dport, payload))
    return out


def _of(datagrams: list[Udp], tag: str) -> list[Udp]:
    return [d for d in datagrams if d.tag == tag]


def test_loopback_capture_gives_every_datagram_once_with_its_exact_payload(netns: str) -> None:
    # 4000 and 9000 bytes: larger than the ring's nominal frame size (2048), which V3 ignores
    sizes = [0, 1, 172, 1400, 4000, 9000, 33]
    got = _run_capture(netns, "payloads", sizes=sizes)
    marks = got["marks"]
    datagrams = _udp(got["frames"])
    expected = [
        f"payload {n:05d} ".encode().ljust(size, bytes([65 + n])) for n, size in enumerate(sizes)
    ]
    assert [d.payload for d in datagrams] == expected  # in order, each once
    assert len(got["frames"]) == len(sizes)  # and nothing else on this namespace's lo
    for d in datagrams:
        assert d.linktype == 1
        assert d.frame[:12] == bytes(12)  # loopback's zeroed Ethernet addresses
        assert (d.src, d.dst) == ("127.0.0.1", "127.0.0.1")
        assert (d.sport, d.dport) == (marks["sport"], marks["port"])
        assert marks["from"] <= d.t <= marks["to"]
    times = [d.t for d in datagrams]
    assert times == sorted(times)
    stats = got["stats"]
    assert stats["frames"] == len(sizes)
    assert stats["kernel_packets"] == 2 * len(sizes)  # the kernel saw both copies
    assert stats["kernel_dropped"] == stats["truncated"] == stats["corrupt_blocks"] == 0
    assert got["events"] == [] and got["losses"] == []


def test_an_overrun_ring_counts_its_drops_and_reports_the_loss_window(netns: str) -> None:
    burst = 3000
    got = _run_capture(netns, "overrun", burst=burst)
    marks, stats = got["marks"], got["stats"]
    datagrams = _udp(got["frames"])
    assert len(datagrams) == len(got["frames"])
    before = datagrams[: marks["before"]]
    burst_kept = datagrams[marks["before"] : marks["burst"]]
    after = datagrams[marks["burst"] :]
    assert [(d.tag, d.seq) for d in before] == [("before", n) for n in range(5)]
    assert [(d.tag, d.seq) for d in after] == [("after", n) for n in range(5)]
    # the ring kept the start of the burst, in order, and lost the rest
    kept = len(burst_kept)
    assert 0 < kept < burst
    assert [(d.tag, d.seq) for d in burst_kept] == [("burst", n) for n in range(kept)]
    for d in burst_kept:
        assert d.payload == f"burst {d.seq:05d} ".encode()

    dropped = stats["kernel_dropped"]
    assert dropped > 0
    assert dropped <= 2 * (burst - kept)  # only copies of datagrams never seen were lost
    assert stats["kernel_freezes"] >= 1
    assert marks["stats_after_burst"]["kernel_dropped"] == dropped  # all lost in the burst
    assert marks["events_after_burst"] == ["overrun_started"]
    assert [e["kind"] for e in got["events"]] == ["overrun_started", "overrun_ended"]
    ended = got["events"][1]
    assert ended["interface"] == "lo"
    assert ended["dropped"] == dropped
    assert ended["freezes"] == stats["kernel_freezes"]

    [window] = got["losses"]
    assert window["reason"] == "overrun" and window["interface"] == "lo"
    assert window["frames"] == dropped
    # from the last frame before the ring filled to the first one after it had room again
    assert max(d.t for d in before + burst_kept) <= window["start"] <= window["end"]
    assert window["end"] <= min(d.t for d in after)
    assert stats["frames"] == len(datagrams)
    assert stats["truncated"] == stats["corrupt_blocks"] == 0


def test_frames_cut_by_the_snap_length_are_counted_and_not_returned(netns: str) -> None:
    got = _run_capture(netns, "snaplen", snaplen=100)
    datagrams = _udp(got["frames"])
    assert [(d.tag, d.seq) for d in datagrams] == [("short", n) for n in range(5)]
    assert [len(d.payload) for d in datagrams] == [40] * 5
    assert len(got["frames"]) == 5
    stats = got["stats"]
    assert stats["truncated"] == 5  # each long datagram once, as the short ones are counted
    assert stats["frames"] == 5
    assert stats["kernel_packets"] == 20
    assert stats["kernel_dropped"] == stats["corrupt_blocks"] == 0


# The last frames before the outage sit in a block the kernel retires after its timeout: a
# short one hands the block over before the capture notices the link is down, a long one
# only after (while the link is down, or once it is back).
@pytest.mark.parametrize("retire_ms", [5, 300], ids=["retired_before", "retired_during"])
def test_capture_survives_its_interface_going_down_and_coming_back(
    netns_pair: NetnsPair, retire_ms: int
) -> None:
    pair = netns_pair
    got = _run_capture(
        pair.b, "outage", dev=pair.veth_b, ip=pair.ip_b, port=5060, peer_ns=pair.a,
        retire_ms=retire_ms,
    )  # fmt: skip
    marks = got["marks"]
    datagrams = [d for d in _udp(got["frames"]) if d.dport == 5060]
    tags = [(d.tag, d.seq) for d in datagrams]
    assert tags == (
        [("before", n) for n in range(5)]
        + [("late", n) for n in range(5)]
        + [("after", n) for n in range(5)]
    )
    for d in datagrams:
        assert (d.src, d.dst) == (pair.ip_a, pair.ip_b)
        assert d.payload == f"{d.tag} {d.seq:05d} ".encode()
    ahead = [d for d in datagrams if d.tag != "after"]
    after = [d for d in datagrams if d.tag == "after"]
    assert max(d.t for d in ahead) <= marks["down_from"]
    assert min(d.t for d in after) >= marks["resumed"]

    kinds = [e["kind"] for e in got["events"]]
    assert kinds == ["interface_down", "interface_up"]
    assert all(e["interface"] == pair.veth_b for e in got["events"])
    up = got["events"][1]
    assert 0 < up["outage_s"] <= marks["resumed"] - marks["down_from"]

    [window] = got["losses"]
    assert window["reason"] == "interface_down" and window["interface"] == pair.veth_b
    assert window["frames"] is None  # the kernel does not count what a downed link never saw
    # the window spans the outage: from the last frame before it to the first one after
    # (the interface may still send a frame of its own while it is being taken down)
    assert max(d.t for d in ahead) <= window["start"] <= marks["down_to"]
    assert marks["up_from"] <= window["end"] <= min(d.t for d in after)
    stats = got["stats"]
    assert stats["kernel_dropped"] == stats["truncated"] == stats["corrupt_blocks"] == 0
