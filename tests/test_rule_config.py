"""Consent and retention rules load typed, and every mistake in them names FILE:LINE: key.path.

As in test_config_errors, the offending line of each bad case is marked ``# <-`` and counted,
so no line number is hard-coded.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from callcap.config.loader import load_config, load_config_text
from callcap.config.schema import (
    ConsentMatch,
    ConsentRule,
    Duration,
    Network,
    RetentionMatch,
    RetentionRule,
    SipHeaderEvidence,
)
from callcap.errors import ConfigError

ISSUE_EXAMPLE = """\
consent:
  default: {mode: one_party}            # one_party | all_party
  rules:                                # first match wins
    - name: eu-callers
      match: {caller: ["+49*", "+33*"], callee: ["*"], trunk: ["10.1.0.0/16"], header: {X-Jurisdiction: "EU"}}
      mode: all_party
      evidence: [dtmf, sip_header]       # how consent may be given
      dtmf_digit: "1"                    # caller presses 1 to agree
      optout_digit: "2"                  # … or 2 to refuse
      within_s: 30                       # after answer
      sip_header: {name: X-Recording-Consent, value: "yes"}
      on_missing: discard                # discard | keep_flagged
retention:
  default: {keep: 90d}
  rules:
    - {name: finance, match: {callee: ["+1800*"]}, keep: 5y}
    - {name: no-consent, match: {consent_status: [missing, refused]}, keep: 0d}
  sweep_interval_s: 600
