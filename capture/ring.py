"""Live capture through a TPACKET_V3 memory-mapped ring: one wake-up, a whole block of frames.

Why a ring: a packet socket read with ``recvmsg`` costs one system call and one Python
object per frame, some 10 µs at the rates a PBX's mirror port carries — more than everything
else the recorder does with the frame.  With ``PACKET_RX_RING`` and ``TPACKET_V3``
(Documentation/networking/packet_mmap.rst) the kernel writes frames back to back into
fixed-size *blocks* of a ring shared with the process, and hands a block over when it is full
or when its retire timeout passes.  The process then takes the block in one copy, gives it
straight back to the kernel and works on the copy: a :class:`~callcap.capture.block.FrameBlock`
like the ones read from capture files, which the pipeline's fast lane classifies with array
operations.  No system call and no Python object per frame.

Layout (``linux/if_packet.h``): a block starts with ``tpacket_block_desc`` (version, private
offset, then ``tpacket_hdr_v1``: status, frame count, offset of the first frame, bytes used,
sequence number, first and last time); each frame starts with a ``tpacket3_hdr`` (offset of
the next frame, time, captured and wire length, status, MAC and network offsets, VLAN
fields), followed by its ``sockaddr_ll`` (interface, hardware type, packet type) and, at the
MAC offset, the frame itself.

Everything the kernel wrote is checked before it is believed (:func:`parse_block`): a block
whose header or frame chain points outside itself is counted as corrupt and its remaining
frames skipped; a frame cut short (longer than the ring's frame space, or than the snap
length) is counted and skipped, since a cut SIP message cannot be parsed and cut audio is not
audio.  Kernel drops come from ``PACKET_STATISTICS`` (``tpacket_stats_v3``: drops and queue
freezes), which the kernel resets on every read.
"""

from __future__ import annotations

import errno
import mmap
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from callcap.capture.block import FrameBlock, values_at
from callcap.capture.bpf import attach_filter
from callcap.errors import CaptureError

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_ADD_MEMBERSHIP: Final = 1
PACKET_MR_PROMISC: Final = 1
PACKET_STATISTICS: Final = 6
PACKET_OUTGOING: Final = 4
PACKET_RX_RING: Final = 5
PACKET_VERSION: Final = 10
TPACKET_V3: Final = 2

TP_STATUS_KERNEL: Final = 0
TP_STATUS_USER: Final = 1
TP_STATUS_LOSING: Final = 4  # the block closed while the kernel had drops since the last stats read

V3_ALIGNMENT: Final = 8  # frames of a TPACKET_V3 block are 8-byte aligned (af_packet.c)
BLOCK_DESC_SIZE: Final = 48  # tpacket_block_desc with tpacket_hdr_v1
FRAME_HDR_SIZE: Final = 48  # tpacket3_hdr, TPACKET_ALIGNed
SOCKADDR_LL_AT: Final = FRAME_HDR_SIZE
_LOOPBACK_HATYPE: Final = 772

DLT_EN10MB: Final = 1
DLT_RAW: Final = 101

# ARPHRD_* (linux/if_arp.h) → how the frame begins on an AF_PACKET SOCK_RAW socket.
_ARPHRD_LINKTYPE: Final = {
    1: DLT_EN10MB,  # ARPHRD_ETHER
    _LOOPBACK_HATYPE: DLT_EN10MB,  # ARPHRD_LOOPBACK: Linux gives loopback a zeroed Ethernet header
    65534: DLT_RAW,  # ARPHRD_NONE: tun devices, WireGuard
    778: DLT_RAW,  # ARPHRD_IPGRE
    776: DLT_RAW,  # ARPHRD_SIT
    768: DLT_RAW,  # ARPHRD_TUNNEL
    769: DLT_RAW,  # ARPHRD_TUNNEL6
    512: DLT_RAW,  # ARPHRD_PPP
}


def arphrd_linktype(hatype: int) -> int:
    """The capture link type of frames from an interface of hardware type ``hatype``."""
    return _ARPHRD_LINKTYPE.get(hatype, DLT_EN10MB)


