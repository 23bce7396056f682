"""Structured fuzzing of the protocols callcap parses, at scale, through the recorder.

    python bench/fuzz_structured.py --inputs 10000000 --seed 1 --jobs 2   # the full run
    python bench/fuzz_structured.py --inputs 20000 --seed 7                # a quick look

Where ``bench/fuzz_corpus.py`` flips bytes of whole captures, this builds the inputs from
the protocols' own structure — so they get past the first length check — then mutates
some of them at the byte level too.  An *input* is one unit of hostile traffic, and the
targets cover:

* ``sip_udp``: SIP messages — odd start lines, huge header values, thousands of headers,
  folded lines, compact forms, duplicate or lying ``Content-Length``, multipart bodies,
  INFO keys, bare LF or CR line ends, NULs and bytes that are not UTF-8;
* ``sdp``: SDP bodies — IPv4/IPv6/garbage connection lines, ports 0 to 70000, hundreds of
  ``m=`` lines, odd ``rtpmap``/``fmtp``, ``a=crypto`` keys, directions, on both sides;
* ``rtp``: RTP to the ports the call negotiated — version, padding, CSRC and extension
  fields that lie, sequence and timestamp jumps, SSRC changes, RFC 4733 events of every
  shape, and RTCP compound packets;
* ``sip_tcp``: SIP over TCP — a stream of messages cut at random points, its segments
  reordered, duplicated, overlapped with other bytes, dropped, around a sequence wrap,
  with SYN/FIN/RST where they do not belong and ``Content-Length`` that lies;
* ``fragments``: IPv4 and IPv6 fragments of SIP and RTP datagrams — out of order,
  overlapping with different bytes, missing, duplicated, past 64 KiB, tiny;
* ``capture_file``: pcap and pcapng files — byte order, time resolution, snap length, link
  types, interface and block structure (unknown, truncated and lying blocks) — read by
  the capture reader.

Inputs come in *sessions* of a few hundred, each on a fresh recorder that first sees a
valid call being set up (so RTP and in-dialog requests reach the code behind the router),
alternately as ``callcap record`` feeds blocks (:meth:`Pipeline.run_blocks`) and as the
daemon's replay path does (:meth:`Pipeline.run_live`).  Each input is judged:

* **crash**: any exception out of the recorder (for a capture file: but the reader's own
  ``CaptureError``, the error ``record`` reports);
* **hang**: more than ``--time-limit`` seconds for one input;
* **memory**: the process's peak RSS above ``--max-rss-mb`` (checked every session);
* **bad output**: at the end of a session, a sidecar that fails the schema, a WAV that
  cannot be read, or a recording longer than the session's traffic.

Exit status 1 if any input failed; each failing input is saved (``--save DIR``) with the
session's valid prologue, as a pcap, for replay with ``callcap record``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import multiprocessing
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_corpus import _output_problem, _Quiet, mutate

from callcap.capture.block import FrameBlock
from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config_text
from callcap.config.schema import Config
from callcap.errors import CaptureError
from callcap.pipeline import Pipeline

Frame = tuple[float, int, bytes]

CALLER, CALLEE = "10.66.0.1", "10.66.0.2"
CALLER6, CALLEE6 = "fd00:66::1", "fd00:66::2"
CALLER_RTP, CALLEE_RTP = 40000, 50000
T0 = 1_700_000_000.0
SESSION = 400  # inputs per recorder
TARGETS = ("sip_udp", "sdp", "rtp", "sip_tcp", "fragments", "capture_file")
# The order inputs take: a capture file (its own recorder, a reader) costs ten times the
# others, so it comes once for every two of each of them.
CYCLE = (*TARGETS[:5], *TARGETS[:5], "capture_file")


class _Hang(Exception):
    pass


@functools.cache
def _config() -> Config:
    """The shipped defaults, but no disk reserve: making one is most of a small recorder's
    set-up, and what the inputs reach is not there."""
    return load_config_text("storage:\n  reserve: 0B\n")


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang


# -- link, IP, UDP, TCP ----------------------------------------------------------------


def _ip4(text: str) -> bytes:
    return bytes(int(p) for p in text.split("."))


def _ip6(text: str) -> bytes:
    import ipaddress

    return ipaddress.IPv6Address(text).packed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0, frag: int = 0x4000
) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0, _ip4(src), _ip4(dst)
    )
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return head + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(payload), next_header, 64)
        + _ip6(src)
        + _ip6(dst)
        + payload
    )


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, (8 + len(payload)) & 0xFFFF, 0) + payload


def tcp(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload


def link(rng: random.Random, ip: bytes, version: int = 4) -> tuple[int, bytes]:
    """``ip`` on a link type real captures carry (mostly Ethernet)."""
    ethertype = 0x0800 if version == 4 else 0x86DD
    roll = rng.random()
    macs = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    if roll < 0.75:
        return 1, macs + struct.pack("!H", ethertype) + ip
    if roll < 0.85:
        tags = b"".join(
            struct.pack("!HH", rng.choice((0x8100, 0x88A8)), rng.getrandbits(12))
            for _ in range(rng.randint(1, 3))
        )
        return 1, macs + tags + struct.pack("!H", ethertype) + ip
    if roll < 0.92:  # Linux cooked (SLL)
        return 113, struct.pack("!HHH8sH", 0, 1, 6, macs[:8], ethertype) + ip
    if roll < 0.97:  # SLL2
        return 276, struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, macs[:8]) + ip
    return 101, ip  # raw IP


def udp_frame(
    rng: random.Random, src: str, sport: int, dst: str, dport: int, data: bytes
) -> tuple[int, bytes]:
    if ":" in src:
        return link(rng, ipv6(src, dst, 17, udp(sport, dport, data)), 6)
    return link(rng, ipv4(src, dst, 17, udp(sport, dport, data), ident=rng.getrandbits(16)))


# -- SIP and SDP -----------------------------------------------------------------------


@dataclass
class Dialog:
    """The session's call: what valid messages of it say, and where its media goes."""

    call_id: str
    from_tag: str
    to_tag: str
    cseq: int = 1
    v6: bool = False

    @property
    def caller(self) -> str:
        return CALLER6 if self.v6 else CALLER

    @property
    def callee(self) -> str:
        return CALLEE6 if self.v6 else CALLEE


