"""What the configured rules say about one call: its facts, and its retention.

The bridge between capture (a tracked :class:`~callcap.capture.dialog.Call`) and the pure rule
matcher in :mod:`callcap.config.rules`.  Retention takes the call's *final* consent status as
an argument rather than working it out, so whatever decides consent decides it once and
retention follows (a ``consent_status: [missing, refused]`` rule keeping such calls 0 days).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from callcap.capture.dialog import Call
from callcap.config.rules import CallFacts, first_match
from callcap.config.schema import Duration, RetentionConfig
from callcap.storage.sidecar import iso_utc


def call_facts(call: Call, consent_status: str | None = None) -> CallFacts:
    """The facts rules match on: From/To, the INVITE's peers and headers, consent status."""
    return CallFacts(
        caller_uri=call.from_.uri,
        caller_user=call.from_.user,
        callee_uri=call.to.uri,
        callee_user=call.to.user,
        caller_ip=call.caller_ip,
        callee_ip=call.callee_ip,
        headers=call.invite_headers,
        consent_status=consent_status,
    )


def retention_fields(
    config: RetentionConfig, facts: CallFacts, consent_status: str, end: float
) -> dict[str, Any]:
    """The sidecar's ``retention`` object: the first matching rule, else the default.

    ``delete_after`` counts from the call's end, so a long call is kept as long as a short
    one after it is over.  A new recording is never on legal hold: holds are placed later,
    by ``callcap hold add``.
    """
    name, keep = retention_rule(config, facts, consent_status)
    return retention_doc(name, keep, end)


def retention_doc(rule: str | None, keep: Duration, end: float) -> dict[str, Any]:
    """The sidecar's ``retention`` for a matched rule (None: the default) and its term."""
    return {
        "rule": rule,
        "keep": keep.text,
        "delete_after": iso_utc(end + keep.seconds),
        "legal_hold": False,
    }


def retention_rule(
    config: RetentionConfig, facts: CallFacts, consent_status: str
) -> tuple[str | None, Duration]:
    """The name of the first matching retention rule (None: the default) and its term."""
    rule = first_match(config.rules, dataclasses.replace(facts, consent_status=consent_status))
    keep = rule.keep if rule is not None else config.default.keep
    return (rule.name if rule is not None else None), keep


__all__ = ["call_facts", "retention_doc", "retention_fields", "retention_rule"]
