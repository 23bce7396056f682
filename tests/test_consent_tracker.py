"""The consent state machine on plain numbers: the first evidence inside the window decides,
once; nothing outside it counts; the deadline passing decides ``missing`` with ``on_missing``.

Properties are checked against an oracle written as a plain loop over the same events.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from callcap.config.loader import load_config_text
from callcap.config.rules import CallFacts
from callcap.consent import ConsentTracker

ANSWER = 1000.0
WITHIN = 10.0

CONFIG = load_config_text(
    "consent:\n"
    "  rules:\n"
    "    - name: r\n"
    "      mode: all_party\n"
    "      evidence: [dtmf, sip_header]\n"
    '      dtmf_digit: "1"\n'
    '      optout_digit: "2"\n'
    f"      within_s: {WITHIN}\n"
    '      sip_header: {name: X-Consent, value: "yes"}\n'
).consent


def facts(headers: tuple[tuple[str, str], ...] = ()) -> CallFacts:
    return CallFacts("sip:a@h", "a", "sip:b@h", "b", "10.0.0.1", "10.0.0.2", headers)


# (kind, digit or header value, side, seconds after the answer)
evidence_events = st.lists(
    st.tuples(
        st.sampled_from(["dtmf", "inband", "header"]),
        st.sampled_from(["1", "2", "5", "yes", "no"]),
        st.sampled_from(["caller", "callee"]),
        st.floats(min_value=-5, max_value=2 * WITHIN, allow_nan=False).map(lambda x: round(x, 3)),
    ),
    max_size=12,
)


def oracle(events: list[tuple[str, str, str, float]]) -> tuple[str, str | None, float | None]:
    for kind, value, side, at in events:
        if not 0 <= at <= WITHIN:
            continue
        if kind == "dtmf" and side == "caller" and value in ("1", "2"):
            return ("granted" if value == "1" else "refused", value, at)
        if kind == "header" and value == "yes":
            return ("granted", None, at)
    return ("missing", None, None)


@settings(max_examples=300, deadline=None)
@given(evidence_events)
def test_the_first_evidence_in_the_window_decides_once(
    events: list[tuple[str, str, str, float]],
) -> None:
    tracker = ConsentTracker(CONFIG, facts())
    assert tracker.answered(ANSWER) is None
    first = None
    for kind, value, side, at in events:
        ts = ANSWER + at
        if kind == "header":
            got = tracker.header((("x-consent", value),), side, ts)
        else:
            got = tracker.key(value, side, kind == "inband", ts)
        if got is not None:
            assert first is None, "decided twice"
            first = got
    decision = tracker.finish()
    assert first is None or decision is first
    status, digit, at = oracle(events)
    assert decision.status == status
    if status == "missing":
        assert decision.evidence is None and decision.action == "discarded"
    else:
        assert decision.evidence is not None
        assert (decision.evidence.digit, decision.evidence.at_s) == (digit, at)
        assert decision.action == ("kept" if status == "granted" else "discarded")


def test_the_deadline_passing_is_missing_and_an_invite_header_grants_at_the_answer() -> None:
    tracker = ConsentTracker(CONFIG, facts())
    assert tracker.settle(ANSWER + 100) is None  # not answered: no window yet
    tracker.answered(ANSWER)
    assert tracker.settle(ANSWER + WITHIN) is None  # the deadline itself still counts
    decision = tracker.settle(ANSWER + WITHIN + 0.001)
    assert decision is not None and decision.status == "missing"
    assert tracker.key("1", "caller", False, ANSWER + 1) is None  # decided for good

    tracker = ConsentTracker(CONFIG, facts((("x-consent", " yes "),)))
    decision = tracker.answered(ANSWER)
    assert decision is not None and decision.status == "granted"
    assert decision.sidecar()["evidence"] == {
        "method": "sip_header",
        "digit": None,
        "side": "caller",
        "at_s": 0.0,
    }


def test_one_party_and_an_all_party_default_are_decided_at_once() -> None:
    one = ConsentTracker(load_config_text("").consent, facts())
    assert one.decision is not None and one.decision.sidecar() == {
        "mode": "one_party",
        "rule": None,
        "status": "not_required",
        "evidence": None,
        "action": "kept",
    }
    assert not one.listens_inband
    default = ConsentTracker(
        load_config_text("consent: {default: {mode: all_party}}\n").consent, facts()
    )
    assert default.decision is not None
    assert (default.decision.status, default.decision.action) == ("missing", "flagged")