def sdp(rng: random.Random, address: str, port: int, *, hostile: bool) -> bytes:
    family = "IP6" if ":" in address else "IP4"
    lines = ["v=0", f"o=- {rng.getrandbits(32)} 1 IN {family} {address}", "s=-"]
    conn = f"c=IN {family} {address}"
    if hostile and rng.random() < 0.3:
        conn = rng.choice(
            (
                "c=IN IP4 999.1.1.1",
                "c=IN IP6 ::zz",
                "c=IN IP4",
                "c=",
                f"c=IN IP4 {address}/127/3",
                "c=IN IP6 ::ffff:10.66.0.9",
                "c=IN IP4 0.0.0.0",
                "c=TN RFC2543 x",
            )
        )
    lines += [conn, "t=0 0"]
    media = 1
    if hostile and rng.random() < 0.15:
        media = rng.choice((0, 2, 3, 50, 400))
    for n in range(media):
        mport = port + 2 * n
        if hostile and rng.random() < 0.3:
            mport = rng.choice((0, 1, 65535, 65536, 70000, -1, rng.getrandbits(16)))
        proto = "RTP/AVP"
        if hostile and rng.random() < 0.2:
            proto = rng.choice(("RTP/SAVP", "UDP/TLS/RTP/SAVPF", "RTP/AVPF", "udptl", "x"))
        pts = ["0", "8", "101"]
        if hostile and rng.random() < 0.3:
            pts = [
                str(rng.choice((0, 8, 9, 18, 96, 101, 127, 128, 255, -3)))
                for _ in range(rng.randint(0, 40))
            ]
        kind = (
            "audio"
            if not hostile or rng.random() < 0.9
            else rng.choice(("video", "image", "AUDIO", ""))
        )
        lines.append(f"m={kind} {mport} {proto} {' '.join(pts)}")
        if hostile and rng.random() < 0.3:
            lines.append(f"c=IN {family} {address}")
        lines += [
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
        ]
        if hostile:
            for _ in range(rng.randint(0, 4)):
                lines.append(
                    rng.choice(
                        (
                            f"a=rtpmap:{rng.randint(-5, 300)} "
                            f"{rng.choice(('opus', 'G722', 'x', ''))}/"
                            f"{rng.choice((0, 8000, 48000, -1, 'z'))}/{rng.randint(0, 9)}",
                            "a=rtpmap:",
                            "a=rtpmap:101",
                            f"a=fmtp:101 0-{rng.randint(0, 300)}",
                            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"
                            + base64.b64encode(
                                rng.randbytes(rng.choice((30, 29, 31, 0, 200)))
                            ).decode(),
                            "a=crypto:x",
                            f"a=ptime:{rng.choice((0, 20, 1000000, -1))}",
                            rng.choice(("a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv")),
                            "a=" + "x" * rng.choice((1, 1000, 20000)),
                        )
                    )
                )
    text = "\r\n".join(lines) + "\r\n"
    if hostile and rng.random() < 0.1:
        text = text.replace("\r\n", rng.choice(("\n", "\r", "\r\n\r\n")))
    return text.encode()


_COMPACT = {
    "Via": "v",
    "From": "f",
    "To": "t",
    "Call-ID": "i",
    "Contact": "m",
    "Content-Length": "l",
    "Content-Type": "c",
}


