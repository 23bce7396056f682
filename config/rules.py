"""Which consent or retention rule applies to a call: first match wins, pure and clock-free.

Kept beside the schema and free of capture and storage imports, so both the recorder and
offline tools can ask "which rule?" from plain facts.  The semantics, in full:

* A rule matches when every condition of its ``match`` holds; an empty (or absent) list or
  mapping always holds, so ``match: {}`` matches every call.
* ``caller`` / ``callee``: one of the globs matches the From / To party — either its URI's
  user part (``+4930123``) or the whole URI (``sip:+4930123@10.0.0.1``).  In a glob only
  ``*`` (any run of characters, also none) and ``?`` (one character) are special; ``[`` and
  everything else stand for themselves (an IPv6 host in a URI is written in brackets).
  Comparison is case-sensitive: the user part of a SIP URI is (RFC 3261 §19.1.4).
* ``trunk``: the IP address of either signalling peer of the initial INVITE — the address
  it came from or the one it went to — is inside one of the networks.  Either, because a
  passive recorder sees both directions and a trunk is a trunk whichever way the call went.
* ``header``: for each listed name (case-insensitive, RFC 3261 §7.3.1) some occurrence of
  that header in the initial INVITE has a value matching the glob; a missing header fails.
* ``consent_status`` (retention rules only): the call's final consent status is listed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, TypeVar

from callcap.config.schema import ConsentMatch, Network, RetentionMatch


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What rules may look at: the parties, the signalling peers, the INVITE's headers.

    ``headers`` are ``(name, value)`` pairs with lower-case names, in message order;
    ``consent_status`` is ``None`` until consent has been decided (consent rules never see
    it; a retention rule listing statuses does not match a call without one).
    """

    caller_uri: str
    caller_user: str | None
    callee_uri: str
    callee_user: str | None
    caller_ip: str
    callee_ip: str
    headers: tuple[tuple[str, str], ...] = ()
    consent_status: str | None = None


class _HasMatch(Protocol):
    @property
    def match(self) -> ConsentMatch: ...


R = TypeVar("R", bound=_HasMatch)


@lru_cache(maxsize=4096)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` as wildcards, every other character literal; anchored at both ends."""
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, text: str) -> bool:
    return glob_regex(pattern).fullmatch(text) is not None


def _party(globs: tuple[str, ...], uri: str, user: str | None) -> bool:
    if not globs:
        return True
    for pattern in globs:
        if (user is not None and glob_match(pattern, user)) or glob_match(pattern, uri):
            return True
    return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _trunk(networks: tuple[Network, ...], facts: CallFacts) -> bool:
    if not networks:
        return True
    addresses = [a for a in (_address(facts.caller_ip), _address(facts.callee_ip)) if a]
    return any(
        a in n.network for n in networks for a in addresses if a.version == n.network.version
    )


def _headers(wanted: dict[str, str], headers: tuple[tuple[str, str], ...]) -> bool:
    for name, pattern in wanted.items():
        key = name.lower()
        if not any(h == key and glob_match(pattern, v) for h, v in headers):
            return False
    return True


def matches(match: ConsentMatch, facts: CallFacts) -> bool:
    """Whether every condition of ``match`` holds for ``facts`` (see the module docstring)."""
    if (
        isinstance(match, RetentionMatch)
        and match.consent_status
        and facts.consent_status not in match.consent_status
    ):
        return False
    return (
        _party(match.caller, facts.caller_uri, facts.caller_user)
        and _party(match.callee, facts.callee_uri, facts.callee_user)
        and _trunk(match.trunk, facts)
        and _headers(match.header, facts.headers)
    )


def first_match(rules: Iterable[R], facts: CallFacts) -> R | None:
    """The first rule whose ``match`` holds, or ``None`` (the caller then uses the default)."""
    for rule in rules:
        if matches(rule.match, facts):
            return rule
    return None


__all__ = ["CallFacts", "first_match", "glob_match", "matches"]
