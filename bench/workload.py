"""Synthetic SIP/RTP workloads: N concurrent G.711 calls written to a classic pcap, streamed.

Why synthetic: a benchmark needs a capture of any size with a known answer — how many calls,
which packets, what audio — so that speed is measured on a file whose recordings can also be
checked.  Every call here is a complete UDP dialog (RFC 3261 §13: INVITE with an SDP offer,
100, 180, 200 with the answer, ACK; §15: BYE and its 200) followed by RTP in both directions
every 20 ms (RFC 3551 §4.5.14: 160-byte G.711 frames at 8 kHz).  The audio of each side is a
pure tone whose frequency identifies the call and the side (see :func:`tone_frequencies`), so
a test can FFT a recording and tell whose voice landed in which channel.

Why it is fast: RTP records are built per time window from per-stream templates in a numpy
structured array (one row = pcap record header + Ethernet/IPv4/UDP/RTP headers + payload);
sequence numbers, timestamps and payloads are filled by column, the window is sorted by
arrival time and written as one block.  Nothing is built per packet in Python, memory depends
on the number of calls, not on their length (a 10.5-hour call streams out in a few MB).

Addresses are private (10.1.0.0/16 callers, 10.2.0.0/16 callees) and exist only inside the
file: nothing is ever sent on a network.

Usage::

    python bench/workload.py --calls 200 --seconds 60 --out calls.pcap
    python bench/workload.py --calls 1 --seconds 37800 --out - | tcpdump -r - -w long.pcap
"""

# No `from __future__ import annotations`: with real annotation objects the dataclasses below
# also work when a test loads this file through importlib without registering it in
# sys.modules (dataclasses resolves string annotations through sys.modules).
import argparse
import dataclasses
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import numpy as np
import numpy.typing as npt

from callcap.codecs.g711 import encode_alaw, encode_ulaw

RATE = 8000
PTIME_SAMPLES = 160  # 20 ms at 8 kHz (RFC 3551 §4.5.14)
PTIME_US = 20_000
FRAMES_PER_TABLE = RATE // PTIME_SAMPLES  # an integer-Hz tone repeats exactly every second
AMPLITUDE = 0.3  # of full scale
TONE_SLOTS = 500  # distinct (caller, callee) tone pairs before frequencies repeat
DTMF_PT = 101
SIP_PORT = 5060
MAX_CALLS = 256 * 250  # one caller and one callee address per call in two /16s
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}  # RFC 3551 table 4
CODECS = ("pcmu", "pcma", "mixed")
_ENCODERS: dict[str, Callable[[npt.ArrayLike], bytes]] = {
    "PCMU": encode_ulaw,
    "PCMA": encode_alaw,
}

# Classic pcap, little-endian, microsecond timestamps, LINKTYPE_ETHERNET
# (draft-ietf-opsawg-pcap §4, §5).
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_PCAP_MAGIC = 0xA1B2C3D4
_SNAPLEN = 65535
_LINKTYPE_ETHERNET = 1
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")

_ETH_LEN, _IP_LEN, _UDP_LEN, _RTP_LEN = 14, 20, 8, 12
RTP_FRAME_LEN = _ETH_LEN + _IP_LEN + _UDP_LEN + _RTP_LEN + PTIME_SAMPLES  # 214
_RTP_OFF = _PCAP_RECORD.size + _ETH_LEN + _IP_LEN + _UDP_LEN  # 58: RTP header in a record

