"""SIP messages (RFC 3261 §7) from bytes: datagrams whole, byte streams framed by Content-Length.

Sans-IO and strict about structure, lenient about what real equipment does: header names are
case-insensitive and may be compact (§7.3.3), lines may be folded (§7.3.1) or end in a bare
LF, and values are decoded as UTF-8 with ``surrogateescape`` so hostile bytes survive intact
(the sidecar writer escapes them; nothing here ever becomes a path).  Every limit is explicit,
and every rejection is a :class:`ParseError` whose ``reason`` feeds the drop counters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from callcap.errors import ParseError

MAX_LINE = 16 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 256

COMPACT = {
    "i": "call-id",
    "f": "from",
    "t": "to",
    "m": "contact",
    "c": "content-type",
    "l": "content-length",
    "v": "via",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "r": "refer-to",
    "b": "referred-by",
    "u": "allow-events",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

_CANONICAL = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
}

_TOKEN = re.compile(rb"^[A-Za-z0-9.!%*_+`'~-]+$")
_STATUS_LINE = re.compile(rb"^SIP/2\.0 ([1-6]\d\d)(?: (.*))?$")
_REQUEST_LINE = re.compile(rb"^([A-Za-z0-9.!%*_+`'~-]+) (\S+) SIP/2\.0$")
_PARAM_TAG = re.compile(r";\s*tag\s*=\s*([^;,\s>]+)", re.IGNORECASE)
_BRANCH = re.compile(r";\s*branch\s*=\s*([^;,\s]+)", re.IGNORECASE)
_URI_USER = re.compile(r"^(?:sips?|tel|urn):(?:([^@;?>]*)@)?", re.IGNORECASE)
_DTMF_RELAY = re.compile(r"signal\s*=\s*(\S+)", re.IGNORECASE)
_DTMF_DURATION = re.compile(r"duration\s*=\s*(\d+)", re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_SIP_START = re.compile(rb"(?:^|\n)(SIP/2\.0 [1-6]\d\d|[A-Z]{3,16} \S+ SIP/2\.0\r?\n)")

_DIGITS = "0123456789*#ABCD"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def header_name(name: str) -> str:
    """Canonical lowercase long form of a header name (compact forms expanded)."""
    lower = name.strip().lower()
    return COMPACT.get(lower, lower)


def _title(name: str) -> str:
    return _CANONICAL.get(name) or "-".join(part.capitalize() for part in name.split("-"))


@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From/To/Contact value (RFC 3261 §20.10, §25.1 name-addr / addr-spec)."""

    uri: str
    display_name: str | None
    user: str | None
    tag: str | None

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        text = value.strip()
        if not text:
            raise ParseError("sip_bad_name_addr", "empty From/To value")
        display: str | None = None
        params = ""
        lt = text.find("<")
        if lt >= 0:
            gt = text.find(">", lt)
            if gt < 0:
                raise ParseError("sip_bad_name_addr", f"unterminated <uri> in {text[:80]!r}")
            display = text[:lt].strip()
            if display.startswith('"') and display.endswith('"') and len(display) >= 2:
                display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            display = display or None
            uri = text[lt + 1 : gt].strip()
            params = text[gt + 1 :]
        else:
            # addr-spec without brackets: parameters after ';' belong to the header (§20.10)
            semi = text.find(";")
            uri = text if semi < 0 else text[:semi]
            params = "" if semi < 0 else text[semi:]
            uri = uri.strip()
        if not uri:
            raise ParseError("sip_bad_name_addr", f"no URI in {text[:80]!r}")
        tag_match = _PARAM_TAG.search(params)
        user_match = _URI_USER.match(uri)
        user = user_match.group(1) if user_match and user_match.group(1) else None
        if user is None and uri.lower().startswith("tel:"):
            user = uri[4:].split(";", 1)[0] or None
        return cls(
            uri=uri, display_name=display, user=user, tag=tag_match.group(1) if tag_match else None
        )


