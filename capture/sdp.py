"""SDP session descriptions (RFC 8866, formerly 4566) as far as a media recorder needs them.

What matters is where each party receives audio (``c=`` and ``m=``, RFC 3264 §5), which
payload types mean which codec (``a=rtpmap`` plus the static table of RFC 3551 §6), whether
media flows (``a=sendonly/recvonly/inactive``, port 0, the RFC 2543 ``0.0.0.0`` hold) and
whether it is encrypted (SRTP: ``RTP/SAVP[F]`` profiles or ``a=crypto``, RFC 4568).
Unknown lines are ignored, as RFC 8866 §5 asks of parsers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from callcap.errors import ParseError

MAX_SDP = 64 * 1024
DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})


@dataclass(frozen=True, slots=True)
class RtpMap:
    encoding: str
    clock_rate: int
    channels: int = 1


STATIC_PAYLOAD_TYPES: Mapping[int, RtpMap] = MappingProxyType(
    {
        0: RtpMap("PCMU", 8000),
        3: RtpMap("GSM", 8000),
        4: RtpMap("G723", 8000),
        5: RtpMap("DVI4", 8000),
        6: RtpMap("DVI4", 16000),
        7: RtpMap("LPC", 8000),
        8: RtpMap("PCMA", 8000),
        9: RtpMap("G722", 8000),  # RTP clock 8000 although sampled at 16 kHz (RFC 3551 §4.5.2)
        10: RtpMap("L16", 44100, 2),
        11: RtpMap("L16", 44100),
        12: RtpMap("QCELP", 8000),
        13: RtpMap("CN", 8000),
        14: RtpMap("MPA", 90000),
        15: RtpMap("G728", 8000),
        16: RtpMap("DVI4", 11025),
        17: RtpMap("DVI4", 22050),
        18: RtpMap("G729", 8000),
        25: RtpMap("CelB", 90000),
        26: RtpMap("JPEG", 90000),
        28: RtpMap("nv", 90000),
        31: RtpMap("H261", 90000),
        32: RtpMap("MPV", 90000),
        33: RtpMap("MP2T", 90000),
        34: RtpMap("H263", 90000),
    }
)
"""RFC 3551 table 4 and 5: payload types with a fixed meaning."""


@dataclass(frozen=True, slots=True)
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: tuple[int, ...]
    address: str | None
    rtcp_port: int | None
    direction: str
    rtpmap: tuple[tuple[int, RtpMap], ...]
    encrypted: bool
    ptime_ms: int | None

    def codec(self, pt: int) -> RtpMap | None:
        for number, rtpmap in self.rtpmap:
            if number == pt:
                return rtpmap
        return None

    @property
    def on_hold(self) -> bool:
        return self.direction in ("sendonly", "inactive") or self.address in ("0.0.0.0", "::")  # noqa: S104 - RFC 2543 hold, not a bind


@dataclass(frozen=True, slots=True)
class SessionDescription:
    origin: str | None
    address: str | None
    media: tuple[MediaDescription, ...]

    @classmethod
    def parse(cls, data: bytes) -> SessionDescription:
        if len(data) > MAX_SDP:
            raise ParseError("sdp_oversized", f"SDP of {len(data)} bytes exceeds {MAX_SDP}")
        text = data.decode("utf-8", "replace")
        lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
        lines = [line for line in lines if line]
        if not lines or not lines[0].startswith("v="):
            raise ParseError("sdp_no_version", "SDP must start with v=")
        origin: str | None = None
        session_addr: str | None = None
        session_dir = "sendrecv"
        session_crypto = False
        blocks: list[dict[str, object]] = []
        current: dict[str, object] | None = None
        for line in lines[1:]:
            if len(line) < 2 or line[1] != "=":
                continue  # tolerate junk lines (RFC 8866 §5: be liberal in what is ignored)
            kind, value = line[0], line[2:].strip()
            if kind == "m":
                current = {"m": value, "attrs": [], "c": None}
                blocks.append(current)
            elif kind == "o" and current is None:
                origin = value
            elif kind == "c":
                addr = _connection_address(value)
                if current is None:
                    session_addr = addr
                else:
                    current["c"] = addr
            elif kind == "a":
                if current is None:
                    name = value.split(":", 1)[0].strip().lower()
                    if name in DIRECTIONS:
                        session_dir = name
                    elif name == "crypto":
                        session_crypto = True
                else:
                    attrs = current["attrs"]
                    assert isinstance(attrs, list)
                    attrs.append(value)
        media = tuple(
            md
            for block in blocks
            if (md := _media(block, session_addr, session_dir, session_crypto)) is not None
        )
        return cls(origin=origin, address=session_addr, media=media)

    def audio(self) -> list[MediaDescription]:
        return [md for md in self.media if md.media == "audio"]


def _connection_address(value: str) -> str | None:
    """``c=IN IP4 192.0.2.1`` → normalised address text (multicast TTL suffix removed)."""
    parts = value.split()
    if len(parts) < 3 or parts[0].upper() != "IN":
        return None
    addr = parts[2].split("/", 1)[0]
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr  # an FQDN: kept for the record, not routable for media


def _media(
    block: dict[str, object], session_addr: str | None, session_dir: str, session_crypto: bool
) -> MediaDescription | None:
    m = block["m"]
    assert isinstance(m, str)
    parts = m.split()
    if len(parts) < 3:
        return None
    media_type = parts[0].lower()
    port_text = parts[1].split("/", 1)[0]
    if not port_text.isdigit() or int(port_text) > 65535:
        return None
    proto = parts[2]
    formats = tuple(int(f) for f in parts[3:] if f.isdigit() and int(f) < 128)
    rtpmaps: dict[int, RtpMap] = {}
    direction = session_dir
    rtcp_port: int | None = None
    crypto = session_crypto
    ptime: int | None = None
    attrs = block["attrs"]
    assert isinstance(attrs, list)
    for attr in attrs:
        name, _, rest = str(attr).partition(":")
        name = name.strip().lower()
        if name in DIRECTIONS:
            direction = name
        elif name == "rtpmap":
            parsed = _rtpmap(rest)
            if parsed is not None:
                rtpmaps.setdefault(parsed[0], parsed[1])
        elif name == "rtcp":
            first = rest.split()[0] if rest.split() else ""
            if first.isdigit() and int(first) < 65536:
                rtcp_port = int(first)
        elif name == "crypto":
            crypto = True
        elif name == "ptime" and rest.strip().isdigit():
            ptime = int(rest.strip())
    for pt in formats:
        if pt not in rtpmaps and pt in STATIC_PAYLOAD_TYPES:
            rtpmaps[pt] = STATIC_PAYLOAD_TYPES[pt]
    address = block["c"] if block["c"] is not None else session_addr
    assert address is None or isinstance(address, str)
    return MediaDescription(
        media=media_type,
        port=int(port_text),
        proto=proto,
        formats=formats,
        address=address,
        rtcp_port=rtcp_port,
        direction=direction,
        rtpmap=tuple(sorted(rtpmaps.items())),
        encrypted="SAVP" in proto.upper() or crypto,
        ptime_ms=ptime,
    )


def _rtpmap(value: str) -> tuple[int, RtpMap] | None:
    """``96 telephone-event/8000`` or ``111 opus/48000/2``."""
    parts = value.split(None, 1)
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    pt = int(parts[0])
    fields = parts[1].strip().split("/")
    if pt > 127 or len(fields) < 2 or not fields[1].isdigit():
        return None
    channels = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 1
    return pt, RtpMap(fields[0], int(fields[1]), channels)