# One RTP record: pcap record header, the constant frame bytes up to and including the RTP
# V/P/X/CC octet, then the fields that change per packet (RFC 3550 §5.1).  Unaligned offsets
# are fine: numpy copies columns byte-wise.
_RTP_RECORD = np.dtype(
    {
        "names": ["sec", "usec", "incl", "orig", "head", "mpt", "seq", "ts", "ssrc", "payload"],
        "formats": [
            "<u4",
            "<u4",
            "<u4",
            "<u4",
            ("u1", _RTP_OFF + 1 - _PCAP_RECORD.size),
            "u1",
            ">u2",
            ">u4",
            ">u4",
            ("u1", PTIME_SAMPLES),
        ],
        "offsets": [0, 4, 8, 12, 16, _RTP_OFF + 1, _RTP_OFF + 2, _RTP_OFF + 4, _RTP_OFF + 8, 70],
        "itemsize": _PCAP_RECORD.size + RTP_FRAME_LEN,
    }
)
RTP_RECORD_LEN = _RTP_RECORD.itemsize  # 230
_TARGET_BATCH = 8192  # RTP packets per window: big writes, a few MB of working memory

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One RTP direction of a call as written to the file."""

    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    ssrc: int
    payload_type: int
    first_seq: int
    first_timestamp: int
    first_time: float  # send time of the first packet (before any jitter)
    tone_hz: int
    packets_sent: int  # packets the sender emitted
    packets: int  # records in the file: sent - lost + duplicated


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a recorder should find for one call."""

    index: int
    call_id: str
    caller_uri: str
    callee_uri: str
    caller_ip: str
    callee_ip: str
    codec: str  # "PCMU" or "PCMA"
    start_time: float  # INVITE
    answer_time: float  # 200 OK to the INVITE
    end_time: float  # BYE
    bye_from: str  # "caller" or "callee"
    caller_tone_hz: int
    callee_tone_hz: int
    caller: StreamInfo  # caller → callee RTP
    callee: StreamInfo  # callee → caller RTP

    @property
    def caller_packets(self) -> int:
        return self.caller.packets

    @property
    def callee_packets(self) -> int:
        return self.callee.packets


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """The ground truth of a written workload."""

    calls: tuple[CallInfo, ...]
    total_packets: int
    sip_packets: int
    rtp_packets: int
    start_time: float
    end_time: float  # timestamp of the last record
    seed: int
    codec: str
    loss: float
    jitter_ms: float
    duplicate: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tone_frequencies(index: int) -> tuple[int, int]:
    """(caller, callee) tone of call ``index`` in Hz.

    Callers sit in 300–1797 Hz and callees in 1900–3397 Hz, 3 Hz apart per call, so both
    are inside the telephone band, distinct for the first 500 calls, and a swapped-channel
    recording is obvious.  Integer frequencies make one second of audio (50 frames) repeat
    exactly, which is what lets the payloads be precomputed.
    """
    slot = index % TONE_SLOTS
    return 300 + 3 * slot, 1900 + 3 * slot


def tone_frames(freq: int, codec: str) -> npt.NDArray[np.uint8]:
    """One second of the tone, G.711-encoded, as 50 rows of 160 bytes (phase 0 at row 0)."""
    n = np.arange(RATE, dtype=np.float64)
    pcm = np.round(AMPLITUDE * 32767.0 * np.sin(2.0 * np.pi * freq * n / RATE)).astype(np.int16)
    encoded = _ENCODERS[codec](pcm)
    return np.frombuffer(encoded, dtype=np.uint8).reshape(FRAMES_PER_TABLE, PTIME_SAMPLES)


def _caller_ip(k: int) -> str:
    return f"10.1.{k // 250}.{k % 250 + 1}"


def _callee_ip(k: int) -> str:
    return f"10.2.{k // 250}.{k % 250 + 1}"


def _mac(ip: bytes) -> bytes:
    return b"\x02\x00" + ip  # locally administered, derived from the address


