"""The call tracker: SIP message sequences in, call events out (RFC 3261, 3264, 3311)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import scapy.layers.l2
import scapy.layers.ppp  # noqa: F401  (DTMFsipinfo.pcap runs over PPPoE)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapNgReader, PcapReader

from callcap.capture.dialog import (
    CallAnswered,
    CallEnded,
    CallStarted,
    CallTracker,
    DtmfSignalled,
    Event,
    MediaOffered,
)
from callcap.capture.sip import SipMessage
from callcap.errors import ParseError

CALLER = ("10.0.0.1", 5060)
PROXY = ("10.0.0.2", 5060)


def sdp(addr: str, port: int, direction: str = "sendrecv") -> str:
    return f"v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na={direction}\r\n"


def msg(
    start: str,
    cseq: str,
    *,
    from_tag: str = "ft",
    to_tag: str | None = None,
    body: str = "",
    ctype: str = "application/sdp",
    call_id: str = "call-1",
    extra: str = "",
) -> SipMessage:
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    frm = "<sip:alice@example.com>" if from_tag in ("ft", None) else "<sip:bob@example.com>"
    if from_tag not in ("ft", None):
        to = "<sip:alice@example.com>;tag=ft"
        frm = f"<sip:bob@example.com>;tag={from_tag}"
    else:
        frm += ";tag=ft"
    raw = (
        f"{start}\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK{cseq.replace(' ', '')}\r\nFrom: {frm}\r\nTo: {to}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\n{extra}"
        + (f"Content-Type: {ctype}\r\n" if body else "")
        + f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )
    return SipMessage.parse(raw.encode())


def run(tracker: CallTracker, steps: list[tuple[float, SipMessage]]) -> list[Event]:
    events: list[Event] = []
    for ts, m in steps:
        events += tracker.on_message(m, ts, CALLER, PROXY)
    return events


def kinds(events: list[Event]) -> list[str]:
    out = []
    for e in events:
        name = type(e).__name__
        if isinstance(e, MediaOffered):
            name += f"({e.side}{',early' if e.early else ''})"
        if isinstance(e, CallEnded):
            name += f"({e.call.end_reason})"
        out.append(name)
    return out


INVITE = "INVITE sip:bob@example.com SIP/2.0"


def basic_call(bye_from_callee: bool = False) -> list[tuple[float, SipMessage]]:
    bye = (
        msg("BYE sip:alice@10.0.0.1 SIP/2.0", "1 BYE", from_tag="tt")
        if bye_from_callee
        else msg("BYE sip:bob@10.0.0.3 SIP/2.0", "2 BYE", to_tag="tt")
    )
    return [
        (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
        (0.1, msg("SIP/2.0 100 Trying", "1 INVITE")),
        (0.5, msg("SIP/2.0 180 Ringing", "1 INVITE", to_tag="tt")),
        (2.0, msg("SIP/2.0 200 OK", "1 INVITE", to_tag="tt", body=sdp("10.0.0.3", 5000))),
        (2.1, msg("ACK sip:bob@10.0.0.3 SIP/2.0", "1 ACK", to_tag="tt")),
        (9.0, bye),
        (9.1, msg("SIP/2.0 200 OK", bye.header("cseq") or "", to_tag="tt")),
    ]


def test_basic_call_events_and_times() -> None:
    t = CallTracker()
    events = run(t, basic_call())
    assert kinds(events) == [
        "CallStarted",
        "MediaOffered(caller)",
        "CallAnswered",
        "MediaOffered(callee)",
        "CallEnded(bye_caller)",
    ]
    call = events[0].call
    assert (call.start, call.answer, call.end, call.final_status) == (0.0, 2.0, 9.0, 200)
    assert call.to.tag == "tt" and call.from_.tag == "ft"
    assert (call.caller_ip, call.callee_ip) == ("10.0.0.1", "10.0.0.2")
    assert len(t) == 0


def test_bye_from_callee() -> None:
    events = run(CallTracker(), basic_call(bye_from_callee=True))
    assert kinds(events)[-1] == "CallEnded(bye_callee)"


def test_retransmissions_are_counted_once() -> None:
    steps = basic_call()
    doubled = [s for step in steps for s in (step, (step[0] + 0.5, step[1]))]
    t = CallTracker()
    events = run(t, doubled)
    assert kinds(events) == kinds(run(CallTracker(), steps))
    assert t.counters["retransmissions"] == len(steps)


def test_forking_two_early_dialogs_and_the_winner() -> None:
    steps = [
        (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
        (
            0.5,
            msg("SIP/2.0 183 Session Progress", "1 INVITE", to_tag="a", body=sdp("10.0.0.5", 6000)),
        ),
        (
            0.6,
            msg("SIP/2.0 183 Session Progress", "1 INVITE", to_tag="b", body=sdp("10.0.0.6", 7000)),
        ),
        (3.0, msg("SIP/2.0 200 OK", "1 INVITE", to_tag="b", body=sdp("10.0.0.6", 7000))),
        (3.1, msg("SIP/2.0 200 OK", "1 INVITE", to_tag="a", body=sdp("10.0.0.5", 6000))),
    ]
    t = CallTracker()
    events = run(t, steps)
    offers = [e for e in events if isinstance(e, MediaOffered)]
    assert [(o.side, o.early, o.to_tag) for o in offers] == [
        ("caller", False, None),
        ("callee", True, "a"),
        ("callee", True, "b"),
        ("callee", False, "b"),
    ]
    assert events[0].call.to.tag == "b"
    assert t.counters["late_fork_answers"] == 1
    assert sum(isinstance(e, CallAnswered) for e in events) == 1


def test_late_offer_answer_comes_in_the_ack() -> None:
    steps = [
        (0.0, msg(INVITE, "1 INVITE")),
        (1.0, msg("SIP/2.0 200 OK", "1 INVITE", to_tag="tt", body=sdp("10.0.0.3", 5000))),
        (
            1.1,
            msg("ACK sip:bob@10.0.0.3 SIP/2.0", "1 ACK", to_tag="tt", body=sdp("10.0.0.1", 4000)),
        ),
    ]
    events = run(CallTracker(), steps)
    assert kinds(events) == [
        "CallStarted",
        "CallAnswered",
        "MediaOffered(callee)",
        "MediaOffered(caller)",
    ]


def test_cancel_then_487_ends_as_cancel() -> None:
    steps = [
        (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
        (0.5, msg("SIP/2.0 180 Ringing", "1 INVITE", to_tag="tt")),
        (4.0, msg("CANCEL sip:bob@example.com SIP/2.0", "1 CANCEL")),
        (4.1, msg("SIP/2.0 200 OK", "1 CANCEL", to_tag="tt")),
        (4.2, msg("SIP/2.0 487 Request Terminated", "1 INVITE", to_tag="tt")),
    ]
    events = run(CallTracker(), steps)
    assert kinds(events)[-1] == "CallEnded(cancel)"
    assert events[-1].call.end == 4.2 and events[-1].call.answer is None


def test_200_racing_the_cancel_wins() -> None:
    steps = [
        (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
        (4.0, msg("CANCEL sip:bob@example.com SIP/2.0", "1 CANCEL")),
        (4.01, msg("SIP/2.0 200 OK", "1 INVITE", to_tag="tt", body=sdp("10.0.0.3", 5000))),
    ]
    t = CallTracker()
    events = run(t, steps)
    assert "CallAnswered" in kinds(events)
    assert t.expire(100.0) == []  # not ended by the linger of the cancel
    assert kinds(t.close_all("capture_end", 101.0)) == ["CallEnded(capture_end)"]


def test_auth_challenge_then_new_invite_is_the_same_call() -> None:
    steps = [
        (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
        (0.1, msg("SIP/2.0 407 Proxy Authentication Required", "1 INVITE", to_tag="x")),
        (0.2, msg("ACK sip:bob@example.com SIP/2.0", "1 ACK", to_tag="x")),
        (
            0.3,
            msg(
                INVITE,
                "2 INVITE",
                body=sdp("10.0.0.1", 4000),
                extra="Proxy-Authorization: Digest x\r\n",
            ),
        ),
        (2.0, msg("SIP/2.0 200 OK", "2 INVITE", to_tag="tt", body=sdp("10.0.0.3", 5000))),
    ]
    t = CallTracker()
    events = run(t, steps)
    assert kinds(events).count("CallStarted") == 1
    assert "CallAnswered" in kinds(events)
    call = events[0].call
    assert (call.start, call.answer, call.final_status) == (0.0, 2.0, 200)
    assert t.expire(60.0) == []


def test_rejection_ends_after_the_linger_with_the_final_code() -> None:
    t = CallTracker(failed_linger_s=32.0)
    run(
        t,
        [
            (0.0, msg(INVITE, "1 INVITE", body=sdp("10.0.0.1", 4000))),
            (1.0, msg("SIP/2.0 486 Busy Here", "1 INVITE", to_tag="x")),
        ],
    )
    assert t.expire(10.0) == []
    (ended,) = t.expire(33.0)
    assert isinstance(ended, CallEnded)
    assert (ended.call.end_reason, ended.call.end, ended.call.final_status) == (
        "rejected_486",
        1.0,
        486,
    )


def test_unanswered_challenge_at_capture_end_is_rejected_not_capture_end() -> None:
    t = CallTracker()
    run(
        t,
        [
            (0.0, msg(INVITE, "1 INVITE")),
            (0.1, msg("SIP/2.0 401 Unauthorized", "1 INVITE", to_tag="x")),
        ],
    )
    (ended,) = t.close_all("capture_end", 5.0)
    assert ended.call.end_reason == "rejected_401"


def test_reinvite_hold_and_update_from_callee_are_attributed_by_from_tag() -> None:
    steps = [
        *basic_call()[:5],
        (
            5.0,
            msg(
                "INVITE sip:bob@10.0.0.3 SIP/2.0",
                "2 INVITE",
                to_tag="tt",
                body=sdp("10.0.0.1", 4000, "sendonly"),
            ),
        ),
        (
            5.1,
            msg("SIP/2.0 200 OK", "2 INVITE", to_tag="tt", body=sdp("10.0.0.3", 5000, "recvonly")),
        ),
        (
            6.0,
            msg(
                "UPDATE sip:alice@10.0.0.1 SIP/2.0",
                "7 UPDATE",
                from_tag="tt",
                body=sdp("10.0.0.9", 5002),
            ),
        ),
        (6.1, msg("SIP/2.0 200 OK", "7 UPDATE", from_tag="tt", body=sdp("10.0.0.1", 4000))),
    ]
    events = run(CallTracker(), steps)
    offers = [
        (e.side, e.sdp.audio()[0].address, e.sdp.audio()[0].direction)
        for e in events
        if isinstance(e, MediaOffered)
    ]
    assert offers[2:] == [
        ("caller", "10.0.0.1", "sendonly"),
        ("callee", "10.0.0.3", "recvonly"),
        ("callee", "10.0.0.9", "sendrecv"),
        ("caller", "10.0.0.1", "sendrecv"),
    ]


def test_sip_info_dtmf_is_reported_with_its_side() -> None:
    steps = [
        *basic_call()[:5],
        (
            3.0,
            msg(
                "INFO sip:bob@10.0.0.3 SIP/2.0",
                "2 INFO",
                to_tag="tt",
                body="Signal=9\r\nDuration=100\r\n",
                ctype="application/dtmf-relay",
            ),
        ),
    ]
    events = run(CallTracker(), steps)
    (dtmf,) = [e for e in events if isinstance(e, DtmfSignalled)]
    assert (dtmf.side, dtmf.digit, dtmf.duration_ms, dtmf.ts) == ("caller", "9", 100, 3.0)


def test_inactivity_timeout_ends_at_last_activity_and_touch_keeps_alive() -> None:
    t = CallTracker(inactivity_timeout_s=60.0)
    run(t, basic_call()[:5])
    t.touch("call-1", 50.0)
    assert t.expire(100.0) == []
    (ended,) = t.expire(111.0)
    assert (ended.call.end_reason, ended.call.end) == ("timeout", 50.0)


def test_mid_call_capture_invents_no_call() -> None:
    t = CallTracker()
    events = run(t, basic_call()[4:])
    assert events == []
    assert t.counters["in_dialog_without_invite"] >= 1


def test_call_limit_evicts_the_quietest_call() -> None:
    t = CallTracker(max_calls=2)
    for i in range(3):
        t.on_message(msg(INVITE, "1 INVITE", call_id=f"c{i}"), float(i), CALLER, PROXY)
    assert len(t) == 2
    assert t.get("c0") is None
    assert t.counters["calls_evicted"] == 1


# -- real captures ----------------------------------------------------------------------------------


def _udp_sip(path: Path) -> Iterator[tuple[float, SipMessage, tuple[str, int], tuple[str, int]]]:
    reader: Any = PcapNgReader(str(path)) if path.suffix == ".pcapng" else PcapReader(str(path))
    with reader:
        for pkt in reader:
            if not pkt.haslayer(UDP):
                continue
            ip = pkt.getlayer("IP") or pkt.getlayer(IPv6)
            udp = pkt[UDP]
            data = bytes(udp.payload)
            try:
                yield (
                    float(pkt.time),
                    SipMessage.parse(data),
                    (ip.src, udp.sport),
                    (ip.dst, udp.dport),
                )
            except ParseError:
                continue


def test_corpus_calls_match_tshark(corpus: Path, corpus_facts: dict[str, Any]) -> None:
    for name in [
        "aaa.pcap",
        "SIP_DTMF2.pcap",
        "sip-rtp-g711.pcap",
        "sip-proxy.pcap",
        "SIP-RTP-Normal_Call_two_parties.pcap",
        "sip-routing-error.pcapng",
        "sip_ipv6_udp.pcap",
        "DTMFsipinfo.pcap",
    ]:
        t = CallTracker()
        events: list[Event] = []
        last = 0.0
        for ts, m, src, dst in _udp_sip(corpus / name):
            events += t.on_message(m, ts, src, dst)
            last = ts
        events += t.close_all("capture_end", last)
        ended = {e.call.call_id: e.call for e in events if isinstance(e, CallEnded)}
        started = [e.call.call_id for e in events if isinstance(e, CallStarted)]
        facts = corpus_facts[name]["calls"]
        assert sorted(started) == sorted(c["call_id"] for c in facts), name
        for fact in facts:
            call = ended[fact["call_id"]]
            result = fact["setup_result"]
            if result.startswith("answered"):
                assert (
                    call.answer is not None and abs(call.answer - _epoch(fact["answered"])) < 1e-5
                ), name
            elif result.startswith("failed"):
                assert call.end_reason == f"rejected_{result.split()[1]}", (name, call.end_reason)
            if fact["bye"]:
                assert call.end_reason in ("bye_caller", "bye_callee")
                assert abs((call.end or 0) - _epoch(fact["end"])) < 1e-5
            assert call.from_.uri == fact["from"]


def test_sip_info_digits_in_corpus(corpus: Path) -> None:
    t = CallTracker()
    digits = []
    for ts, m, src, dst in _udp_sip(corpus / "DTMFsipinfo.pcap"):
        digits += [e.digit for e in t.on_message(m, ts, src, dst) if isinstance(e, DtmfSignalled)]
    assert digits == ["1", "3", "4", "2"]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