@dataclass(frozen=True, slots=True)
class SipMessage:
    """One SIP request or response, headers unfolded and names canonicalised."""

    method: str | None
    request_uri: str | None
    status: int | None
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        """Parse one complete message (a UDP datagram).  Body is cut to Content-Length."""
        msg, body_start, content_length = _parse_head(data)
        available = len(data) - body_start
        if content_length is None:
            body = data[body_start:]
        elif content_length > available:
            raise ParseError(
                "sip_truncated_body",
                f"Content-Length {content_length} but only {available} body bytes",
            )
        else:
            body = data[body_start : body_start + content_length]
        return _with_body(msg, body)

    def __bytes__(self) -> bytes:
        if self.method is not None:
            start = f"{self.method} {self.request_uri} SIP/2.0"
        else:
            start = f"SIP/2.0 {self.status} {self.reason or ''}".rstrip()
        lines = [start] + [f"{_title(name)}: {value}" for name, value in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> str | None:
        key = header_name(name)
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        key = header_name(name)
        return [value for hname, value in self.headers if hname == key]

    @property
    def call_id(self) -> str:
        value = self.header("call-id")
        if value is None:
            raise ParseError("sip_missing_call_id", "no Call-ID header")
        return value.strip()

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self.header("from") or "")

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self.header("to") or "")

    @property
    def cseq(self) -> tuple[int, str]:
        value = (self.header("cseq") or "").split()
        if len(value) != 2 or not value[0].isdigit() or len(value[0]) > 10:
            raise ParseError(
                "sip_bad_cseq", f"CSeq must be 'number METHOD', got {' '.join(value)[:60]!r}"
            )
        return int(value[0]), value[1].upper()

    @property
    def via_branch(self) -> str | None:
        via = self.header("via")
        if via is None:
            return None
        match = _BRANCH.search(via.split(",", 1)[0])
        return match.group(1) if match else None

    @property
    def content_type(self) -> str | None:
        value = self.header("content-type")
        if value is None:
            return None
        return value.split(";", 1)[0].strip().lower() or None

    @property
    def user_agent(self) -> str | None:
        return self.header("user-agent") if self.is_request else self.header("server")


def _parse_head(data: bytes) -> tuple[SipMessage, int, int | None]:
    """Start line and headers; returns the message (empty body), body offset and Content-Length."""
    end = data.find(b"\r\n\r\n")
    sep = 4
    lf_end = data.find(b"\n\n")
    if lf_end >= 0 and (end < 0 or lf_end < end):
        end, sep = lf_end, 2
    if end < 0:
        if len(data) > MAX_HEAD:
            raise ParseError("sip_oversized", f"message head exceeds {MAX_HEAD} bytes")
        # A datagram may legitimately end right after the last header line.
        end = len(data)
        sep = 0
        if not data.endswith(b"\n"):
            raise ParseError("sip_truncated_head", "message head does not end with an empty line")
    if end > MAX_HEAD:
        raise ParseError("sip_oversized", f"message head is {end} bytes, limit {MAX_HEAD}")
    lines = data[:end].split(b"\n")
    start = lines[0].rstrip(b"\r")
    method = request_uri = reason = None
    status = None
    m = _STATUS_LINE.match(start)
    if m:
        status = int(m.group(1))
        reason = _decode(m.group(2) or b"").strip()
    else:
        m = _REQUEST_LINE.match(start)
        if not m:
            raise ParseError("sip_bad_start_line", f"not a SIP start line: {start[:60]!r}")
        method = _decode(m.group(1))
        request_uri = _decode(m.group(2))
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if len(line) > MAX_LINE:
            raise ParseError("sip_oversized", f"header line of {len(line)} bytes, limit {MAX_LINE}")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise ParseError("sip_bad_header", "continuation line before any header")
            prev_name, prev_value = headers[-1]
            headers[-1] = (prev_name, prev_value + " " + _decode(line.strip()))
            continue
        colon = line.find(b":")
        if colon <= 0:
            raise ParseError("sip_bad_header", f"header line without a name: {line[:60]!r}")
        raw_name = line[:colon].strip()
        if not _TOKEN.match(raw_name):
            raise ParseError("sip_bad_header", f"bad header name {raw_name[:40]!r}")
        headers.append((header_name(raw_name.decode("ascii")), _decode(line[colon + 1 :].strip())))
        if len(headers) > MAX_HEADERS:
            raise ParseError("sip_oversized", f"more than {MAX_HEADERS} headers")
    msg = SipMessage(method, request_uri, status, reason, tuple(headers), b"")
    for required in ("call-id", "from", "to", "cseq"):
        if msg.header(required) is None:
            raise ParseError(
                f"sip_missing_{required.replace('-', '_')}", f"no {_title(required)} header"
            )
    msg.cseq  # validates the CSeq form  # noqa: B018
    length_text = msg.header("content-length")
    content_length: int | None = None
    if length_text is not None:
        length_text = length_text.strip()
        if not length_text.isdigit() or len(length_text) > 9:
            raise ParseError(
                "sip_bad_content_length", f"Content-Length {length_text[:20]!r} is not a number"
            )
        content_length = int(length_text)
    return msg, end + sep, content_length