_REQ3 = struct.Struct("=7I")  # tpacket_req3
_STATS_V3 = struct.Struct("=III")  # tpacket_stats_v3: packets, drops, freeze_q_cnt
# tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1's block_status,
# num_pkts, offset_to_first_pkt, blk_len
_BLOCK_HEAD = struct.Struct("=6I")
_BLOCK_STATUS_AT: Final = 8

# tpacket3_hdr fields (offsets within the frame header) read for every frame of a block
_TP_SEC: Final = 4
_TP_NSEC: Final = 8
_TP_SNAPLEN: Final = 12
_TP_LEN: Final = 16
_TP_MAC: Final = 24
_SLL_HATYPE: Final = SOCKADDR_LL_AT + 8
_SLL_PKTTYPE: Final = SOCKADDR_LL_AT + 10


@dataclass(frozen=True, slots=True)
class RingSpec:
    """The shape of one socket's ring: ``blocks`` blocks of ``block_size`` bytes, each
    handed over when full or ``retire_timeout_ms`` after its first frame."""

    block_size: int = 1 << 20
    blocks: int = 64
    retire_timeout_ms: int = 20
    frame_size: int = 2048  # TPACKET_V3 packs frames; this only has to divide block_size

    @property
    def size(self) -> int:
        return self.block_size * self.blocks


@dataclass(slots=True)
class BlockReport:
    """What :func:`parse_block` found besides the frames."""

    frames: int = 0  # frames the block said it holds and that were walked
    truncated: int = 0  # frames cut short by the ring's frame space or the snap length
    outgoing: int = 0  # loopback's outgoing copies (the incoming copy is kept, as libpcap does)
    corrupt: str | None = None  # why the rest of the block was skipped
    losing: bool = False  # TP_STATUS_LOSING: the kernel dropped frames before this block closed
    first_ts: float | None = None  # the block's oldest frame time
    last_ts: float | None = None  # its newest