def sip_message(
    rng: random.Random, dialog: Dialog, *, hostile: bool, body_kind: str | None = None
) -> bytes:
    """One SIP request or response of the session's call (or of another), maybe hostile."""
    response = rng.random() < 0.4
    method = rng.choice(
        (
            "INVITE",
            "ACK",
            "BYE",
            "CANCEL",
            "INFO",
            "UPDATE",
            "PRACK",
            "OPTIONS",
            "REGISTER",
            "NOTIFY",
        )
    )
    if hostile and rng.random() < 0.1:
        method = rng.choice(("", "INVITE\x00", "invite", "X" * 300, "BYE BYE"))
    if response:
        code = rng.choice((100, 180, 183, 200, 200, 486, 487, 603))
        if hostile and rng.random() < 0.15:
            code = rng.choice((0, 1, 99, 699, 700, 999, 1000, -1))
        start = f"SIP/2.0 {code} {rng.choice(('OK', 'Ringing', '', 'Ä' * 3))}"
    else:
        start = f"{method} sip:bob@{dialog.callee} SIP/2.0"
        if hostile and rng.random() < 0.1:
            start = rng.choice(
                (
                    f"{method} sip:bob SIP/3.0",
                    f"{method}",
                    "SIP/2.0",
                    f"{method}  sip:x  SIP/2.0 extra",
                )
            )
    call_id = (
        dialog.call_id
        if not hostile or rng.random() < 0.85
        else rng.choice(("", "x" * 5000, f"other-{rng.getrandbits(20)}"))
    )
    cseq_method = "INVITE" if response and rng.random() < 0.5 else method
    cseq = dialog.cseq
    if hostile and rng.random() < 0.2:
        cseq = rng.choice((0, -1, 2**32, 2**63))
    headers = [
        ("Via", f"SIP/2.0/UDP {dialog.caller}:5060;branch=z9hG4bK{rng.getrandbits(32):x}"),
        ("From", f'"Alice" <sip:+4930123@{dialog.caller}>;tag={dialog.from_tag}'),
        (
            "To",
            f"<sip:bob@{dialog.callee}>"
            + (f";tag={dialog.to_tag}" if response or method != "INVITE" else ""),
        ),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {cseq_method}"),
        ("Contact", f"<sip:{dialog.caller}:5060>"),
        ("Max-Forwards", "70"),
    ]
    body = b""
    ctype: str | None = None
    kind = body_kind or rng.choice(("sdp", "sdp", "none", "multipart", "dtmf", "junk"))
    if kind == "sdp":
        side = dialog.callee if response else dialog.caller
        body = sdp(rng, side, CALLEE_RTP if response else CALLER_RTP, hostile=hostile)
        ctype = "application/sdp"
    elif kind == "multipart":
        boundary = rng.choice(("b1", "", "x" * 80, "--", "unique-boundary-1"))
        parts = [
            b"Content-Type: application/sdp\r\n\r\n"
            + sdp(rng, dialog.caller, CALLER_RTP, hostile=hostile),
            b"Content-Type: application/isup\r\n\r\n" + rng.randbytes(rng.randint(0, 64)),
        ]
        if hostile and rng.random() < 0.3:
            parts.append(
                b"Content-Type: multipart/mixed;boundary=inner\r\n\r\n--inner\r\n\r\n--inner--"
            )
        body = (
            b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
            + b"--"
            + boundary.encode()
            + b"--\r\n"
        )
        if hostile and rng.random() < 0.3:
            body = body[: rng.randint(0, len(body))]
        ctype = f"multipart/{rng.choice(('mixed', 'alternative', 'related'))};boundary={boundary}"
    elif kind == "dtmf":
        digit = (
            rng.choice("0123456789*#ABCD")
            if not hostile or rng.random() < 0.7
            else rng.choice(("", "11", "Z", "\x00"))
        )
        body = (
            f"Signal={digit}\r\nDuration={rng.choice((160, 0, -1, 99999999999, 'x'))}\r\n".encode()
        )
        ctype = rng.choice(("application/dtmf-relay", "application/dtmf"))
    elif kind == "junk":
        body = rng.randbytes(rng.randint(0, 2000))
        ctype = rng.choice(("application/sdp", "text/plain", None))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    length = len(body)
    if hostile and rng.random() < 0.25:
        length = rng.choice((0, length - 1, length + 1, length * 2 + 10, -5, 2**31, 10**12))
    headers.append(("Content-Length", str(length)))
    if hostile:
        roll = rng.random()
        if roll < 0.05:
            headers += [(f"X-H{i}", "v") for i in range(rng.choice((500, 2000, 5000)))]
        elif roll < 0.1:
            headers.append(("Subject", "x" * rng.choice((8000, 30000, 60000))))
        elif roll < 0.15:
            headers.append(("Content-Length", str(rng.randint(0, 100))))  # a second one
        if rng.random() < 0.2:
            headers = [(_COMPACT.get(n, n), v) for n, v in headers]
        if rng.random() < 0.1:
            rng.shuffle(headers)
        if rng.random() < 0.05:
            headers.append(("", "no name"))
            headers.append(("NoColon", None))  # type: ignore[arg-type]
    lines = [start]
    for name, value in headers:
        if value is None:
            lines.append(name)
        elif hostile and rng.random() < 0.03:
            lines.append(
                f"{name}: {value[: len(value) // 2]}\r\n {value[len(value) // 2 :]}"
            )  # folded
        else:
            lines.append(f"{name}: {value}")
    eol = "\r\n" if not hostile or rng.random() < 0.9 else rng.choice(("\n", "\r"))
    data = (eol.join(lines) + eol + eol).encode("utf-8", "surrogatepass") + body
    if hostile and rng.random() < 0.25:
        data = mutate(data, rng)
    return data[:65507]