def _with_body(msg: SipMessage, body: bytes) -> SipMessage:
    return SipMessage(msg.method, msg.request_uri, msg.status, msg.reason, msg.headers, body)


_METHOD_PREFIXES = (
    b"INVITE ",
    b"ACK ",
    b"BYE ",
    b"CANCEL ",
    b"OPTIONS ",
    b"REGISTER ",
    b"PRACK ",
    b"SUBSCRIBE ",
    b"NOTIFY ",
    b"PUBLISH ",
    b"INFO ",
    b"REFER ",
    b"MESSAGE ",
    b"UPDATE ",
)


def looks_like_sip(payload: bytes) -> bool:
    """Cheap first-line test for SIP on a port not configured as SIP."""
    if payload.startswith(b"SIP/2.0 "):
        return True
    if not payload[:1].isupper():
        return False
    if payload.startswith(_METHOD_PREFIXES):
        eol = payload.find(b"\n", 0, 2048)
        return eol > 0 and payload[:eol].rstrip(b"\r").endswith(b" SIP/2.0")
    eol = payload.find(b"\n", 0, 2048)
    return eol > 0 and _REQUEST_LINE.match(payload[:eol].rstrip(b"\r")) is not None


# -- bodies -------------------------------------------------------------------------------------


def sdp_bodies(msg: SipMessage) -> list[bytes]:
    """The SDP bodies a message carries, including inside multipart bodies (RFC 2046 §5.1)."""
    if not msg.body:
        return []
    ctype = msg.header("content-type")
    return _sdp_in(ctype, msg.body, depth=0)


def _sdp_in(ctype: str | None, body: bytes, depth: int) -> list[bytes]:
    media = (ctype or "").split(";", 1)[0].strip().lower()
    if media == "application/sdp" or (not media and body.lstrip().startswith(b"v=0")):
        return [body]
    if media.startswith("multipart/") and depth < 4 and ctype is not None:
        match = _BOUNDARY.search(ctype)
        if match is None:
            return []
        boundary = (match.group(1) or match.group(2)).encode("utf-8", "surrogateescape")
        found: list[bytes] = []
        for part in _split_multipart(body, boundary):
            part_type, part_body = _part_headers(part)
            found.extend(_sdp_in(part_type, part_body, depth + 1))
        return found
    return []


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = b"--" + boundary
    pieces = body.split(delimiter)
    parts = []
    for raw in pieces[1:]:
        if raw.startswith(b"--"):
            break  # close-delimiter
        # strip the CRLF after the delimiter line and the CRLF before the next delimiter
        piece = raw.removeprefix(b"\r\n") if raw.startswith(b"\r\n") else raw.removeprefix(b"\n")
        piece = (
            piece.removesuffix(b"\r\n") if piece.endswith(b"\r\n") else piece.removesuffix(b"\n")
        )
        parts.append(piece)
    return parts


def _part_headers(part: bytes) -> tuple[str | None, bytes]:
    end = part.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end, sep = part.find(b"\n\n"), 2
    if end < 0:
        return None, part
    ctype = None
    for line in part[:end].split(b"\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-type", b"c"):
            ctype = _decode(value.strip())
    return ctype, part[end + sep :]


