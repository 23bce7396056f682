"""A call keeps a bounded copy of its initial INVITE's headers for rules to match on."""

from __future__ import annotations

from callcap.capture.dialog import (
    MAX_INVITE_HEADER_VALUE,
    MAX_INVITE_HEADERS,
    CallStarted,
    CallTracker,
)
from callcap.capture.sip import SipMessage

CALLER = ("10.0.0.1", 5060)
PROXY = ("10.0.0.2", 5060)


def invite(extra: str, cseq: int = 1) -> SipMessage:
    raw = (
        "INVITE sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK{cseq}\r\n"
        "From: <sip:alice@example.com>;tag=ft\r\nTo: <sip:bob@example.com>\r\n"
        f"Call-ID: hdr-1\r\nCSeq: {cseq} INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    return SipMessage.parse(raw.encode())


def test_invite_headers_are_kept_with_canonical_names() -> None:
    tracker = CallTracker()
    (event,) = tracker.on_message(
        invite("X-Jurisdiction: EU\r\nx-jurisdiction: DE\r\n"),
        1.0,
        CALLER,
        PROXY,
    )
    assert isinstance(event, CallStarted)
    headers = event.call.invite_headers
    assert ("x-jurisdiction", "EU") in headers
    assert ("x-jurisdiction", "DE") in headers
    assert ("from", "<sip:alice@example.com>;tag=ft") in headers
    assert all(name == name.lower() for name, _ in headers)


def test_the_copy_is_bounded_in_count_and_length() -> None:
    many = "".join(f"X-H{i}: {'v' * (600 if i == 3 else 10)}\r\n" for i in range(80))
    tracker = CallTracker()
    (event,) = tracker.on_message(invite(many), 1.0, CALLER, PROXY)
    headers = event.call.invite_headers
    assert len(headers) == MAX_INVITE_HEADERS
    assert max(len(value) for _, value in headers) == MAX_INVITE_HEADER_VALUE


def test_a_retried_invite_replaces_the_headers() -> None:
    tracker = CallTracker()
    (event,) = tracker.on_message(invite("X-Try: 1\r\n"), 1.0, CALLER, PROXY)
    tracker.on_message(invite("X-Try: 2\r\n", cseq=2), 2.0, CALLER, PROXY)
    assert ("x-try", "2") in event.call.invite_headers
    assert ("x-try", "1") not in event.call.invite_headers