def parse_block(data: bytes, block_size: int) -> tuple[FrameBlock, BlockReport]:
    """The frames of one ring block (a copy of it: ``data``), checked against its bounds.

    Sans-IO: the kernel's bytes in, a :class:`FrameBlock` of the frames worth decoding out
    (their offsets point into ``data``), plus what was skipped and why.  The walk follows
    ``tp_next_offset`` from frame to frame (one small integer read per frame); every other
    header field is read for all frames at once.
    """
    report = BlockReport()
    if len(data) < BLOCK_DESC_SIZE:
        report.corrupt = "block shorter than its header"
        return _empty(), report
    _version, _priv, status, count, first, used = _BLOCK_HEAD.unpack_from(data, 0)
    report.losing = bool(status & TP_STATUS_LOSING)
    limit = min(used, len(data), block_size)
    if count == 0:
        return _empty(), report
    if used > block_size or first < BLOCK_DESC_SIZE or first >= limit:
        report.corrupt = f"block header out of bounds (first frame at {first}, {used} bytes used)"
        return _empty(), report
    # Cap the walk: a frame takes at least a header's worth of the block.
    most = (limit - first) // FRAME_HDR_SIZE
    if count > most:
        report.corrupt = f"block claims {count} frames, room for at most {most}"
        count = most
    words = memoryview(data)[: len(data) & ~3].cast("I")
    # The walk does only what it must per frame: stay inside the block (a frame header
    # and the link header's least must fit) and follow the chain.  Alignment is checked
    # afterwards for all frames at once: a misaligned offset reads a wrong step, but one
    # still bounded by the block, and the walk is cut at the first misaligned frame.
    offsets: list[int] = []
    append = offsets.append
    last = limit - FRAME_HDR_SIZE - 20
    at = first
    ended = False
    for _ in range(count):
        if at > last:
            break
        append(at)
        step = words[at >> 2]
        if not step:
            ended = True
            break
        at += step
    del words
    walked = len(offsets)
    hdr = np.array(offsets, dtype=np.int64)
    misaligned = np.flatnonzero(hdr & (V3_ALIGNMENT - 1))
    if len(misaligned):
        walked = int(misaligned[0])
        report.corrupt = f"frame {walked} at offset {offsets[walked]} misaligned"
        hdr = hdr[:walked]
    elif walked < count:
        if ended:
            report.corrupt = f"frame chain ends at frame {walked - 1} of {count}"
        else:
            report.corrupt = f"frame {walked} at offset {at} outside the block"
    report.frames = walked
    if not walked:
        return _empty(), report
    snaplen = values_at(data, hdr + _TP_SNAPLEN, "=u4").astype(np.int64)
    wire = values_at(data, hdr + _TP_LEN, "=u4").astype(np.int64)
    mac = values_at(data, hdr + _TP_MAC, "=u2").astype(np.int64)
    hatype = values_at(data, hdr + _SLL_HATYPE, "=u2").astype(np.int64)
    pkttype = values_at(data, hdr + _SLL_PKTTYPE, "u1")
    sec = values_at(data, hdr + _TP_SEC, "=u4")
    nsec = values_at(data, hdr + _TP_NSEC, "=u4")
    times = sec + nsec / 1e9  # the same arithmetic as a nanosecond pcap's records
    starts = hdr + mac
    # A frame's bytes must lie inside the block (and before the next frame).
    ends = np.empty(walked, dtype=np.int64)
    ends[:-1] = hdr[1:]
    ends[-1] = limit
    inside = (mac >= SOCKADDR_LL_AT + 20) & (starts + snaplen <= ends)
    if not inside.all():
        bad = int(np.flatnonzero(~inside)[0])
        report.corrupt = f"frame {bad} at offset {offsets[bad]} runs past its space"
        inside[bad:] = False
    cut = snaplen < wire
    outgoing = (pkttype == PACKET_OUTGOING) & (hatype == _LOOPBACK_HATYPE)
    # a loopback outgoing copy is skipped as a duplicate first, cut or not: on lo a datagram
    # cut by the snap length is one truncated frame, not two
    report.truncated = int((cut & inside & ~outgoing).sum())
    report.outgoing = int((outgoing & inside).sum())
    keep = inside & ~cut & ~outgoing
    # The oldest and newest, not the first and last: a frame's time is when the kernel (or
    # the sender, for an outgoing copy) stamped it, and ring order need not follow it.
    report.first_ts = float(times.min())
    report.last_ts = float(times.max())
    if not keep.all():
        starts, snaplen, times, hatype = starts[keep], snaplen[keep], times[keep], hatype[keep]
    return (
        FrameBlock(
            data=data, starts=starts, lengths=snaplen, times=times, linktypes=_linktypes(hatype)
        ),
        report,
    )