def _checksum(header: bytes) -> int:
    """RFC 791 §3.1 header checksum (ones' complement of the ones' complement sum)."""
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """Ethernet II / IPv4 (DF, no options) / UDP frame; UDP checksum 0 = none (RFC 768)."""
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    total = _IP_LEN + _UDP_LEN + len(payload)
    ip = _IPV4.pack(0x45, 0, total, 0, 0x4000, 64, 17, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    udp = _UDP.pack(sport, dport, _UDP_LEN + len(payload), 0)
    return _mac(d) + _mac(s) + b"\x08\x00" + ip + udp + payload


def _sdp(ip: str, port: int, session: int, payload_types: Sequence[int]) -> str:
    """An RFC 4566 audio offer/answer (RFC 3264 §5, §6) with telephone-event (RFC 4733)."""
    names = {0: "PCMU/8000", 8: "PCMA/8000", DTMF_PT: "telephone-event/8000"}
    fmts = " ".join(str(pt) for pt in payload_types)
    rtpmaps = "".join(f"a=rtpmap:{pt} {names[pt]}\r\n" for pt in payload_types)
    return (
        f"v=0\r\no=- {session} {session} IN IP4 {ip}\r\ns=callcap workload\r\n"
        f"c=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP {fmts}\r\n{rtpmaps}"
        f"a=fmtp:{DTMF_PT} 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
    )


def _message(start_line: str, headers: Sequence[str], body: str = "") -> bytes:
    lines = [start_line, *headers]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@dataclass(frozen=True, slots=True)
class _Plan:
    """Per-call fixed facts, decided before anything is written."""

    k: int
    codec: str
    invite_us: int
    answer_us: int
    ack_us: int
    end_us: int
    caller_rtp_port: int
    callee_rtp_port: int


def _sip_dialog(
    plan: _Plan, call_id: str, tags: tuple[str, str], branches: tuple[str, str, str]
) -> list[tuple[int, bytes]]:
    """The seven SIP messages of a call, as (time µs, frame) in send order (RFC 3261 §24.2)."""
    k = plan.k
    a_ip, b_ip = _caller_ip(k), _callee_ip(k)
    a_user, b_user = f"1{k:05d}", f"2{k:05d}"
    a_uri, b_uri = f"sip:{a_user}@{a_ip}", f"sip:{b_user}@{b_ip}"
    a_contact, b_contact = f"<sip:{a_user}@{a_ip}:{SIP_PORT}>", f"<sip:{b_user}@{b_ip}:{SIP_PORT}>"
    ftag, ttag = tags
    pt = PAYLOAD_TYPES[plan.codec]
    via_inv = f"Via: SIP/2.0/UDP {a_ip}:{SIP_PORT};branch=z9hG4bK{branches[0]}"
    frm, to = f"From: <{a_uri}>;tag={ftag}", f"To: <{b_uri}>"
    to_tagged = f"{to};tag={ttag}"
    cid = f"Call-ID: {call_id}"
    common = ("Max-Forwards: 70", "User-Agent: callcap-workload")
    offer = _sdp(a_ip, plan.caller_rtp_port, 1000 + k, (0, 8, DTMF_PT))
    answer = _sdp(b_ip, plan.callee_rtp_port, 2000 + k, (pt, DTMF_PT))

    def a_to_b(t: int, text: bytes) -> tuple[int, bytes]:
        return t, udp_frame(a_ip, SIP_PORT, b_ip, SIP_PORT, text)

    def b_to_a(t: int, text: bytes) -> tuple[int, bytes]:
        return t, udp_frame(b_ip, SIP_PORT, a_ip, SIP_PORT, text)

    inv_resp = (via_inv, frm, cid, "CSeq: 1 INVITE")
    msgs = [
        a_to_b(
            plan.invite_us,
            _message(
                f"INVITE sip:{b_user}@{b_ip}:{SIP_PORT} SIP/2.0",
                (via_inv, *common, frm, to, cid, "CSeq: 1 INVITE", f"Contact: {a_contact}"),
                offer,
            ),
        ),
        b_to_a(plan.invite_us + 2_000, _message("SIP/2.0 100 Trying", (*inv_resp, to))),
        b_to_a(
            plan.invite_us + 30_000,
            _message("SIP/2.0 180 Ringing", (*inv_resp, to_tagged, f"Contact: {b_contact}")),
        ),
        b_to_a(
            plan.answer_us,
            _message("SIP/2.0 200 OK", (*inv_resp, to_tagged, f"Contact: {b_contact}"), answer),
        ),
        a_to_b(
            plan.ack_us,
            _message(
                f"ACK sip:{b_user}@{b_ip}:{SIP_PORT} SIP/2.0",
                (
                    f"Via: SIP/2.0/UDP {a_ip}:{SIP_PORT};branch=z9hG4bK{branches[1]}",
                    *common,
                    frm,
                    to_tagged,
                    cid,
                    "CSeq: 1 ACK",
                ),
            ),
        ),
    ]
    if k % 2 == 0:  # caller hangs up (RFC 3261 §15.1.1)
        via = f"Via: SIP/2.0/UDP {a_ip}:{SIP_PORT};branch=z9hG4bK{branches[2]}"
        bye = (via, frm, to_tagged, cid, "CSeq: 2 BYE")
        msgs.append(
            a_to_b(plan.end_us, _message(f"BYE sip:{b_user}@{b_ip}:{SIP_PORT} SIP/2.0", bye))
        )
        msgs.append(b_to_a(plan.end_us + 3_000, _message("SIP/2.0 200 OK", bye)))
    else:  # callee hangs up: From/To swap and its own CSeq space (RFC 3261 §12.2.1.1)
        via = f"Via: SIP/2.0/UDP {b_ip}:{SIP_PORT};branch=z9hG4bK{branches[2]}"
        bye = (via, f"From: <{b_uri}>;tag={ttag}", f"To: <{a_uri}>;tag={ftag}", cid, "CSeq: 1 BYE")
        msgs.append(
            b_to_a(plan.end_us, _message(f"BYE sip:{a_user}@{a_ip}:{SIP_PORT} SIP/2.0", bye))
        )
        msgs.append(a_to_b(plan.end_us + 3_000, _message("SIP/2.0 200 OK", bye)))
    return msgs


def _ceil_div(a: I64, b: int) -> I64:
    return -((-a) // b)


def _unique_ssrcs(rng: np.random.Generator, n: int) -> I64:
    """Random non-zero SSRCs, distinct within the file (RFC 3550 §8.1 makes clashes rare;
    a workload whose streams collide would test collision handling by accident)."""
    while True:
        ssrc = rng.integers(1, 1 << 32, size=n, dtype=np.int64)
        if len(np.unique(ssrc)) == n:
            return ssrc


def _validate(
    calls: int, seconds: float, codec: str, loss: float, jitter_ms: float, dup: float
) -> None:
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"calls must be 1..{MAX_CALLS}, got {calls}")
    if seconds < 1.0:
        raise ValueError(f"seconds must be at least 1, got {seconds}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss must be in [0, 1), got {loss}")
    if not 0.0 <= dup < 1.0:
        raise ValueError(f"duplicate must be in [0, 1), got {dup}")
    if jitter_ms < 0.0:
        raise ValueError(f"jitter_ms must be >= 0, got {jitter_ms}")


def write_workload(
    out: BinaryIO | str | os.PathLike[str],
    *,
    calls: int,
    seconds: float,
    seed: int = 1,
    codec: str = "pcmu",
    loss: float = 0.0,
    jitter_ms: float = 0.0,
    duplicate: float = 0.0,
    start_time: float = 1_700_000_000.0,
) -> WorkloadInfo:
    """Write ``calls`` concurrent calls spanning ``seconds`` to ``out``; return the ground truth.

    ``out`` is a path or a binary file object (left open; e.g. ``sys.stdout.buffer``).
    Calls start staggered over the first ``min(5 s, seconds/10)``, are answered 0.3 s after
    the INVITE, and all last equally long, ending 0.4 s before the capture does.  ``codec``
    "mixed" alternates PCMU (even calls) and PCMA (odd calls).  Impairments touch RTP only
    (SIP stays intact so every call is still recognisable): ``loss`` drops each packet with
    that probability, ``jitter_ms`` delays each by a uniform 0..J ms so packets of a stream
    can arrive out of order (the file stays in arrival-time order, as a capture is), and
    ``duplicate`` repeats a packet with that probability, a little later.  Deterministic for
    a given ``seed``.
    """
    _validate(calls, seconds, codec, loss, jitter_ms, duplicate)
    rng = np.random.default_rng(seed)
    t0_us = round(start_time * 1e6)
    total_us = round(seconds * 1e6)
    spread_us = round(min(5.0, seconds / 10) * 1e6) if calls > 1 else 0
    duration_us = total_us - spread_us - 400_000

    plans: list[_Plan] = []
    sip: list[tuple[int, bytes]] = []
    call_ids: list[str] = []
    for k in range(calls):
        invite = spread_us * k // calls + 1_000
        call_codec = {"pcmu": "PCMU", "pcma": "PCMA"}.get(codec, "PCMU" if k % 2 == 0 else "PCMA")
        answer = invite + 300_000
        plan = _Plan(
            k=k,
            codec=call_codec,
            invite_us=invite,
            answer_us=answer,
            ack_us=answer + 5_000,
            end_us=invite + duration_us,
            caller_rtp_port=16384 + 2 * (k % 4000),
            callee_rtp_port=30000 + 2 * (k % 4000),
        )
        ids = rng.integers(0, 2**63, size=6, dtype=np.int64)
        call_id = f"{int(ids[0]):016x}@{_caller_ip(k)}"
        tags = (f"{int(ids[1]) & 0xFFFFFFFF:08x}", f"{int(ids[2]) & 0xFFFFFFFF:08x}")
        branches = (f"{int(ids[3]):x}", f"{int(ids[4]):x}", f"{int(ids[5]):x}")
        plans.append(plan)
        call_ids.append(call_id)
        sip.extend(_sip_dialog(plan, call_id, tags, branches))
    sip.sort(key=lambda e: e[0])  # stable: a call's messages keep their order on ties

    # Streams: 2k = caller → callee (starts after the ACK), 2k+1 = callee → caller (after
    # the 200 OK).  Each sends one packet every 20 ms strictly before the BYE.
    n_streams = 2 * calls
    first = np.empty(n_streams, dtype=np.int64)
    end = np.empty(n_streams, dtype=np.int64)
    for p in plans:
        first[2 * p.k] = p.ack_us + 10_000
        first[2 * p.k + 1] = p.answer_us + 10_000
        end[2 * p.k] = end[2 * p.k + 1] = p.end_us
    count = np.maximum(_ceil_div(end - first, PTIME_US), 0)

    seq0 = rng.integers(0, 1 << 16, size=n_streams, dtype=np.int64)
    ts0 = rng.integers(0, 1 << 32, size=n_streams, dtype=np.int64)
    # Force wraparound where a test will look for it (RFC 3550 A.1): the caller stream of
    # every call k ≡ 1 (mod 4) wraps its sequence number, the callee stream of every
    # k ≡ 2 (mod 4) its timestamp, both half-way through the call.
    s = np.arange(n_streams)
    seq_wrap, ts_wrap = s % 8 == 2, s % 8 == 5
    seq0[seq_wrap] = ((1 << 16) - count[seq_wrap] // 2) % (1 << 16)
    ts0[ts_wrap] = ((1 << 32) - PTIME_SAMPLES * (count[ts_wrap] // 2)) % (1 << 32)
    ssrc = _unique_ssrcs(rng, n_streams)

    # Templates and payload tables (shared by streams with the same tone and codec).
    templates = np.zeros(n_streams, dtype=_RTP_RECORD)
    templates["incl"] = templates["orig"] = RTP_FRAME_LEN
    tables: dict[tuple[int, str], int] = {}
    table_of = np.empty(n_streams, dtype=np.int64)
    stream_facts: list[tuple[str, int, str, int, int, int]] = []
    for p in plans:
        tones = tone_frequencies(p.k)
        ends = (
            (_caller_ip(p.k), p.caller_rtp_port, _callee_ip(p.k), p.callee_rtp_port),
            (_callee_ip(p.k), p.callee_rtp_port, _caller_ip(p.k), p.caller_rtp_port),
        )
        pt = PAYLOAD_TYPES[p.codec]
        for side in (0, 1):
            idx = 2 * p.k + side
            src, sport, dst, dport = ends[side]
            frame = udp_frame(src, sport, dst, dport, b"\x80" + bytes(_RTP_LEN - 1 + PTIME_SAMPLES))
            templates["head"][idx] = np.frombuffer(frame, np.uint8, _RTP_OFF + 1 - 16)
            templates["mpt"][idx] = pt
            templates["ssrc"][idx] = ssrc[idx]
            key = (tones[side], p.codec)
            table_of[idx] = tables.setdefault(key, len(tables))
            stream_facts.append((src, sport, dst, dport, pt, tones[side]))
    payloads = np.stack([tone_frames(freq, c) for (freq, c) in tables])

    written = np.zeros(n_streams, dtype=np.int64)
    jitter_us = round(jitter_ms * 1000)
    dup_delay_us = max(jitter_us, 2_000)
    # Windows of whole 20 ms ticks, sized so that each holds about _TARGET_BATCH packets.
    window_us = PTIME_US * max(1, _TARGET_BATCH // n_streams)
    last_us = max(int(end.max()), sip[-1][0] if sip else 0)

    # A path is opened here and closed in the finally below; a file object stays open.
    path = out if isinstance(out, str | os.PathLike) else None
    f = cast(BinaryIO, out) if path is None else open(path, "wb", buffering=1 << 20)  # noqa: SIM115
    sip_n = rtp_n = 0
    last_ts = t0_us
    try:
        f.write(_PCAP_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, _SNAPLEN, _LINKTYPE_ETHERNET))
        carry_t = np.empty(0, dtype=np.int64)
        carry_r = np.empty(0, dtype=_RTP_RECORD)
        sip_i = 0
        a = 0
        while True:
            b = a + window_us
            final = a > last_us + jitter_us + dup_delay_us
            # Packet indices i of every stream whose send time first + 20 ms·i is in [a, b).
            lo = np.clip(_ceil_div(a - first, PTIME_US), 0, count)
            hi = np.clip(_ceil_div(b - first, PTIME_US), 0, count)
            per = hi - lo
            n = int(per.sum())
            sidx = np.repeat(s, per)
            i = lo[sidx] + np.arange(n) - np.repeat(np.cumsum(per) - per, per)
            arrival = first[sidx] + i * PTIME_US
            if loss > 0.0:
                keep = rng.random(n) >= loss
                sidx, i, arrival = sidx[keep], i[keep], arrival[keep]
            if jitter_us > 0:
                arrival = arrival + rng.integers(0, jitter_us + 1, size=len(arrival))
            if duplicate > 0.0:
                again = np.flatnonzero(rng.random(len(arrival)) < duplicate)
                delay = rng.integers(1, dup_delay_us + 1, size=len(again))
                sidx = np.concatenate([sidx, sidx[again]])
                i = np.concatenate([i, i[again]])
                arrival = np.concatenate([arrival, arrival[again] + delay])
            recs = templates[sidx]
            recs["seq"] = (seq0[sidx] + i) & 0xFFFF
            recs["ts"] = (ts0[sidx] + i * PTIME_SAMPLES) & 0xFFFFFFFF
            recs["mpt"][i == 0] |= 0x80  # marker on the first packet (RFC 3551 §4.1)
            recs["payload"] = payloads[table_of[sidx], i % FRAMES_PER_TABLE]
            written += np.bincount(sidx, minlength=n_streams)
            # Merge with what earlier windows delayed past their end; emit what arrives
            # before b (later sends all arrive at or after b), keep the rest for later.
            arrival = np.concatenate([carry_t, arrival])
            # (dtype= keeps the big-endian fields; promotion would make them native-endian)
            recs = np.concatenate([carry_r, recs], dtype=_RTP_RECORD)
            order = np.argsort(arrival, kind="stable")
            arrival, recs = arrival[order], recs[order]
            cut = len(arrival) if final else int(np.searchsorted(arrival, b, side="left"))
            emit_t, emit_r = arrival[:cut], recs[:cut]
            carry_t, carry_r = arrival[cut:], recs[cut:]
            abs_t = emit_t + t0_us
            emit_r["sec"] = abs_t // 1_000_000
            emit_r["usec"] = abs_t % 1_000_000
            block = memoryview(emit_r.tobytes())
            # Interleave the SIP messages of this window, by time (SIP first on ties).
            pos = 0
            while sip_i < len(sip) and (final or sip[sip_i][0] < b):
                t_sip, frame = sip[sip_i]
                at = int(np.searchsorted(emit_t, t_sip, side="left"))
                if at > pos:
                    f.write(block[pos * RTP_RECORD_LEN : at * RTP_RECORD_LEN])
                    pos = at
                t_abs = t_sip + t0_us
                f.write(
                    _PCAP_RECORD.pack(t_abs // 1_000_000, t_abs % 1_000_000, len(frame), len(frame))
                )
                f.write(frame)
                last_ts = max(last_ts, t_abs)
                sip_i += 1
                sip_n += 1
            f.write(block[pos * RTP_RECORD_LEN :])
            rtp_n += cut
            if cut:
                last_ts = max(last_ts, int(abs_t[-1]))
            if final:
                break
            a = b
        f.flush()
    finally:
        if path is not None:
            f.close()

    infos = []
    for p in plans:
        streams = []
        for side in (0, 1):
            idx = 2 * p.k + side
            src, sport, dst, dport, pt, tone = stream_facts[idx]
            streams.append(
                StreamInfo(
                    src_ip=src,
                    src_port=sport,
                    dst_ip=dst,
                    dst_port=dport,
                    ssrc=int(ssrc[idx]),
                    payload_type=pt,
                    first_seq=int(seq0[idx]),
                    first_timestamp=int(ts0[idx]),
                    first_time=(t0_us + int(first[idx])) / 1e6,
                    tone_hz=tone,
                    packets_sent=int(count[idx]),
                    packets=int(written[idx]),
                )
            )
        caller_hz, callee_hz = tone_frequencies(p.k)
        infos.append(
            CallInfo(
                index=p.k,
                call_id=call_ids[p.k],
                caller_uri=f"sip:1{p.k:05d}@{_caller_ip(p.k)}",
                callee_uri=f"sip:2{p.k:05d}@{_callee_ip(p.k)}",
                caller_ip=_caller_ip(p.k),
                callee_ip=_callee_ip(p.k),
                codec=p.codec,
                start_time=(t0_us + p.invite_us) / 1e6,
                answer_time=(t0_us + p.answer_us) / 1e6,
                end_time=(t0_us + p.end_us) / 1e6,
                bye_from="caller" if p.k % 2 == 0 else "callee",
                caller_tone_hz=caller_hz,
                callee_tone_hz=callee_hz,
                caller=streams[0],
                callee=streams[1],
            )
        )
    return WorkloadInfo(
        calls=tuple(infos),
        total_packets=sip_n + rtp_n,
        sip_packets=sip_n,
        rtp_packets=rtp_n,
        start_time=start_time,
        end_time=last_ts / 1e6,
        seed=seed,
        codec=codec,
        loss=loss,
        jitter_ms=jitter_ms,
        duplicate=duplicate,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a pcap of N concurrent synthetic SIP/G.711 calls (benchmark input)."
    )
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls (default 200)")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="capture length in seconds (default 60)"
    )
    parser.add_argument("--out", required=True, help="pcap to write, or - for stdout")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--codec", choices=CODECS, default="pcmu", help="G.711 law per call")
    parser.add_argument("--loss", type=float, default=0.0, help="RTP loss probability")
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="uniform 0..J ms RTP delay (reorders)"
    )
    parser.add_argument("--dup", type=float, default=0.0, help="RTP duplication probability")
    parser.add_argument(
        "--start-time", type=float, default=1_700_000_000.0, help="epoch of the first record"
    )
    parser.add_argument("--info", metavar="FILE", help="also write the ground truth as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out: BinaryIO | str = sys.stdout.buffer if args.out == "-" else args.out
    started = time.perf_counter()
    try:
        info = write_workload(
            out,
            calls=args.calls,
            seconds=args.seconds,
            seed=args.seed,
            codec=args.codec,
            loss=args.loss,
            jitter_ms=args.jitter_ms,
            duplicate=args.dup,
            start_time=args.start_time,
        )
    except ValueError as exc:
        sys.stderr.write(f"workload: error: {exc}\n")
        return 2
    except BrokenPipeError:
        return 1
    elapsed = time.perf_counter() - started
    if args.info:
        with open(args.info, "w", encoding="utf-8") as fh:
            json.dump(info.to_dict(), fh, indent=1)
    sys.stderr.write(
        f"workload: {info.total_packets} packets ({info.sip_packets} SIP, {info.rtp_packets} RTP)"
        f" of {args.calls} calls in {elapsed:.2f} s"
        f" ({info.total_packets / max(elapsed, 1e-9) / 1e6:.2f} M packets/s)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
