"""Build exact call captures for pipeline tests: SIP dialogs and RTP streams as real bytes.

Every packet is an Ethernet/IPv4/UDP frame written into a classic pcap, so the tests run the
whole ``callcap record`` path.  Audio is synthetic and exactly known (a tone or a ramp per
side), which lets a test assert sample positions, not just "it produced a file".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from callcap.codecs.g711 import encode_alaw, encode_ulaw

RATE = 8000
PTIME = 160
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z

CALLER_IP = "10.20.0.1"
CALLEE_IP = "10.20.0.2"


def _ip(text: str) -> bytes:
    return bytes(int(p) for p in text.split("."))


def udp_frame(
    src: str, sport: int, dst: str, dport: int, payload: bytes, *, vlan: int | None = None
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = (
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, _ip(src), _ip(dst)
        )
        + udp
    )
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    if vlan is not None:
        eth += struct.pack("!HH", 0x8100, vlan)
    return eth + b"\x08\x00" + ip


def write_pcap(path: Path, records: Iterable[tuple[float, bytes]]) -> Path:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts, frame in sorted(records, key=lambda r: r[0]):
            sec = int(ts)
            usec = round((ts - sec) * 1e6)
            if usec == 1_000_000:
                sec, usec = sec + 1, 0
            f.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    return path


def sdp(ip: str, port: int, pts: str = "0 8 101", extra: str = "", proto: str = "RTP/AVP") -> str:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
        f"m=audio {port} {proto} {pts}\r\na=rtpmap:101 telephone-event/8000\r\n{extra}"
    )


@dataclass
class Call:
    """A scripted SIP call between two fixed parties; collects the frames it produces."""

    call_id: str = "test-call-1@10.20.0.1"
    caller_port: int = 40000
    callee_port: int = 50000
    records: list[tuple[float, bytes]] = field(default_factory=list)
    cseq: int = 1
    #: User parts of the From and To URIs, and extra header lines for the initial INVITE.
    caller_user: str = "alice"
    callee_user: str = "bob"
    invite_extra: str = ""

    def sip(self, ts: float, text: str, *, from_caller: bool = True) -> None:
        src, dst = (CALLER_IP, CALLEE_IP) if from_caller else (CALLEE_IP, CALLER_IP)
        self.records.append((ts, udp_frame(src, 5060, dst, 5060, text.encode())))

    def _headers(self, cseq: str, to_tag: bool, from_callee: bool = False) -> str:
        caller = f'"Alice" <sip:{self.caller_user}@{CALLER_IP}>;tag=ft1'
        callee = f"<sip:{self.callee_user}@{CALLEE_IP}>" + (";tag=tt1" if to_tag else "")
        frm, to = (callee, caller) if from_callee else (caller, callee)
        return (
            f"Via: SIP/2.0/UDP {CALLER_IP}:5060;branch=z9hG4bK{cseq.replace(' ', '')}{self.call_id[:4]}\r\n"
            f"From: {frm}\r\nTo: {to}\r\nCall-ID: {self.call_id}\r\nCSeq: {cseq}\r\n"
        )

    def request(
        self,
        ts: float,
        method: str,
        *,
        body: str = "",
        to_tag: bool = True,
        from_callee: bool = False,
        ctype: str = "application/sdp",
    ) -> None:
        self.cseq += 1
        cseq = (
            f"{1 if method in ('INVITE', 'ACK', 'CANCEL') and not to_tag else self.cseq} {method}"
        )
        if method == "ACK" and to_tag:
            cseq = "1 ACK"
        text = f"{method} sip:peer@{CALLEE_IP} SIP/2.0\r\n" + self._headers(
            cseq, to_tag, from_callee
        )
        if method == "INVITE" and not to_tag:
            text += self.invite_extra
        if body:
            text += f"Content-Type: {ctype}\r\n"
        text += f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
        self.sip(ts, text, from_caller=not from_callee)

    def response(
        self, ts: float, status: str, cseq: str = "1 INVITE", *, body: str = "", to_tag: bool = True
    ) -> None:
        text = f"SIP/2.0 {status}\r\n" + self._headers(cseq, to_tag)
        if body:
            text += "Content-Type: application/sdp\r\n"
        text += f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
        self.sip(ts, text, from_caller=False)

    def setup(
        self,
        t: float,
        *,
        answer_after: float = 1.0,
        caller_sdp: str | None = None,
        callee_sdp: str | None = None,
    ) -> float:
        """INVITE at ``t``, 180, 200 after ``answer_after``, ACK; returns the answer time."""
        self.request(t, "INVITE", body=caller_sdp or sdp(CALLER_IP, self.caller_port), to_tag=False)
        self.response(t + 0.05, "100 Trying", to_tag=False)
        self.response(t + 0.2, "180 Ringing")
        answer = t + answer_after
        self.response(answer, "200 OK", body=callee_sdp or sdp(CALLEE_IP, self.callee_port))
        self.request(answer + 0.01, "ACK")
        return answer

    def bye(self, ts: float, *, from_callee: bool = False) -> None:
        self.request(ts, "BYE", from_callee=from_callee)
        self.response(ts + 0.01, "200 OK", f"{self.cseq} BYE")

    def rtp(
        self,
        ts: float,
        *,
        from_caller: bool,
        seq: int,
        rtp_ts: int,
        payload: bytes,
        pt: int = 0,
        ssrc: int | None = None,
        marker: bool = False,
        src_port: int | None = None,
        dst_port: int | None = None,
    ) -> None:
        if ssrc is None:
            ssrc = 0xCA11E500 if from_caller else 0xCA11EE00
        head = struct.pack(
            "!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, rtp_ts & 0xFFFFFFFF, ssrc
        )
        if from_caller:
            frame = udp_frame(
                CALLER_IP,
                src_port or self.caller_port,
                CALLEE_IP,
                dst_port or self.callee_port,
                head + payload,
            )
        else:
            frame = udp_frame(
                CALLEE_IP,
                src_port or self.callee_port,
                CALLER_IP,
                dst_port or self.caller_port,
                head + payload,
            )
        self.records.append((ts, frame))

    def stream(
        self,
        start: float,
        samples: npt.NDArray[np.int16],
        *,
        from_caller: bool,
        codec: str = "PCMU",
        seq0: int = 100,
        ts0: int = 1000,
        skip: Iterable[int] = (),
        ssrc: int | None = None,
    ) -> bytes:
        """One packet per 20 ms of ``samples`` starting at capture time ``start``; returns the wire bytes."""
        encoded = (encode_ulaw if codec == "PCMU" else encode_alaw)(samples)
        pt = 0 if codec == "PCMU" else 8
        missing = set(skip)
        for i in range(len(encoded) // PTIME):
            if i in missing:
                continue
            self.rtp(
                start + i * PTIME / RATE,
                from_caller=from_caller,
                seq=seq0 + i,
                rtp_ts=ts0 + i * PTIME,
                payload=encoded[i * PTIME : (i + 1) * PTIME],
                pt=pt,
                ssrc=ssrc,
            )
        return encoded


def tone(freq: float, seconds: float, amplitude: float = 8000.0) -> npt.NDArray[np.int16]:
    n = round(seconds * RATE)
    n -= n % PTIME
    t = np.arange(n) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def write_long_call(path: Path, seconds: float, *, start: float = T0) -> int:
    """A single call of ``seconds`` of two-way G.711 audio, streamed to a pcap in bounded memory.

    Returns the number of packets written.  Both sides send a steady tone (µ-law), 20 ms
    packets, with sequence numbers and timestamps that wrap many times over the call.
    """
    call = Call(call_id="long-call@10.20.0.1")
    answer = call.setup(start)
    call.records.sort(key=lambda r: r[0])
    payload_a = encode_ulaw(tone(440, 0.02))
    payload_b = encode_ulaw(tone(1000, 0.02))
    head = struct.Struct("!BBHII")
    rec = struct.Struct("<IIII")
    template_a = udp_frame(
        CALLER_IP, call.caller_port, CALLEE_IP, call.callee_port, bytes(12) + payload_a
    )
    template_b = udp_frame(
        CALLEE_IP, call.callee_port, CALLER_IP, call.caller_port, bytes(12) + payload_b
    )
    rtp_off = len(template_a) - 12 - PTIME
    packets = 0
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))

        def put(ts: float, frame: bytes | bytearray) -> None:
            sec = int(ts)
            f.write(rec.pack(sec, min(999_999, round((ts - sec) * 1e6)), len(frame), len(frame)))
            f.write(frame)

        for ts, frame in call.records:
            put(ts, frame)
        frame_a = bytearray(template_a)
        frame_b = bytearray(template_b)
        n = int(seconds * RATE / PTIME)
        t = answer + 0.1
        buf: list[bytes] = []
        for i in range(n):
            ts = t + i * 0.02
            sec = int(ts)
            usec = min(999_999, round((ts - sec) * 1e6))
            head.pack_into(frame_a, rtp_off, 0x80, 0, i & 0xFFFF, (i * PTIME) & 0xFFFFFFFF, 0x1111)
            head.pack_into(
                frame_b, rtp_off, 0x80, 0, (i + 7) & 0xFFFF, (5 + i * PTIME) & 0xFFFFFFFF, 0x2222
            )
            buf.append(rec.pack(sec, usec, len(frame_a), len(frame_a)) + frame_a)
            buf.append(rec.pack(sec, usec, len(frame_b), len(frame_b)) + frame_b)
            if len(buf) >= 20000:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
        packets = 2 * n + len(call.records)
        end = t + n * 0.02 + 0.5
        call.records = []
        call.bye(end)
        for ts, frame in call.records:
            put(ts, frame)
            packets += 1
    return packets
