"""Calls from SIP messages: a sans-IO tracker in the manner of h11 (messages in, events out).

A call is the INVITE dialog set of one Call-ID (RFC 3261 §12–§15): it starts with an
out-of-dialog INVITE, may fork into several early dialogs (one 18x To-tag each, §13.2.2.4),
is answered by the first 2xx, changes media with re-INVITE and UPDATE (RFC 3311) and ends
with BYE, CANCEL (§9) or a final failure.  Which party sent an in-dialog request is decided
by its From tag: the caller's requests carry the tag of the original INVITE's From.

Nothing here touches sockets or clocks: timestamps come in with each message, and timeouts
are evaluated by :meth:`CallTracker.expire` with the capture time the caller passes.  Odd
sequences (a BYE for an unknown call, a response without its request, a capture that starts
mid-call) are counted and ignored; nothing raises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from callcap.capture.sdp import SessionDescription
from callcap.capture.sip import NameAddr, SipMessage, dtmf_from_info, sdp_bodies
from callcap.errors import ParseError

Side = Literal["caller", "callee"]
Endpoint = tuple[str, int]

MAX_USER_AGENTS = 6
MAX_SEEN = 512
ENDED_MEMORY_S = 64.0


@dataclass(slots=True)
class Call:
    call_id: str
    from_: NameAddr
    to: NameAddr
    caller_ip: str
    callee_ip: str
    start: float
    answer: float | None = None
    end: float | None = None
    end_reason: str | None = None
    final_status: int | None = None
    user_agents: list[tuple[Side, str]] = field(default_factory=list)
    last_activity: float = 0.0
    transport: str = "udp"
    sip_messages: int = 0
    retransmissions: int = 0
    #: The initial INVITE's headers (lower-case names), bounded: what consent and retention
    #: rules match on (``header: {X-Jurisdiction: EU}``).
    invite_headers: tuple[tuple[str, str], ...] = ()
    # tracker state
    invite_cseq: int = 0
    cancel_at: float | None = None
    failed_at: float | None = None
    early_tags: list[str] = field(default_factory=list)
    seen: dict[tuple[object, ...], None] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def side_of_sender(self, msg: SipMessage, from_: NameAddr) -> Side:
        """Which party sent this request (for a response: sent the request it answers)."""
        if self.from_.tag is not None and from_.tag is not None:
            return "caller" if from_.tag == self.from_.tag else "callee"
        return "caller" if from_.uri == self.from_.uri else "callee"


@dataclass(frozen=True, slots=True)
class CallStarted:
    call: Call
    ts: float


@dataclass(frozen=True, slots=True)
class MediaOffered:
    call: Call
    side: Side
    sdp: SessionDescription
    ts: float
    early: bool
    to_tag: str | None


@dataclass(frozen=True, slots=True)
class CallAnswered:
    call: Call
    ts: float


@dataclass(frozen=True, slots=True)
class DtmfSignalled:
    call: Call
    side: Side
    digit: str
    duration_ms: int | None
    ts: float


@dataclass(frozen=True, slots=True)
class CallEnded:
    call: Call
    ts: float


Event = CallStarted | MediaOffered | CallAnswered | DtmfSignalled | CallEnded


#: Bounds of the INVITE header copy a call keeps: enough for any routing or jurisdiction
#: header, small enough that a hostile INVITE cannot make a call's state large.
MAX_INVITE_HEADERS = 64
MAX_INVITE_HEADER_VALUE = 512


def bounded_invite_headers(msg: SipMessage) -> tuple[tuple[str, str], ...]:
    """A bounded copy of an INVITE's headers (names are already canonical lower case)."""
    return tuple(
        (name, value[:MAX_INVITE_HEADER_VALUE]) for name, value in msg.headers[:MAX_INVITE_HEADERS]
    )


def _other(side: Side) -> Side:
    return "callee" if side == "caller" else "caller"