# -- RTP and RTCP ----------------------------------------------------------------------


@dataclass
class MediaState:
    seq: int = 1000
    ts: int = 160_000
    ssrc: int = 0x1234
    event_ts: int = 0


def rtp_packet(rng: random.Random, state: MediaState) -> bytes:
    roll = rng.random()
    if roll < 0.1:  # RTCP, compound, lengths that may lie
        out = b""
        for _ in range(rng.randint(1, 4)):
            pt = rng.choice((200, 201, 202, 203, 204, 205, 206, 207))
            count = rng.randint(0, 31)
            body = rng.randbytes(rng.choice((0, 4, 20, 24, 100)))
            length = (len(body) + 4) // 4 - 1 if rng.random() < 0.7 else rng.getrandbits(16)
            out += struct.pack("!BBHI", 0x80 | count, pt, length & 0xFFFF, state.ssrc) + body
        return out
    step = rng.choice((1, 1, 1, 1, 0, 2, -1, 5, 100, 30000, -30000))
    state.seq = (state.seq + step) & 0xFFFF
    state.ts = (state.ts + 160 * step + rng.choice((0, 0, 0, 1, -80, 8000, 2**31))) & 0xFFFFFFFF
    if rng.random() < 0.02:
        state.ssrc = rng.getrandbits(32)
    version = 2 if rng.random() < 0.97 else rng.randrange(4)
    padding = rng.random() < 0.05
    ext = rng.random() < 0.05
    cc = 0 if rng.random() < 0.9 else rng.randint(0, 15)
    marker = rng.random() < 0.05
    if rng.random() < 0.25:  # RFC 4733 events
        pt = 101 if rng.random() < 0.9 else rng.choice((96, 100, 127))
        if rng.random() < 0.2:
            state.event_ts = state.ts
        payload = b"".join(
            struct.pack(
                "!BBH",
                rng.choice((0, 1, 5, 9, 10, 11, 12, 15, 16, 100, 255)),
                (0x80 if rng.random() < 0.3 else 0) | rng.randrange(64),
                rng.choice((160, 320, 800, 0, 65535, rng.getrandbits(16))),
            )
            for _ in range(rng.choice((1, 1, 1, 2, 3)))
        )
        if rng.random() < 0.1:
            payload = payload[: rng.randint(0, 3)]
        ts = state.event_ts
    else:
        pt = rng.choice((0, 0, 0, 8, 13, 9, 18, 3, 127, 72))
        payload = rng.randbytes(rng.choice((160, 160, 160, 80, 0, 1, 240, 1000)))
        ts = state.ts
    head = struct.pack(
        "!BBHII",
        (version << 6) | (padding << 5) | (ext << 4) | cc,
        (marker << 7) | pt,
        state.seq,
        ts,
        state.ssrc,
    )
    head += b"".join(
        struct.pack("!I", rng.getrandbits(32))
        for _ in range(cc if rng.random() < 0.8 else max(0, cc - 2))
    )
    if ext:
        words = rng.randint(0, 4)
        claimed = words if rng.random() < 0.7 else rng.getrandbits(16)
        head += struct.pack("!HH", 0xBEDE, claimed) + rng.randbytes(4 * words)
    data = head + payload
    if padding:
        pad = rng.randint(1, 8)
        data += bytes(pad - 1) + bytes([pad if rng.random() < 0.7 else rng.randrange(256)])
    if rng.random() < 0.05:
        data = mutate(data, rng)
    return data


# -- fragments and TCP -------------------------------------------------------------------


