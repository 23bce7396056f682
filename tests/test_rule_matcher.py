"""The rule matcher: first match wins, empty conditions match anything, CIDR agrees with ipaddress.

Property tests generate calls and rules; each property is stated against an independent
oracle (Python's ``ipaddress`` for trunks, a plain loop for "first match") rather than
against the matcher's own helpers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from callcap.config.rules import CallFacts, first_match, glob_match, matches
from callcap.config.schema import ConsentMatch, Network, RetentionMatch

STATUSES = ("not_required", "granted", "refused", "missing")

numbers = st.text(alphabet="+0123456789", min_size=1, max_size=12)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=20
)


@st.composite
def facts(draw: st.DrawFn) -> CallFacts:
    caller = draw(numbers)
    callee = draw(numbers)
    ips = draw(st.sampled_from([ipv4, ipv6]))
    return CallFacts(
        caller_uri=f"sip:{caller}@{draw(ipv4)}",
        caller_user=caller,
        callee_uri=f"sip:{callee}@pbx.example",
        callee_user=callee,
        caller_ip=draw(ips),
        callee_ip=draw(ips),
        headers=tuple(
            draw(st.lists(st.tuples(st.sampled_from(["x-a", "x-b"]), header_values), max_size=3))
        ),
        consent_status=draw(st.none() | st.sampled_from(STATUSES)),
    )


@st.composite
def networks(draw: st.DrawFn) -> Network:
    if draw(st.booleans()):
        addr = draw(st.ip_addresses(v=4))
        prefix = draw(st.integers(0, 32))
    else:
        addr = draw(st.ip_addresses(v=6))
        prefix = draw(st.integers(0, 128))
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    return Network.parse(str(net))


globs = st.text(alphabet="+0123456789*?", min_size=1, max_size=6)


@st.composite
def retention_matches(draw: st.DrawFn) -> RetentionMatch:
    return RetentionMatch(
        caller=tuple(draw(st.lists(globs, max_size=2))),
        callee=tuple(draw(st.lists(globs, max_size=2))),
        trunk=tuple(draw(st.lists(networks(), max_size=2))),
        header=draw(st.dictionaries(st.sampled_from(["X-A", "x-b"]), globs, max_size=1)),
        consent_status=tuple(draw(st.lists(st.sampled_from(STATUSES), max_size=2))),
    )


@dataclass(frozen=True)
class Rule:
    name: str
    match: ConsentMatch


@given(facts())
def test_a_rule_with_empty_conditions_matches_every_call(f: CallFacts) -> None:
    assert matches(ConsentMatch(), f)
    assert matches(RetentionMatch(), f)
    catch_all = ConsentMatch(caller=("*",), callee=("*",))
    assert matches(catch_all, f)


@given(st.lists(retention_matches(), max_size=6), facts())
def test_the_first_matching_rule_wins(match_list: list[RetentionMatch], f: CallFacts) -> None:
    rules = [Rule(f"r{i}", m) for i, m in enumerate(match_list)]
    oracle = next((r for r in rules if matches(r.match, f)), None)
    assert first_match(rules, f) is oracle
    # everything before the winner was tried and did not match
    if oracle is not None:
        assert not any(matches(r.match, f) for r in rules[: rules.index(oracle)])


@given(retention_matches(), retention_matches(), facts())
def test_order_matters_when_two_rules_match(
    a: RetentionMatch, b: RetentionMatch, f: CallFacts
) -> None:
    ra, rb = Rule("a", a), Rule("b", b)
    if matches(a, f) and matches(b, f):
        assert first_match([ra, rb], f) is ra
        assert first_match([rb, ra], f) is rb
    elif not matches(a, f) and not matches(b, f):
        assert first_match([ra, rb], f) is None


@given(st.lists(networks(), min_size=1, max_size=3), facts())
def test_trunk_membership_agrees_with_ipaddress(nets: list[Network], f: CallFacts) -> None:
    expected = any(
        ipaddress.ip_address(ip) in n.network
        for n in nets
        for ip in (f.caller_ip, f.callee_ip)
        if ipaddress.ip_address(ip).version == n.network.version
    )
    assert matches(ConsentMatch(trunk=tuple(nets)), f) is expected


@given(facts())
def test_trunk_holds_for_either_signalling_peer(f: CallFacts) -> None:
    caller_net = Network.parse(str(ipaddress.ip_network(f.caller_ip)))
    callee_net = Network.parse(str(ipaddress.ip_network(f.callee_ip)))
    assert matches(ConsentMatch(trunk=(caller_net,)), f)
    assert matches(ConsentMatch(trunk=(callee_net,)), f)


@given(
    st.text(alphabet="ab*?[].+", max_size=8),
    st.text(alphabet="ab[].+", max_size=8),
)
def test_globs_treat_only_star_and_question_mark_as_wildcards(pattern: str, text: str) -> None:
    oracle = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    assert glob_match(pattern, text) is (re.fullmatch(oracle, text, re.DOTALL) is not None)


@given(numbers, numbers)
def test_a_literal_number_matches_only_itself(a: str, b: str) -> None:
    assert glob_match(a, b) is (a == b)


@settings(max_examples=50)
@given(facts(), st.sampled_from(STATUSES))
def test_consent_status_condition_needs_a_decided_listed_status(f: CallFacts, status: str) -> None:
    rule = RetentionMatch(consent_status=(status,))
    assert matches(rule, f) is (f.consent_status == status)


def _call(caller: str, uri: str, headers: tuple[tuple[str, str], ...] = ()) -> CallFacts:
    return CallFacts(uri, caller, "sip:bob@pbx", "bob", "10.1.2.3", "192.0.2.9", headers)


def test_caller_glob_tries_the_user_part_and_the_whole_uri() -> None:
    f = _call("+4930123", "sip:+4930123@10.1.2.3;user=phone")
    assert matches(ConsentMatch(caller=("+49*",)), f)
    assert matches(ConsentMatch(caller=("sip:+49*@10.1.*",)), f)
    assert not matches(ConsentMatch(caller=("+33*", "49*")), f)
    assert matches(ConsentMatch(caller=("+33*", "+49*")), f)
    assert not matches(ConsentMatch(callee=("+1800*",)), f)


def test_header_names_are_case_insensitive_and_values_are_globs() -> None:
    f = _call("a", "sip:a@h", (("x-jurisdiction", "US"), ("x-jurisdiction", "EU-west")))
    assert matches(ConsentMatch(header={"X-Jurisdiction": "EU*"}), f)
    assert matches(ConsentMatch(header={"X-JURISDICTION": "US"}), f)
    assert not matches(ConsentMatch(header={"X-Jurisdiction": "EU"}), f)
    assert not matches(ConsentMatch(header={"X-Other": "*"}), f)
    # all conditions must hold
    assert not matches(ConsentMatch(header={"X-Jurisdiction": "US"}, caller=("nobody",)), f)