def dtmf_from_info(msg: SipMessage) -> tuple[str, int | None] | None:
    """A DTMF digit carried by SIP INFO (application/dtmf-relay or application/dtmf)."""
    if msg.method != "INFO" or not msg.body:
        return None
    ctype = msg.content_type
    text = msg.body.decode("utf-8", "replace")
    duration: int | None = None
    if ctype == "application/dtmf-relay":
        match = _DTMF_RELAY.search(text)
        if match is None:
            return None
        signal = match.group(1)
        dmatch = _DTMF_DURATION.search(text)
        if dmatch is not None and len(dmatch.group(1)) <= 7:
            duration = int(dmatch.group(1))
    elif ctype == "application/dtmf":
        signal = text.strip()
    else:
        return None
    signal = signal.strip().upper()
    if signal == "10":
        signal = "*"
    elif signal == "11":
        signal = "#"
    if len(signal) != 1 or signal not in _DIGITS:
        return None
    return signal, duration


# -- streams ----------------------------------------------------------------------------------


class SipStreamFramer:
    """SIP over a byte stream (TCP): messages are delimited by Content-Length (RFC 3261 §18.3).

    Keepalive CRLFs (RFC 5626 §3.5.1) between messages are skipped.  A message that cannot be
    framed yields a :class:`ParseError` item, and the framer resynchronises on the next line
    that looks like a SIP start line, so one bad message costs that message, not the
    connection.  The buffer never holds more than ``max_message`` bytes.
    """

    def __init__(self, *, max_message: int = 65536) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[SipMessage | ParseError]:
        self._buf += data
        out: list[SipMessage | ParseError] = []
        while True:
            buf = self._buf
            # skip keepalives and stray line ends between messages
            skip = 0
            while skip < len(buf) and buf[skip] in (0x0D, 0x0A, 0x20, 0x09, 0x00):
                skip += 1
            if skip:
                del buf[:skip]
            if not buf:
                break
            end = buf.find(b"\r\n\r\n")
            sep = 4
            lf = buf.find(b"\n\n")
            if lf >= 0 and (end < 0 or lf < end):
                end, sep = lf, 2
            if end < 0:
                if len(buf) > min(self.max_message, MAX_HEAD):
                    out.append(
                        ParseError("sip_oversized", "no end of message head within the size limit")
                    )
                    self._resync(1)
                    continue
                if not _could_start_sip(bytes(buf[:32])):
                    out.append(
                        ParseError(
                            "sip_bad_start_line", f"stream data is not SIP: {bytes(buf[:40])!r}"
                        )
                    )
                    self._resync(1)
                    continue
                break
            head = bytes(buf[: end + sep])
            try:
                msg, body_start, length = _parse_head(head)
            except ParseError as exc:
                out.append(exc)
                self._resync(1)
                continue
            length = length or 0
            total = body_start + length
            if total > self.max_message:
                out.append(
                    ParseError(
                        "sip_oversized", f"message of {total} bytes exceeds {self.max_message}"
                    )
                )
                self._resync(body_start)
                continue
            if len(buf) < total:
                break
            out.append(_with_body(msg, bytes(buf[body_start:total])))
            del buf[:total]
        return out

    def _resync(self, start: int) -> None:
        """Drop bytes up to the next plausible SIP start line at or after ``start``."""
        match = _SIP_START.search(self._buf, start)
        if match is None:
            # keep a short tail: a start line may be split across segments
            tail = bytes(self._buf[-32:])
            nl = tail.rfind(b"\n")
            self._buf = bytearray(tail[nl + 1 :] if nl >= 0 else b"")
            return
        begin = match.start(1)
        del self._buf[:begin]


def _could_start_sip(prefix: bytes) -> bool:
    """Could this buffer prefix still become a SIP start line once more bytes arrive?"""
    if b"SIP/2.0 ".startswith(prefix[:8]) or prefix.startswith(b"SIP/2.0"):
        return True
    space = prefix.find(b" ")
    token = prefix if space < 0 else prefix[:space]
    return bool(token) and _TOKEN.match(token) is not None and token.isupper()