def fragments(rng: random.Random, dialog: Dialog, state: MediaState) -> list[tuple[int, bytes]]:
    """A SIP or RTP datagram in IPv4 or IPv6 fragments, shuffled, overlapped, lost, ..."""
    if rng.random() < 0.5:
        data = udp(5060, 5060, sip_message(rng, dialog, hostile=rng.random() < 0.5))
        src, dst = dialog.caller, dialog.callee
    else:
        data = udp(CALLER_RTP, CALLEE_RTP, rtp_packet(rng, state))
        src, dst = dialog.caller, dialog.callee
    v6 = ":" in src or rng.random() < 0.3
    if v6 and ":" not in src:
        src, dst = CALLER6, CALLEE6
    ident = rng.getrandbits(32 if v6 else 16)
    pieces: list[tuple[int, bytes, bool]] = []
    at = 0
    while at < len(data):
        size = (
            rng.choice((8, 16, 64, 512, 1400, 3000)) if rng.random() < 0.9 else rng.randint(1, 100)
        )
        chunk = data[at : at + size]
        pieces.append((at, chunk, at + size < len(data)))
        at += size
    roll = rng.random()
    if roll < 0.2:
        rng.shuffle(pieces)
    elif roll < 0.3 and pieces:
        off, chunk, more = rng.choice(pieces)
        pieces.append((off, rng.randbytes(len(chunk)), more))  # overlap with other bytes
    elif roll < 0.4 and len(pieces) > 1:
        del pieces[rng.randrange(len(pieces))]  # one lost
    elif roll < 0.45:
        pieces.append((rng.choice((65528, 65535 * 8, 8191 * 8)), b"x" * 16, rng.random() < 0.5))
    elif roll < 0.5:
        pieces = pieces * 2
    out = []
    for off, chunk, more in pieces:
        if v6:
            frag = (
                struct.pack("!BBHI", 17, 0, ((off // 8) << 3 & 0xFFF8) | int(more), ident) + chunk
            )
            out.append(link(rng, ipv6(src, dst, 44, frag), 6))
        else:
            flags = ((off // 8) & 0x1FFF) | (0x2000 if more else 0)
            out.append(link(rng, ipv4(src, dst, 17, chunk, ident=ident, frag=flags)))
    return out


def tcp_stream(rng: random.Random, dialog: Dialog) -> list[tuple[int, bytes]]:
    """SIP messages over one TCP connection, its segments cut, reordered, overlapped..."""
    stream = b"".join(
        sip_message(rng, dialog, hostile=rng.random() < 0.5) for _ in range(rng.randint(1, 4))
    )
    if rng.random() < 0.1:
        stream = stream * rng.randint(2, 5)
    isn = rng.choice((rng.getrandbits(32), 0xFFFFFFFF - rng.randint(0, 3000), 0))
    sport = rng.choice((5060, 5061, 40000 + rng.randint(0, 20000)))
    segs: list[tuple[int, bytes, int]] = []
    if rng.random() < 0.6:
        segs.append((isn, b"", 0x02))  # SYN
    at = 0
    while at < len(stream):
        size = rng.choice((1, 10, 100, 536, 1460, 4000))
        segs.append(((isn + 1 + at) & 0xFFFFFFFF, stream[at : at + size], 0x18))
        at += size
    roll = rng.random()
    if roll < 0.2:
        rng.shuffle(segs)
    elif roll < 0.3 and len(segs) > 1:
        seq, data, fl = rng.choice(segs)
        segs.insert(rng.randrange(len(segs)), (seq, rng.randbytes(len(data)), fl))  # overlap
    elif roll < 0.4 and len(segs) > 1:
        del segs[rng.randrange(len(segs))]
    elif roll < 0.5:
        segs += rng.sample(segs, min(len(segs), 3))  # retransmissions
    if rng.random() < 0.3:
        segs.append(((isn + 1 + len(stream)) & 0xFFFFFFFF, b"", rng.choice((0x11, 0x04, 0x14))))
    if rng.random() < 0.05:
        segs.insert(rng.randrange(len(segs) + 1), (isn, b"", 0x02))  # a SYN mid-stream
    src, dst = dialog.caller, dialog.callee
    out = []
    for seq, data, fl in segs:
        seg = tcp(sport, 5060, seq, 1, fl, data)
        if ":" in src:
            out.append(link(rng, ipv6(src, dst, 6, seg), 6))
        else:
            out.append(link(rng, ipv4(src, dst, 6, seg, ident=rng.getrandbits(16))))
    return out


# -- capture files --------------------------------------------------------------------------


def capture_file(rng: random.Random, frames: list[Frame]) -> bytes:
    """``frames`` as a pcap or pcapng file of random structure, maybe mutated.  Half the
    files lie in their structure (lengths, interfaces, blocks); the other half are read to
    the end, so the frames' own hostility reaches the recorder."""
    lying = rng.random() < 0.5

    def lie(p: float) -> bool:
        return lying and rng.random() < p

    if rng.random() < 0.4:
        endian = rng.choice("<>")
        nano = rng.random() < 0.5
        magic = 0xA1B23C4D if nano else 0xA1B2C3D4
        linktype = frames[0][1] if frames else 1
        snaplen = rng.choice((65535, 262144, 64, 0, 2**32 - 1))
        out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
        for ts, _lt, data in frames:
            sec, frac = int(ts), ts - int(ts)
            sub = int(frac * (1e9 if nano else 1e6))
            incl = len(data) if not lie(0.05) else rng.choice((0, len(data) + 100, 2**31))
            orig = len(data) if not lie(0.1) else rng.getrandbits(32)
            out += struct.pack(endian + "IIII", sec, sub, incl, orig) + data
    else:
        endian = rng.choice("<>")

        def block(btype: int, body: bytes) -> bytes:
            body += bytes(-len(body) % 4)
            total = 12 + len(body)
            if lie(0.03):
                total = rng.choice((0, 8, 12, total + 4, total - 4, 2**31))
            return (
                struct.pack(endian + "II", btype, total) + body + struct.pack(endian + "I", total)
            )

        out = block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))
        linktypes = sorted({lt for _t, lt, _d in frames}) or [1]
        resol = rng.choice((6, 9, 3, 0x80 | 20, 0, 255)) if lie(0.5) else 6
        for lt in linktypes:
            opts = (
                struct.pack(endian + "HH", 9, 1)
                + bytes([resol])
                + bytes(3)
                + struct.pack(endian + "HH", 0, 0)
            )
            out += block(1, struct.pack(endian + "HHI", lt, 0, rng.choice((0, 65535, 100))) + opts)
        scale = 10 ** (resol if resol < 0x80 else 0) if resol < 20 else 10**6
        for ts, lt, data in frames:
            roll = rng.random()
            if lie(0.05):
                out += block(
                    rng.choice((0x00000BAD, 0x40000BAD, 4, 5, 6, 7, 0xDEAD)),
                    rng.randbytes(rng.randint(0, 40)),
                )
            iface = linktypes.index(lt) if not lie(0.03) else rng.randint(0, 40)
            if roll > 0.97:  # a simple packet block (interface 0, no time)
                out += block(3, struct.pack(endian + "I", len(data)) + data)
                continue
            stamp = int(ts * scale)
            caplen = len(data) if not lie(0.03) else rng.choice((len(data) + 50, 2**31))
            out += block(
                6,
                struct.pack(
                    endian + "IIIII",
                    iface,
                    stamp >> 32 & 0xFFFFFFFF,
                    stamp & 0xFFFFFFFF,
                    caplen,
                    len(data),
                )
                + data,
            )
        if rng.random() < 0.1:
            out += block(
                0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
            )  # new section
    if rng.random() < 0.3:
        out = mutate(out, rng)
    return out


# -- sessions ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    kind: str  # "ok", "crash", "hang", "memory", "bad_output"
    detail: str = ""


@dataclass
class Session:
    """One recorder and the call it is set up with, fed ``SESSION`` inputs."""

    rng: random.Random
    work: Path
    live: bool
    dialog: Dialog = field(init=False)
    state: MediaState = field(default_factory=MediaState)
    now: float = T0
    prologue: list[Frame] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = self.rng
        self.dialog = Dialog(
            f"fz-{rng.getrandbits(48):x}@{CALLER}", "ft", "tt", v6=rng.random() < 0.2
        )
        shutil.rmtree(self.work / "out", ignore_errors=True)
        self.pipeline = Pipeline(_config(), self.work / "out", _Quiet())
        d = self.dialog
        for message, from_caller in (
            (self._valid("INVITE", None), True),
            (self._valid(None, 200), False),
            (self._valid("ACK", None), True),
        ):
            src, dst = (d.caller, d.callee) if from_caller else (d.callee, d.caller)
            lt, frame = udp_frame(rng, src, 5060, dst, 5060, message)
            self.prologue.append((self._tick(), lt, frame))
        self.feed(self.prologue)

    def _valid(self, method: str | None, code: int | None) -> bytes:
        d = self.dialog
        body = sdp(
            self.rng,
            d.callee if code else d.caller,
            CALLEE_RTP if code else CALLER_RTP,
            hostile=False,
        )
        start = f"SIP/2.0 {code} OK" if code else f"{method} sip:bob@{d.callee} SIP/2.0"
        cseq = f"1 {'INVITE' if code else method}"
        to_tag = f";tag={d.to_tag}" if code or method != "INVITE" else ""
        head = (
            f"{start}\r\nVia: SIP/2.0/UDP {d.caller}:5060;branch=z9hG4bK1\r\n"
            f"From: <sip:+4930123@{d.caller}>;tag={d.from_tag}\r\n"
            f"To: <sip:bob@{d.callee}>{to_tag}\r\n"
            f"Call-ID: {d.call_id}\r\nCSeq: {cseq}\r\nContact: <sip:{d.caller}>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return (
            head.encode() + body
            if method != "ACK"
            else head.replace(f"Content-Length: {len(body)}", "Content-Length: 0").encode()
        )

    def _tick(self) -> float:
        self.now += self.rng.choice((0.0, 0.001, 0.02, 0.02, 0.02, 0.5, 3.0))
        return self.now

    def feed(self, frames: list[Frame]) -> None:
        if not frames:
            return
        block = FrameBlock.of(frames)
        if self.live:
            self.pipeline.run_live([block])
        else:
            self.pipeline.run_blocks([block])

    def make(self, target: str) -> list[Frame] | bytes:
        rng, d = self.rng, self.dialog
        if target in ("sip_udp", "sdp"):
            from_caller = rng.random() < 0.5
            kind = "sdp" if target == "sdp" else None
            message = sip_message(rng, d, hostile=True, body_kind=kind)
            src, dst = (d.caller, d.callee) if from_caller else (d.callee, d.caller)
            ports = (5060, 5060) if rng.random() < 0.95 else (rng.getrandbits(16), 5060)
            lt, frame = udp_frame(rng, src, ports[0], dst, ports[1], message)
            return [(self._tick(), lt, frame)]
        if target == "rtp":
            out = []
            for _ in range(rng.randint(1, 12)):
                from_caller = rng.random() < 0.6
                src, sport, dst, dport = (
                    (d.caller, CALLER_RTP, d.callee, CALLEE_RTP)
                    if from_caller
                    else (d.callee, CALLEE_RTP, d.caller, CALLER_RTP)
                )
                lt, frame = udp_frame(rng, src, sport, dst, dport, rtp_packet(rng, self.state))
                self.now += 0.02
                out.append((self.now, lt, frame))
            return out
        if target == "fragments":
            return [(self._tick(), lt, f) for lt, f in fragments(rng, d, self.state)]
        if target == "sip_tcp":
            return [(self._tick(), lt, f) for lt, f in tcp_stream(rng, d)]
        frames: list[Frame] = []
        for sub in rng.choices(("sip_udp", "rtp", "fragments", "sip_tcp"), k=rng.randint(1, 3)):
            made = self.make(sub)
            assert isinstance(made, list)
            frames += made
        return capture_file(rng, self.prologue + frames)

    def run(self, made: list[Frame] | bytes, time_limit: float) -> Verdict:
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            if isinstance(made, bytes):
                self._run_file(made)
            else:
                self.feed(made)
        except _Hang:
            return Verdict("hang", f"over {time_limit} s")
        except Exception as exc:  # noqa: BLE001 - that is what is being looked for
            return Verdict("crash", f"{type(exc).__name__}: {exc}"[:500])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return Verdict("ok")

    def _run_file(self, data: bytes) -> None:
        """A capture file through its own recorder, as ``record`` or the replay reads it."""
        path = self.work / "input.cap"
        path.write_bytes(data)
        out = self.work / "file-out"
        shutil.rmtree(out, ignore_errors=True)
        pipeline = Pipeline(_config(), out, _Quiet())
        try:
            with CaptureReader(str(path)) as reader:
                for block in reader.blocks():
                    if self.live:
                        pipeline.run_live([block])
                    else:
                        pipeline.run_blocks([block])
        except CaptureError:
            pass  # a file the reader cannot read further: reported by record, not a crash
        pipeline.close("capture_end")
        problem = _outputs_problem(out, 3600.0)
        if problem is not None:
            raise AssertionError(f"bad output: {problem}")

    def close(self) -> Verdict:
        try:
            self.pipeline.close("capture_end")
        except Exception as exc:  # noqa: BLE001
            return Verdict("crash", f"at close: {type(exc).__name__}: {exc}"[:500])
        longest = self.now - T0 + 600.0
        problem = _outputs_problem(self.work / "out", longest)
        return Verdict("bad_output", problem) if problem is not None else Verdict("ok")


def _outputs_problem(out: Path, longest: float) -> str | None:
    for sidecar in out.rglob("*.json") if out.exists() else ():
        if ".spool" in sidecar.parts:
            continue
        try:
            problem = _output_problem(sidecar, longest)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is the finding
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            return f"{sidecar.name}: {problem}"[:500]
    return None


def _save(save: Path, label: str, session: Session, made: list[Frame] | bytes) -> None:
    """A failing input as a file ``callcap record`` replays: the capture file itself, or the
    session's prologue and the input's frames as a pcapng."""
    save.mkdir(parents=True, exist_ok=True)
    if isinstance(made, bytes):
        (save / f"{label}.cap").write_bytes(made)
    else:
        (save / f"{label}.pcapng").write_bytes(_pcapng(session.prologue + made))


def _pcapng(frames: list[Frame]) -> bytes:
    """Frames as a plain pcapng: one interface per link type, microsecond times."""

    def block(btype: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    linktypes = sorted({lt for _t, lt, _d in frames})
    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += b"".join(block(1, struct.pack("<HHI", lt, 0, 0)) for lt in linktypes)
    for ts, lt, data in frames:
        stamp = round(ts * 1e6)
        head = struct.pack(
            "<IIIII", linktypes.index(lt), stamp >> 32, stamp & 0xFFFFFFFF, len(data), len(data)
        )
        out += block(6, head + data)
    return out


def fuzz(
    inputs: int,
    seed: int,
    *,
    targets: tuple[str, ...] = TARGETS,
    time_limit: float = 10.0,
    max_rss_mb: float = 1500.0,
    save: Path | None = None,
    progress: Callable[[int, Counter[str]], None] | None = None,
) -> tuple[Counter[str], Counter[str], list[tuple[str, Verdict]]]:
    """``inputs`` structured inputs (``targets`` in turn; all of them in :data:`CYCLE`):
    verdict counts, inputs per target, and the failures."""
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    per_target: Counter[str] = Counter()
    failures: list[tuple[str, Verdict]] = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory(prefix="callcap-sfuzz-", dir=_scratch()) as tmp:
            work = Path(tmp)
            done = 0
            n_session = 0
            while done < inputs:
                session = Session(rng, work, live=bool(n_session % 2))
                n_session += 1
                for _ in range(min(SESSION, inputs - done)):
                    target = targets[done % len(targets)]
                    if targets is TARGETS:
                        target = CYCLE[done % len(CYCLE)]
                    made = session.make(target)
                    verdict = session.run(made, time_limit)
                    counts[verdict.kind] += 1
                    per_target[target] += 1
                    if verdict.kind != "ok":
                        label = f"{seed}-{done:09d}-{target}"
                        failures.append((label, verdict))
                        if save is not None:
                            _save(save, label, session, made)
                    done += 1
                verdict = session.close()
                if verdict.kind != "ok":
                    counts[verdict.kind] += 1
                    failures.append((f"{seed}-session-{n_session}", verdict))
                rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                if rss_mb > max_rss_mb:
                    counts["memory"] += 1
                    failures.append(
                        (
                            f"{seed}-session-{n_session}",
                            Verdict("memory", f"peak RSS {rss_mb:.0f} MB"),
                        )
                    )
                    break
                if progress is not None:
                    progress(done, counts)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts, per_target, failures


def _scratch() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def _job(
    args: tuple[int, int, float, float, Path | None],
) -> tuple[Counter[str], Counter[str], list[tuple[str, Verdict]], float]:
    inputs, seed, time_limit, max_rss_mb, save = args
    began = time.perf_counter()
    step = max(SESSION, inputs // 50)

    def progress(done: int, counts: Counter[str]) -> None:
        if done % step < SESSION:
            rate = done / (time.perf_counter() - began)
            print(f"seed {seed}: {done} inputs {dict(counts)} ({rate:.0f}/s)", file=sys.stderr)

    counts, per_target, failures = fuzz(
        inputs, seed, time_limit=time_limit, max_rss_mb=max_rss_mb, save=save, progress=progress
    )
    return counts, per_target, failures, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="processes, each with its own seed")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--max-rss-mb", type=float, default=1500.0)
    parser.add_argument("--save", type=Path, default=None, help="keep failing inputs here")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    share = [args.inputs // args.jobs + (i < args.inputs % args.jobs) for i in range(args.jobs)]
    work = [
        (n, args.seed + i, args.time_limit, args.max_rss_mb, args.save) for i, n in enumerate(share)
    ]
    if args.jobs == 1:
        results = [_job(work[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_job, work)
    counts: Counter[str] = Counter()
    per_target: Counter[str] = Counter()
    failures: list[tuple[str, Verdict]] = []
    peak = 0.0
    for c, t, f, rss in results:
        counts += c
        per_target += t
        failures += f
        peak = max(peak, rss)
    elapsed = time.perf_counter() - began
    print(
        f"{args.inputs} inputs, seeds {args.seed}..{args.seed + args.jobs - 1}: {dict(counts)}; "
        f"per target {dict(per_target)}; {elapsed:.0f} s "
        f"({args.inputs / elapsed:.0f} inputs/s), peak RSS per process {peak:.0f} MB"
    )
    for label, verdict in failures[:50]:
        print(f"  {label}: {verdict.kind}: {verdict.detail}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
