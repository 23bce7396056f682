"""Live capture from interfaces through Linux ``AF_PACKET`` sockets with a kernel BPF filter.

Frames come off the socket as raw bytes and go through the same decoders as capture files:
no per-packet scapy dissection.  scapy compiles the filter expression (libpcap's grammar) into
BPF bytecode and attaches it, so the kernel drops everything that is not SIP or media before
it ever reaches Python.

One socket per configured interface; ``any`` is one socket bound to every interface.  Each
frame's link type comes from the interface's hardware type, so a box with Ethernet, VLAN
trunks and tunnels mixes them safely.  On loopback the kernel shows every packet twice
(outgoing and incoming): the outgoing copy is dropped, as libpcap does.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from callcap.errors import CaptureError

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_RCVBUF = socket.SO_RCVBUF
SO_TIMESTAMPNS = 35  # asm-generic/socket.h; also the SCM_ type of the ancillary message
_TIMESPEC = struct.Struct("=qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_TPACKET_STATS = struct.Struct("=II")
_MREQ = struct.Struct("=IHH8s")

DLT_EN10MB = 1
DLT_RAW = 101
DLT_LINUX_SLL = 113

# ARPHRD_* (linux/if_arp.h) → how the frame begins on an AF_PACKET SOCK_RAW socket.
_ARPHRD_LINKTYPE = {
    1: DLT_EN10MB,  # ARPHRD_ETHER
    772: DLT_EN10MB,  # ARPHRD_LOOPBACK: Linux gives loopback a zeroed Ethernet header
    65534: DLT_RAW,  # ARPHRD_NONE: tun devices, WireGuard
    778: DLT_RAW,  # ARPHRD_IPGRE
    776: DLT_RAW,  # ARPHRD_SIT
    768: DLT_RAW,  # ARPHRD_TUNNEL
    769: DLT_RAW,  # ARPHRD_TUNNEL6
    512: DLT_RAW,  # ARPHRD_PPP
}
_LOOPBACK_HATYPE = 772


def build_filter(sip_ports: Sequence[int], rtp_port_range: tuple[int, int] | None) -> str:
    """The BPF expression for SIP and media, also inside VLAN tags and for IP fragments.

    Non-first IP fragments carry no UDP header, so they are let through by their fragment
    fields (IPv4 offset/MF, IPv6 fragment header) and reassembled in user space.
    """
    ports = " or ".join(f"port {p}" for p in sorted(set(sip_ports)))
    udp = (
        "udp"
        if rtp_port_range is None
        else f"(udp and (portrange {rtp_port_range[0]}-{rtp_port_range[1]} or {ports}))"
    )
    core = f"{udp} or (tcp and ({ports})) or (ip[6:2] & 0x3fff != 0) or (ip6 and ip6[6] == 44)"
    return f"({core}) or (vlan and ({core}))"


@dataclass(frozen=True, slots=True)
class SocketStats:
    received: int
    dropped: int


class _Socket:
    __slots__ = ("interface", "sock")

    def __init__(self, interface: str, bpf: str | None, promiscuous: bool, bufsize: int) -> None:
        self.interface = interface
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError as exc:
            raise CaptureError(
                f"{interface}: capturing needs CAP_NET_RAW ({exc.strerror})"
            ) from exc
        except OSError as exc:
            raise CaptureError(
                f"{interface}: cannot open a packet socket ({exc.strerror})"
            ) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if bpf:
                _attach_filter(sock, bpf)
            if interface != "any":  # an unbound packet socket hears every interface
                sock.bind((interface, ETH_P_ALL))
            if promiscuous and interface != "any":
                index = socket.if_nametoindex(interface)
                mreq = _MREQ.pack(index, PACKET_MR_PROMISC, 0, b"\x00" * 8)
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise CaptureError(f"{interface}: {exc.strerror or exc}") from exc
        self.sock = sock

    def stats(self) -> SocketStats:
        """Kernel counters since the last call (PACKET_STATISTICS resets them on read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        received, dropped = _TPACKET_STATS.unpack(raw)
        return SocketStats(received, dropped)


def _attach_filter(sock: socket.socket, expression: str) -> None:
    """Compile with libpcap (through scapy) for Ethernet framing and attach to the socket.

    Compiling for a fixed link type needs no interface and no privileges; every socket here
    is a SOCK_RAW packet socket whose frames start with an Ethernet header (loopback
    included), which is what the filter offsets assume.
    """
    try:
        from scapy.arch.common import compile_filter
        from scapy.arch.linux import SO_ATTACH_FILTER, free_filter  # type: ignore[attr-defined]
        from scapy.libs.structures import sock_fprog
    except ImportError as exc:  # pragma: no cover - scapy is a dependency
        raise CaptureError(f"cannot compile BPF filter: {exc}") from exc
    try:
        program = compile_filter(expression, linktype=DLT_EN10MB)
    except Exception as exc:  # scapy raises its own types for libpcap errors
        raise CaptureError(f"cannot compile BPF filter {expression!r}: {exc}") from exc
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, SO_ATTACH_FILTER, sock_fprog(program.bf_len, program.bf_insns)
        )
    finally:
        free_filter(program)


