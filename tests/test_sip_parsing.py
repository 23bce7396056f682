"""SIP message parsing (RFC 3261 §7, §18.3, §20), on hand-written and captured bytes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callcap.capture.sip import (
    NameAddr,
    SipMessage,
    SipStreamFramer,
    dtmf_from_info,
    looks_like_sip,
    sdp_bodies,
)
from callcap.errors import ParseError

SDP = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"


def invite(body: bytes = SDP, *, extra: str = "", compact: bool = False) -> bytes:
    names = (
        ("v", "f", "t", "i", "c", "l")
        if compact
        else ("Via", "From", "To", "Call-ID", "Content-Type", "Content-Length")
    )
    head = (
        "INVITE sip:bob@example.com SIP/2.0\r\n"
        f"{names[0]}: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds\r\n"
        f'{names[1]}: "Alice Ä" <sip:+4930123@example.com>;tag=1928301774\r\n'
        f"{names[2]}: <sip:bob@example.com>\r\n"
        f"{names[3]}: a84b4c76e66710@pc33.example.com\r\n"
        "CSeq: 314159 INVITE\r\n"
        "User-Agent: TestPhone/1.0\r\n"
        f"{extra}"
        f"{names[4]}: application/sdp\r\n"
        f"{names[5]}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_invite_fields_are_parsed() -> None:
    m = SipMessage.parse(invite())
    assert (m.method, m.request_uri, m.status) == ("INVITE", "sip:bob@example.com", None)
    assert m.call_id == "a84b4c76e66710@pc33.example.com"
    assert m.cseq == (314159, "INVITE")
    assert m.from_ == NameAddr("sip:+4930123@example.com", "Alice Ä", "+4930123", "1928301774")
    assert m.to.tag is None and m.to.user == "bob"
    assert m.via_branch == "z9hG4bK776asdhds"
    assert m.user_agent == "TestPhone/1.0"
    assert m.content_type == "application/sdp"
    assert sdp_bodies(m) == [SDP]


def test_compact_forms_and_case_insensitive_names_are_the_same_message() -> None:
    long_form = SipMessage.parse(invite())
    compact = SipMessage.parse(invite(compact=True))
    assert compact.headers == long_form.headers
    mixed = SipMessage.parse(invite().replace(b"Call-ID:", b"cAlL-iD:"))
    assert mixed.call_id == long_form.call_id


def test_folded_headers_are_unfolded() -> None:
    m = SipMessage.parse(
        invite(
            extra="Subject: I know you're there,\r\n   pick up the phone\r\n\t and talk to me!\r\n"
        )
    )
    assert m.header("subject") == "I know you're there, pick up the phone and talk to me!"
    assert m.header("s") == m.header("Subject")


def test_response_status_and_server_header() -> None:
    raw = (
        b"SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@h>;tag=1\r\n"
        b"To: <sip:b@h>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nServer: PBX 2\r\nContent-Length: 0\r\n\r\n"
    )
    m = SipMessage.parse(raw)
    assert (m.status, m.reason, m.user_agent, m.to.tag) == (486, "Busy Here", "PBX 2", "2")


def test_bare_lf_line_endings_are_tolerated() -> None:
    head, body = invite().split(b"\r\n\r\n", 1)
    m = SipMessage.parse(head.replace(b"\r\n", b"\n") + b"\n\n" + body)
    assert m.call_id == "a84b4c76e66710@pc33.example.com"
    assert m.body == SDP


def test_round_trip_parse_serialise_parse() -> None:
    m = SipMessage.parse(invite(compact=True))
    assert SipMessage.parse(bytes(m)) == m


def test_udp_body_is_cut_to_content_length_and_short_body_rejected() -> None:
    m = SipMessage.parse(invite() + b"trailing junk")
    assert m.body == SDP
    with pytest.raises(ParseError) as err:
        SipMessage.parse(invite()[:-10])
    assert err.value.reason == "sip_truncated_body"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"HELLO\r\n\r\n", "sip_bad_start_line"),
        (
            invite().replace(b"Call-ID: a84b4c76e66710@pc33.example.com\r\n", b""),
            "sip_missing_call_id",
        ),
        (invite().replace(b"CSeq: 314159 INVITE", b"CSeq: abc"), "sip_bad_cseq"),
        (invite().replace(b"Content-Length: ", b"Content-Length: -"), "sip_bad_content_length"),
        (invite(extra="X-Big: " + "a" * 17000 + "\r\n"), "sip_oversized"),
        (invite(extra="Bad Header Name: x\r\n"), "sip_bad_header"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as err:
        SipMessage.parse(raw)
    assert err.value.reason == reason


def test_hostile_values_survive_as_escaped_text_not_errors() -> None:
    call_id = b"../../etc/passwd\x00\xff\xfe" + b"A" * 5000
    m = SipMessage.parse(invite().replace(b"a84b4c76e66710@pc33.example.com", call_id))
    assert m.call_id.encode("utf-8", "surrogateescape") == call_id


def test_multipart_body_yields_its_sdp_part() -> None:
    body = (
        b"--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\n" + SDP + b"\r\n"
        b"--unique-boundary-1\r\nContent-Type: application/isup; version=itu-t92+\r\n\r\n\x01\x02\x03\r\n"
        b"--unique-boundary-1--\r\n"
    )
    raw = invite(body).replace(
        b"Content-Type: application/sdp",
        b'Content-Type: multipart/mixed;boundary="unique-boundary-1"',
        1,
    )
    assert sdp_bodies(SipMessage.parse(raw)) == [SDP]


@pytest.mark.parametrize(
    ("ctype", "body", "expected"),
    [
        ("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n", ("5", 160)),
        ("application/dtmf-relay", b"Signal= *\r\nDuration= 250\r\n", ("*", 250)),
        ("application/dtmf-relay", b"Signal=11\r\n", ("#", None)),
        ("application/dtmf", b"7", ("7", None)),
        ("application/dtmf-relay", b"Signal=Z\r\n", None),
        ("text/plain", b"Signal=5", None),
    ],
)
def test_sip_info_dtmf_bodies(
    ctype: str, body: bytes, expected: tuple[str, int | None] | None
) -> None:
    raw = invite(body).replace(b"INVITE sip", b"INFO sip").replace(b"314159 INVITE", b"2 INFO")
    raw = raw.replace(b"application/sdp", ctype.encode())
    assert dtmf_from_info(SipMessage.parse(raw)) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (invite(), True),
        (b"SIP/2.0 200 OK\r\n", True),
        (b"OPTIONS sip:x SIP/2.0\r\n", True),
        (b"FOOBAR sip:x SIP/2.0\r\n", True),
        (b"\x80\x08\x00\x01" + b"\x00" * 168, False),
        (b"GET / HTTP/1.1\r\n", False),
        (b"", False),
    ],
)
def test_looks_like_sip_first_line(payload: bytes, expected: bool) -> None:
    assert looks_like_sip(payload) is expected


@given(st.binary(max_size=512))
def test_random_bytes_raise_only_parse_error(raw: bytes) -> None:
    with contextlib.suppress(ParseError):
        SipMessage.parse(raw)


@given(st.binary(max_size=200))
def test_random_tail_after_a_valid_head_raises_only_parse_error(tail: bytes) -> None:
    try:
        m = SipMessage.parse(invite()[:120] + tail)
        m.from_  # noqa: B018
        m.to  # noqa: B018
    except ParseError:
        pass


# -- TCP framing ----------------------------------------------------------------------------------


def _stream() -> tuple[bytes, list[SipMessage]]:
    msgs = [
        invite(),
        invite(compact=True).replace(b"314159", b"314160"),
        invite(b"").replace(b"INVITE sip", b"BYE sip"),
    ]
    msgs[2] = (
        msgs[2].replace(b"314159 INVITE", b"314161 BYE").replace(b"application/sdp", b"text/plain")
    )
    parsed = [SipMessage.parse(m) for m in msgs]
    return b"\r\n\r\n".join(msgs) + b"\r\n", parsed


def test_several_messages_in_one_segment_are_framed_by_content_length() -> None:
    data, expected = _stream()
    assert SipStreamFramer().feed(data) == expected


@settings(max_examples=200)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_random_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    data, expected = _stream()
    framer = SipStreamFramer()
    out: list[SipMessage | ParseError] = []
    pos = 0
    for size in cuts:
        out += framer.feed(data[pos : pos + size])
        pos += size
    out += framer.feed(data[pos:])
    assert out == expected


def test_garbage_between_messages_is_reported_and_skipped() -> None:
    data, expected = _stream()
    framer = SipStreamFramer()
    out = framer.feed(b"\x16\x03\x01garbage-that-is-not-sip\r\n" + data)
    errors = [o for o in out if isinstance(o, ParseError)]
    assert errors
    assert [o for o in out if isinstance(o, SipMessage)] == expected


def test_framer_memory_is_bounded() -> None:
    framer = SipStreamFramer(max_message=4096)
    out = framer.feed(b"INVITE sip:x SIP/2.0\r\n" + b"X-Pad: " + b"a" * 70000)
    assert any(isinstance(o, ParseError) for o in out)
    assert len(framer._buf) <= 4096
