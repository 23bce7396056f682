"""The live capture filter: which frames the kernel passes up at all.

The expression uses libpcap's grammar and is compiled by libpcap through scapy, then attached
to the packet socket, so that everything that is neither SIP nor media is dropped in the
kernel, before it costs the ring space or the recorder any time.  The filter's accept value
is the snap length: the kernel cuts a longer frame there and says so (``tp_snaplen`` below
``tp_len``), and the ring counts it.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from typing import Final

from callcap.errors import CaptureError

DLT_EN10MB: Final = 1
_BPF_RET_K: Final = 0x06  # BPF_RET | BPF_K


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


def attach_filter(sock: socket.socket, expression: str, snaplen: int | None = None) -> None:
    """Compile ``expression`` for Ethernet framing and attach it to ``sock``.

    Compiling for a fixed link type needs no interface and no privileges; every packet
    socket here is SOCK_RAW, whose frames start with an Ethernet header (loopback included),
    which is what the filter's offsets assume.  With ``snaplen``, every accepting return
    of the program returns it instead of libpcap's default.
    """
    try:
        from scapy.arch.common import compile_filter
        from scapy.arch.linux import SO_ATTACH_FILTER, free_filter  # type: ignore[attr-defined]
        from scapy.libs.structures import bpf_insn, sock_fprog
    except ImportError as exc:  # pragma: no cover - scapy is a dependency
        raise CaptureError(f"cannot compile BPF filter: {exc}") from exc
    try:
        program = compile_filter(expression, linktype=DLT_EN10MB)
    except Exception as exc:  # scapy raises its own types for libpcap errors
        raise CaptureError(f"cannot compile BPF filter {expression!r}: {exc}") from exc
    try:
        n = program.bf_len
        insns = (bpf_insn * n)()
        for i in range(n):
            src = program.bf_insns[i]
            k = src.k
            if snaplen is not None and src.code == _BPF_RET_K and k:
                k = snaplen
            insns[i] = bpf_insn(src.code, src.jt, src.jf, k)
        fprog = sock_fprog(n, ctypes.cast(insns, type(program.bf_insns)))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    finally:
        free_filter(program)


__all__ = ["attach_filter", "build_filter"]