class LiveCapture:
    """Frames from one or more interfaces, as ``(ts, linktype, frame)`` like a capture file."""

    def __init__(
        self,
        interfaces: Sequence[str],
        *,
        bpf: str | None = None,
        promiscuous: bool = False,
        snaplen: int = 65535,
        bufsize: int = 32 * 1024 * 1024,
    ) -> None:
        if not interfaces:
            raise CaptureError("no interface to capture on")
        self.snaplen = snaplen
        self.bpf = bpf
        self._sockets: list[_Socket] = []
        try:
            for name in interfaces:
                self._sockets.append(_Socket(name, bpf, promiscuous, bufsize))
        except CaptureError:
            self.close()
            raise
        self.received = 0
        self.dropped = 0

    @property
    def interfaces(self) -> list[str]:
        return [s.interface for s in self._sockets]

    def poll(self, timeout: float, max_frames: int = 4096) -> list[tuple[float, int, bytes]]:
        """Frames ready within ``timeout`` seconds (at most ``max_frames``; empty on timeout)."""
        socks = [s.sock for s in self._sockets]
        try:
            ready, _, _ = select.select(socks, [], [], timeout)
        except InterruptedError:
            return []
        frames: list[tuple[float, int, bytes]] = []
        snaplen = self.snaplen
        for sock in ready:
            while len(frames) < max_frames:
                try:
                    data, ancdata, _flags, addr = sock.recvmsg(snaplen, _ANC_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                # addr = (ifname, proto, pkttype, hatype, hwaddr)
                if addr[2] == PACKET_OUTGOING and addr[3] == _LOOPBACK_HATYPE:
                    continue
                ts = _kernel_time(ancdata)
                linktype = _ARPHRD_LINKTYPE.get(addr[3], DLT_EN10MB)
                frames.append((ts, linktype, data))
        return frames

    def stats(self) -> SocketStats:
        """Cumulative kernel counters of all sockets: packets the filter passed, packets dropped."""
        for s in self._sockets:
            delta = s.stats()
            self.received += delta.received
            self.dropped += delta.dropped
        return SocketStats(self.received, self.dropped)

    def close(self) -> None:
        for s in self._sockets:
            s.sock.close()
        self._sockets.clear()

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kernel_time(ancdata: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive timestamp (SO_TIMESTAMPNS), not the time Python got round to it."""
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
            sec: int
            nsec: int
            sec, nsec = _TIMESPEC.unpack_from(value)
            return sec + nsec * 1e-9
    return time.time()


def can_capture() -> bool:
    """True if this process may open packet sockets (root or CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except OSError:
        return False
    return True


__all__ = ["LiveCapture", "SocketStats", "build_filter", "can_capture"]
