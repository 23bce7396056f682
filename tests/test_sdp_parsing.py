"""SDP (RFC 8866/4566, RFC 3264, RFC 3551) as the recorder reads it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callcap.capture.sdp import STATIC_PAYLOAD_TYPES, RtpMap, SessionDescription
from callcap.errors import ParseError


def sdp(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def test_audio_line_with_session_connection_and_dynamic_payloads() -> None:
    d = SessionDescription.parse(
        sdp(
            "v=0",
            "o=- 123 456 IN IP4 192.0.2.10",
            "s=-",
            "c=IN IP4 192.0.2.10",
            "t=0 0",
            "m=audio 49170 RTP/AVP 8 0 96 13",
            "a=rtpmap:96 telephone-event/8000",
            "a=fmtp:96 0-15",
            "a=ptime:20",
        )
    )
    (audio,) = d.audio()
    assert (audio.address, audio.port, audio.proto, audio.formats) == (
        "192.0.2.10",
        49170,
        "RTP/AVP",
        (8, 0, 96, 13),
    )
    assert audio.codec(96) == RtpMap("telephone-event", 8000)
    assert audio.codec(8) == STATIC_PAYLOAD_TYPES[8]
    assert audio.codec(13) == RtpMap("CN", 8000)
    assert audio.direction == "sendrecv" and not audio.on_hold and not audio.encrypted
    assert audio.ptime_ms == 20


def test_media_level_connection_overrides_session_and_ipv6_is_normalised() -> None:
    d = SessionDescription.parse(
        sdp(
            "v=0",
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 0",
            "c=IN IP6 2001:DB8:0:0::1",
            "m=video 5000 RTP/AVP 31",
        )
    )
    assert d.audio()[0].address == "2001:db8::1"
    assert d.media[1].address == "192.0.2.1"
    assert d.media[1].media == "video"


@pytest.mark.parametrize(
    ("lines", "hold"),
    [
        (("a=sendonly",), True),
        (("a=inactive",), True),
        (("a=recvonly",), False),
        (("c=IN IP4 0.0.0.0",), True),
    ],
)
def test_hold_forms(lines: tuple[str, ...], hold: bool) -> None:
    d = SessionDescription.parse(sdp("v=0", "c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", *lines))
    assert d.audio()[0].on_hold is hold


def test_session_level_direction_is_inherited_and_media_level_wins() -> None:
    d = SessionDescription.parse(
        sdp(
            "v=0",
            "a=sendonly",
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 0",
            "m=audio 4002 RTP/AVP 0",
            "a=sendrecv",
        )
    )
    assert [m.direction for m in d.audio()] == ["sendonly", "sendrecv"]


@pytest.mark.parametrize(
    ("proto", "attr", "encrypted"),
    [
        ("RTP/SAVP", None, True),
        ("UDP/TLS/RTP/SAVPF", None, True),
        (
            "RTP/AVP",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            True,
        ),
        ("RTP/AVP", None, False),
    ],
)
def test_srtp_is_recognised(proto: str, attr: str | None, encrypted: bool) -> None:
    lines = ["v=0", "c=IN IP4 192.0.2.1", f"m=audio 4000 {proto} 0"] + ([attr] if attr else [])
    assert SessionDescription.parse(sdp(*lines)).audio()[0].encrypted is encrypted


def test_port_zero_rtcp_attribute_and_opus_channels() -> None:
    d = SessionDescription.parse(
        sdp(
            "v=0",
            "c=IN IP4 192.0.2.1",
            "m=audio 0 RTP/AVP 0",
            "m=audio 4000 RTP/AVP 111",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp:4005 IN IP4 192.0.2.1",
        )
    )
    first, second = d.audio()
    assert first.port == 0
    assert second.codec(111) == RtpMap("opus", 48000, 2)
    assert second.rtcp_port == 4005


def test_not_sdp_is_rejected() -> None:
    with pytest.raises(ParseError) as err:
        SessionDescription.parse(b"hello")
    assert err.value.reason == "sdp_no_version"


def test_junk_lines_and_bad_media_lines_are_ignored() -> None:
    d = SessionDescription.parse(
        sdp(
            "v=0",
            "garbage",
            "c=IN IP4 192.0.2.1",
            "m=audio notaport RTP/AVP 0",
            "m=audio 4000 RTP/AVP 0 x 300",
        )
    )
    (audio,) = d.audio()
    assert audio.formats == (0,)


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_parse_error(raw: bytes) -> None:
    try:
        SessionDescription.parse(b"v=0\r\n" + raw)
        SessionDescription.parse(raw)
    except ParseError:
        pass