def _linktypes(hatype: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The link type of each frame from its interface's hardware type (all alike, mostly)."""
    if not len(hatype):
        return hatype
    first = int(hatype[0])
    if (hatype == first).all():
        return np.full(len(hatype), arphrd_linktype(first), dtype=np.int64)
    uniq, inverse = np.unique(hatype, return_inverse=True)
    table = np.array([arphrd_linktype(int(h)) for h in uniq], dtype=np.int64)
    return table[inverse]


def _empty() -> FrameBlock:
    none = np.zeros(0, dtype=np.int64)
    return FrameBlock(b"", none, none, np.zeros(0, dtype=np.float64), none)


@dataclass(frozen=True, slots=True)
class RingStats:
    """Kernel counters of a ring socket since the previous read (the kernel resets them)."""

    packets: int  # frames the filter accepted, dropped ones included
    drops: int  # frames lost because the ring was full
    freezes: int  # times the kernel found the ring full (queue frozen)


@dataclass(slots=True)
class RingSocket:
    """One ``AF_PACKET`` socket with its TPACKET_V3 receive ring, bound to one interface."""

    interface: str
    spec: RingSpec
    bpf: str | None = None
    promiscuous: bool = False
    snaplen: int | None = None
    sock: socket.socket = field(init=False)
    ring: mmap.mmap = field(init=False)
    ifindex: int = field(init=False, default=0)
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        spec = self.spec
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError as exc:
            raise CaptureError(
                f"{self.interface}: capturing needs CAP_NET_RAW ({exc.strerror})"
            ) from exc
        except OSError as exc:
            raise CaptureError(
                f"{self.interface}: cannot open a packet socket ({exc.strerror})"
            ) from exc
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            if self.bpf or self.snaplen is not None:
                # without an expression, an accept-all program still applies the snap length
                attach_filter(sock, self.bpf or "", self.snaplen)
            req = _REQ3.pack(
                spec.block_size,
                spec.blocks,
                spec.frame_size,
                spec.block_size // spec.frame_size * spec.blocks,
                spec.retire_timeout_ms,
                0,
                0,
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.ring = mmap.mmap(
                sock.fileno(), spec.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            if self.interface != "any":
                self.ifindex = socket.if_nametoindex(self.interface)
                sock.bind((self.interface, ETH_P_ALL))
            if self.promiscuous and self.interface != "any":
                mreq = struct.pack("=IHH8s", self.ifindex, PACKET_MR_PROMISC, 0, b"\x00" * 8)
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        except OSError as exc:
            sock.close()
            what = exc.strerror or str(exc)
            if exc.errno in (errno.ENOMEM, errno.EINVAL):
                what += f" (ring of {spec.blocks} blocks of {spec.block_size} bytes)"
            raise CaptureError(f"{self.interface}: {what}") from exc
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self, limit: int) -> list[tuple[FrameBlock, BlockReport]]:
        """The blocks the kernel has handed over, in ring order (at most ``limit``), each
        copied out and given straight back."""
        ring = self.ring
        spec = self.spec
        size = spec.block_size
        out: list[tuple[FrameBlock, BlockReport]] = []
        while len(out) < limit:
            base = self._next * size
            (status,) = struct.unpack_from("=I", ring, base + _BLOCK_STATUS_AT)
            if not status & TP_STATUS_USER:
                break
            (used,) = struct.unpack_from("=I", ring, base + 20)
            data = ring[base : base + min(max(used, BLOCK_DESC_SIZE), size)]
            struct.pack_into("=I", ring, base + _BLOCK_STATUS_AT, TP_STATUS_KERNEL)
            self._next = (self._next + 1) % spec.blocks
            out.append(parse_block(data, size))
        return out

    def stats(self) -> RingStats:
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)
        return RingStats(*_STATS_V3.unpack(raw))

    def pending_error(self) -> int:
        """The socket's pending error (ENETDOWN when its interface went down), cleared."""
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self) -> None:
        try:
            self.ring.close()
        finally:
            self.sock.close()


def interface_is_up(name: str) -> bool | None:
    """IFF_UP of an interface (None if there is no such interface now)."""
    try:
        with open(f"/sys/class/net/{name}/flags", encoding="ascii") as f:
            return bool(int(f.read().strip(), 16) & 0x1)
    except (OSError, ValueError):
        return None


def wait_readable(socks: Sequence[RingSocket], timeout: float) -> list[tuple[RingSocket, int]]:
    """``poll`` the ring sockets: those with a block ready or an error, and their events."""
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.POLLIN | select.POLLERR)
        by_fd[s.fileno()] = s
    try:
        events = poller.poll(max(0, int(timeout * 1000)))
    except InterruptedError:
        return []
    return [(by_fd[fd], ev) for fd, ev in events if fd in by_fd]


def can_capture() -> bool:
    """True if this process may open packet sockets (root or CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except OSError:
        return False
    return True


__all__ = [
    "BlockReport",
    "RingSocket",
    "RingSpec",
    "RingStats",
    "arphrd_linktype",
    "can_capture",
    "interface_is_up",
    "parse_block",
    "wait_readable",
]