class CallTracker:
    """Follows every call's dialog state and reports what a recorder needs to know."""

    def __init__(
        self,
        *,
        inactivity_timeout_s: float = 300.0,
        failed_linger_s: float = 32.0,
        max_calls: int = 100_000,
        max_pending: int = 2_000,
        on_evict: Callable[[Call, str], None] | None = None,
    ) -> None:
        self.inactivity_timeout_s = inactivity_timeout_s
        self.failed_linger_s = failed_linger_s
        self.max_calls = max_calls
        #: INVITEs without progress from the far end (no 18x, no 2xx) tracked at once: a
        #: flood of never-answered INVITEs (a scanner, toll fraud, a broken peer) evicts its
        #: own oldest first, never a call that rings or was answered
        self.max_pending = max_pending
        #: told of each call ended to make room (the call, why: ``pending`` or ``calls``)
        self.on_evict = on_evict
        self.calls: dict[str, Call] = {}
        self._unanswered: dict[str, None] = {}  # Call-IDs without progress, oldest first
        self._ended: dict[str, Call] = {}
        self.counters: Counter[str] = Counter()

    def get(self, call_id: str) -> Call | None:
        return self.calls.get(call_id)

    def __len__(self) -> int:
        return len(self.calls)

    # -- input ------------------------------------------------------------------------------------

    def on_message(
        self, msg: SipMessage, ts: float, src: Endpoint, dst: Endpoint, transport: str = "udp"
    ) -> list[Event]:
        events: list[Event] = []
        try:
            call_id = msg.call_id
            from_ = msg.from_
            to = msg.to
            cseq, cseq_method = msg.cseq
        except ParseError as exc:
            self.counters[exc.reason] += 1
            return events
        call = self.calls.get(call_id)
        if call is None and not (msg.method == "INVITE" and to.tag is None):
            ended = self._ended.get(call_id)
            if ended is not None:
                # Late copies for a call that already ended (BYE retransmissions, 200 to BYE).
                key: tuple[object, ...] = (
                    (msg.method, cseq, from_.tag)
                    if msg.is_request
                    else (msg.status, cseq, cseq_method, to.tag, from_.tag)
                )
                if not self._seen(ended, key):
                    self.counters["after_end"] += 1
                return events
        if msg.is_request:
            self._request(
                msg, call, call_id, from_, to, cseq, cseq_method, ts, src, dst, transport, events
            )
        elif call is not None:
            self._response(msg, call, from_, to, cseq, cseq_method, ts, events)
        else:
            self.counters["response_without_call"] += 1
        return events

    def touch(self, call_id: str, ts: float) -> None:
        call = self.calls.get(call_id)
        if call is not None and ts > call.last_activity:
            call.last_activity = ts

    # -- requests ---------------------------------------------------------------------------------

    def _request(
        self,
        msg: SipMessage,
        call: Call | None,
        call_id: str,
        from_: NameAddr,
        to: NameAddr,
        cseq: int,
        cseq_method: str,
        ts: float,
        src: Endpoint,
        dst: Endpoint,
        transport: str,
        events: list[Event],
    ) -> None:
        method = (msg.method or "").upper()
        if method == "INVITE" and to.tag is None:
            if call is None:
                ended = self._ended.get(call_id)
                if ended is not None and ("INVITE", cseq, from_.tag) in ended.seen:
                    self.counters["retransmissions"] += 1
                    return
                call = self._new_call(
                    msg, call_id, from_, to, cseq, ts, src, dst, transport, events
                )
            elif self._seen(call, ("INVITE", cseq, from_.tag)):
                return
            else:
                # A new initial INVITE in the same Call-ID: the retry after a 401/407
                # challenge or a 3xx redirect (RFC 3261 §22.2, §8.1.3.4).
                call.invite_cseq = cseq
                call.failed_at = None
                call.final_status = None
                call.invite_headers = bounded_invite_headers(msg)
            call.last_activity = max(call.last_activity, ts)
            self._user_agent(call, "caller", msg)
            self._offers(call, "caller", msg, ts, events, early=False, to_tag=None)
            return
        if call is None:
            self.counters["in_dialog_without_invite"] += 1
            return
        call.sip_messages += 1
        call.last_activity = max(call.last_activity, ts)
        if self._seen(call, (method, cseq, from_.tag)):
            return
        side = call.side_of_sender(msg, from_)
        self._user_agent(call, side, msg)
        if method in ("INVITE", "UPDATE", "ACK", "PRACK"):
            self._offers(call, side, msg, ts, events, early=call.answer is None, to_tag=to.tag)
        elif method == "CANCEL":
            if call.answer is None and call.cancel_at is None:
                call.cancel_at = ts
        elif method == "BYE":
            if not call.ended:
                self._finish(call, f"bye_{side}", ts, events)
        elif method == "INFO":
            dtmf = dtmf_from_info(msg)
            if dtmf is not None:
                events.append(DtmfSignalled(call, side, dtmf[0], dtmf[1], ts))

    def _new_call(
        self,
        msg: SipMessage,
        call_id: str,
        from_: NameAddr,
        to: NameAddr,
        cseq: int,
        ts: float,
        src: Endpoint,
        dst: Endpoint,
        transport: str,
        events: list[Event],
    ) -> Call:
        if len(self._unanswered) >= self.max_pending:
            oldest = self.calls[next(iter(self._unanswered))]
            self.counters["pending_evicted"] += 1
            self._evict(oldest, "pending", events)
        if len(self.calls) >= self.max_calls:
            victim = min(self.calls.values(), key=lambda c: c.last_activity)
            self.counters["calls_evicted"] += 1
            self._evict(victim, "calls", events)
        self._ended.pop(call_id, None)
        call = Call(
            call_id=call_id,
            from_=from_,
            to=to,
            caller_ip=src[0],
            callee_ip=dst[0],
            start=ts,
            last_activity=ts,
            transport=transport,
            invite_cseq=cseq,
            invite_headers=bounded_invite_headers(msg),
        )
        call.sip_messages = 1
        call.seen[("INVITE", cseq, from_.tag)] = None
        self.calls[call_id] = call
        self._unanswered[call_id] = None
        events.append(CallStarted(call, ts))
        return call

    # -- responses ---------------------------------------------------------------------------------

    def _response(
        self,
        msg: SipMessage,
        call: Call,
        from_: NameAddr,
        to: NameAddr,
        cseq: int,
        cseq_method: str,
        ts: float,
        events: list[Event],
    ) -> None:
        status = msg.status or 0
        call.sip_messages += 1
        call.last_activity = max(call.last_activity, ts)
        if self._seen(call, (status, cseq, cseq_method, to.tag, from_.tag)):
            return
        requester = call.side_of_sender(msg, from_)
        responder = _other(requester)
        self._user_agent(call, responder, msg)
        if cseq_method != "INVITE" or cseq != call.invite_cseq or call.answer is not None:
            # re-INVITE / UPDATE / PRACK answers carry the responder's media; 2xx to a
            # forked INVITE after the call was answered by another branch only counts.
            if cseq_method in ("INVITE", "UPDATE", "PRACK") and 100 < status < 300:
                late_fork = (
                    cseq_method == "INVITE"
                    and cseq == call.invite_cseq
                    and status >= 200
                    and call.to.tag is not None
                    and to.tag != call.to.tag
                )
                if late_fork:
                    self.counters["late_fork_answers"] += 1
                    return
                self._offers(
                    call, responder, msg, ts, events, early=call.answer is None, to_tag=to.tag
                )
            return
        if call.ended:
            self.counters["response_after_end"] += 1
            return
        if status < 200:
            if to.tag is not None and to.tag not in call.early_tags:
                call.early_tags.append(to.tag)
            if status > 100:
                # The far end answered with progress (100 Trying is the next hop's alone):
                # a real call, out of the reach of a flood of unanswered INVITEs.
                self._unanswered.pop(call.call_id, None)
                self._offers(call, "callee", msg, ts, events, early=True, to_tag=to.tag)
            return
        if status < 300:
            call.answer = ts
            self._unanswered.pop(call.call_id, None)
            call.final_status = status
            # The INVITE's To URI stays (proxies may rewrite it in responses); the 2xx
            # contributes the winning branch's tag.
            call.to = NameAddr(call.to.uri, call.to.display_name, call.to.user, to.tag)
            call.failed_at = None
            call.cancel_at = None  # a 2xx racing the CANCEL wins (RFC 3261 §9.1)
            events.append(CallAnswered(call, ts))
            self._offers(call, "callee", msg, ts, events, early=False, to_tag=to.tag)
            return
        call.final_status = status
        call.failed_at = ts
        if status == 487 and call.cancel_at is not None:
            self._finish(call, "cancel", ts, events)

    # -- helpers ----------------------------------------------------------------------------------

    def _seen(self, call: Call, key: tuple[object, ...]) -> bool:
        """Retransmissions (and the second copy of a message seen at a proxy) count once."""
        if key in call.seen:
            call.retransmissions += 1
            self.counters["retransmissions"] += 1
            return True
        if len(call.seen) >= MAX_SEEN:
            del call.seen[next(iter(call.seen))]
        call.seen[key] = None
        return False

    def _offers(
        self,
        call: Call,
        side: Side,
        msg: SipMessage,
        ts: float,
        events: list[Event],
        *,
        early: bool,
        to_tag: str | None,
    ) -> None:
        for body in sdp_bodies(msg):
            try:
                sdp = SessionDescription.parse(body)
            except ParseError as exc:
                self.counters[exc.reason] += 1
                continue
            events.append(MediaOffered(call, side, sdp, ts, early, to_tag))

    def _user_agent(self, call: Call, side: Side, msg: SipMessage) -> None:
        value = msg.user_agent
        if (
            value
            and len(call.user_agents) < MAX_USER_AGENTS
            and (side, value) not in call.user_agents
        ):
            call.user_agents.append((side, value))

    def _finish(
        self, call: Call, reason: str, end: float, events: list[Event], now: float | None = None
    ) -> None:
        call.end = end
        call.end_reason = reason
        self.calls.pop(call.call_id, None)
        self._unanswered.pop(call.call_id, None)
        self._ended[call.call_id] = call
        events.append(CallEnded(call, end if now is None else now))

    def _evict(self, call: Call, why: str, events: list[Event]) -> None:
        """End ``call`` to make room.  It is not remembered as ended either: a flood must
        not fill that memory instead (a late message of it is then one without a call)."""
        self._finish(call, "timeout", call.last_activity, events)
        self._ended.pop(call.call_id, None)
        if self.on_evict is not None:
            self.on_evict(call, why)

    def _failed_reason(self, call: Call) -> str | None:
        """``cancel`` for 487 or a CANCEL left unanswered; the final failure code otherwise.

        A CANCELled INVITE normally ends with 487 (RFC 3261 §9.2), but the final response
        can race it (a 408 or 486 already on its way): the response on the wire is what
        happened, so it wins.
        """
        if call.answer is not None:
            return None
        status = call.final_status
        if status is not None and status >= 300 and status != 487:
            return f"rejected_{status}"
        if call.cancel_at is not None or status == 487:
            return "cancel"
        return None

    # -- time --------------------------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """End calls whose failure became final or that went quiet for too long."""
        events: list[Event] = []
        linger = self.failed_linger_s
        idle = self.inactivity_timeout_s
        for call in list(self.calls.values()):
            pending = call.failed_at if call.failed_at is not None else call.cancel_at
            if pending is not None and call.answer is None and now - pending >= linger:
                reason = self._failed_reason(call) or "timeout"
                self._finish(call, reason, pending, events, now)
            elif now - call.last_activity >= idle:
                self._finish(call, "timeout", call.last_activity, events, now)
        if self._ended:
            for call_id, call in list(self._ended.items()):
                if call.end is not None and now - call.end > ENDED_MEMORY_S:
                    del self._ended[call_id]
        return events

    def close_all(self, reason: str, ts: float) -> list[Event]:
        """The capture ended (``capture_end``) or the daemon stops (``shutdown``)."""
        events: list[Event] = []
        for call in list(self.calls.values()):
            failed = self._failed_reason(call)
            if failed is not None:
                pending = call.failed_at if call.failed_at is not None else call.cancel_at
                self._finish(call, failed, pending if pending is not None else ts, events, ts)
            else:
                self._finish(call, reason, max(ts, call.start), events, ts)
        return events