"""


def test_the_issue_example_loads_into_typed_rules(tmp_path: Path) -> None:
    path = tmp_path / "callcap.yaml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    config = load_config(path)
    (rule,) = config.consent.rules
    assert rule == ConsentRule(
        name="eu-callers",
        mode="all_party",
        match=ConsentMatch(
            caller=("+49*", "+33*"),
            callee=("*",),
            trunk=(Network("10.1.0.0/16", ipaddress.ip_network("10.1.0.0/16")),),
            header={"X-Jurisdiction": "EU"},
        ),
        evidence=("dtmf", "sip_header"),
        dtmf_digit="1",
        optout_digit="2",
        within_s=30.0,
        sip_header=SipHeaderEvidence(name="X-Recording-Consent", value="yes"),
        on_missing="discard",
    )
    assert config.retention.rules == (
        RetentionRule(
            "finance", Duration("5y", 5 * 365 * 86400), RetentionMatch(callee=("+1800*",))
        ),
        RetentionRule(
            "no-consent", Duration("0d", 0), RetentionMatch(consent_status=("missing", "refused"))
        ),
    )
    assert config.retention.sweep_interval_s == 600.0
    # still a frozen value: hashable, equal configs hash equal
    assert hash(config) == hash(load_config(path))


def test_rule_defaults_are_documented_values() -> None:
    config = load_config_text("consent:\n  rules:\n    - {name: all, mode: one_party}\n")
    (rule,) = config.consent.rules
    assert rule.match == ConsentMatch()
    assert (rule.dtmf_digit, rule.optout_digit, rule.within_s, rule.on_missing) == (
        "1",
        None,
        30.0,
        "discard",
    )


BAD: list[tuple[str, str, str, str]] = [
    (
        "trunk-not-a-network",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n      match:\n"
        '        trunk: ["10.1.0.0/16",\n                "10.300.0.0/16"]   # <-\n',
        "consent.rules[0].match.trunk[1]",
        "not an IP network: ",
    ),
    (
        "trunk-host-bits",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n"
        "      match: {trunk: [10.1.2.3/16]}   # <-\n",
        "consent.rules[0].match.trunk[0]",
        "has host bits set",
    ),
    (
        "duplicate-rule-name",
        "retention:\n  rules:\n    - {name: finance, keep: 5y}\n    - keep: 1y\n"
        "      name: finance   # <-\n",
        "retention.rules[1].name",
        "'finance' is already the name of retention.rules[0]; names must be unique",
    ),
    (
        "bad-dtmf-digit",
        "consent:\n  rules:\n    - name: a\n      mode: all_party\n      evidence: [dtmf]\n"
        '      dtmf_digit: "E"   # <-\n',
        "consent.rules[0].dtmf_digit",
        "must be one DTMF digit (0-9, *, #, A-D), got 'E'",
    ),
    (
        "two-digit-optout",
        "consent:\n  rules:\n    - name: a\n      mode: all_party\n      evidence: [dtmf]\n"
        '      optout_digit: "22"   # <-\n',
        "consent.rules[0].optout_digit",
        "must be one DTMF digit",
    ),
    (
        "optout-equals-consent-digit",
        "consent:\n  rules:\n    - name: a\n      mode: all_party\n      evidence: [dtmf]\n"
        '      dtmf_digit: "5"\n      optout_digit: "5"   # <-\n',
        "consent.rules[0].optout_digit",
        "must differ from dtmf_digit",
    ),
    (
        "all-party-without-evidence",
        "consent:\n  rules:\n    - name: a   # <-\n      mode: all_party\n",
        "consent.rules[0].evidence",
        "an all_party rule needs at least one evidence method",
    ),
    (
        "sip-header-evidence-without-header",
        # the rule has no sip_header key: the error points at the rule itself
        "consent:\n  rules:\n    - name: a   # <-\n      mode: all_party\n"
        "      evidence: [sip_header]\n",
        "consent.rules[0].sip_header",
        "evidence sip_header needs sip_header {name, value}",
    ),
    (
        "unknown-evidence",
        "consent:\n  rules:\n    - name: a\n      mode: all_party\n"
        "      evidence: [dtmf, carrier_pigeon]   # <-\n",
        "consent.rules[0].evidence[1]",
        "must be one of 'dtmf', 'sip_header', 'inband'",
    ),
    (
        "unknown-dtmf-side",
        "consent:\n  rules:\n    - name: a\n      mode: all_party\n      evidence: [dtmf]\n"
        "      dtmf_side: agent   # <-\n",
        "consent.rules[0].dtmf_side",
        "must be one of 'caller', 'callee', got 'agent'",
    ),
    (
        "missing-rule-name",
        "retention:\n  rules:\n    - {keep: 5y}   # <-\n",
        "retention.rules[0].name",
        "missing required key",
    ),
    (
        "consent-rule-cannot-match-on-consent-status",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n"
        "      match: {consent_status: [granted]}   # <-\n",
        "consent.rules[0].match.consent_status",
        "unknown key",
    ),
    (
        "unknown-consent-status",
        "retention:\n  rules:\n    - name: a\n      keep: 1d\n"
        "      match: {consent_status: [maybe]}   # <-\n",
        "retention.rules[0].match.consent_status[0]",
        "must be one of 'not_required', 'granted', 'refused', 'missing'",
    ),
    (
        "bad-header-name",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n"
        '      match: {header: {"X Bad": "1"}}   # <-\n',
        "consent.rules[0].match.header",
        "not a SIP header name: 'X Bad'",
    ),
    (
        "duplicate-header-any-case",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n      match:\n"
        "        header:\n          X-J: EU\n          x-j: US   # <-\n",
        "consent.rules[0].match.header.x-j",
        "duplicate key (first set on line 7)",
    ),
    (
        "bad-keep",
        "retention:\n  rules:\n    - name: a\n      keep: forever   # <-\n",
        "retention.rules[0].keep",
        "expected a duration like 90d",
    ),
    (
        "negative-sweep-interval",
        "retention:\n  sweep_interval_s: -1   # <-\n",
        "retention.sweep_interval_s",
        "must be at least 0, got -1",
    ),
    (
        "caller-not-a-list-of-strings",
        "consent:\n  rules:\n    - name: a\n      mode: one_party\n"
        "      match: {caller: [+4930123]}   # <-\n",
        "consent.rules[0].match.caller[0]",
        "expected a string, got integer",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_rules_are_located_errors(text: str, key: str, problem: str) -> None:
    line = next(n for n, t in enumerate(text.splitlines(), start=1) if "# <-" in t)
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="callcap.yaml")
    err = info.value
    assert (err.file, err.line, err.key) == ("callcap.yaml", line, key), str(err)
    assert problem in err.problem
    assert str(err).startswith(f"callcap.yaml:{line}: {key}: ")
