"""Per-call consent: which regime applies, and what the call's evidence decides.

A sans-IO state machine in the manner of the dialog tracker: the recorder reports the answer,
key presses and SIP headers with their capture times, and how far its input is complete
(:meth:`ConsentTracker.settle`); the tracker answers with a :class:`ConsentDecision` once, and
never changes it.  No clock, file or log is touched here, so every rule is testable with
plain numbers.

The rules, in full:

* The regime is the first ``consent.rules`` entry whose ``match`` holds for the call, else
  ``consent.default``.  ``one_party`` is decided at once: ``not_required``, kept.
* ``all_party`` under a rule looks for evidence from the answer until ``answer + within_s``
  (inclusive), in capture time.  The first evidence wins:

  - ``dtmf``: the ``dtmf_side`` party (the caller unless configured) keys ``dtmf_digit``
    (granted) or ``optout_digit`` (refused), signalled as an RFC 4733 event or a SIP INFO;
  - ``inband``: the same keys heard as keypad tones in that party's audio;
  - ``sip_header``: the initial INVITE carries the header with a value matching the glob
    (evidence at the answer, ``at_s`` 0), or an in-dialog request (re-INVITE, UPDATE, INFO)
    of either party carries it within the window (granted).

* Nothing by the deadline, or the call ends first: ``missing``, then ``on_missing``.
* ``all_party`` as the *default* names no evidence method, so nothing can grant it: the
  call is ``missing`` from the start and kept, flagged.  A rule with ``match: {}`` at the
  end of the list is how every call gets an evidence window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from callcap.config.rules import CallFacts, first_match, glob_match
from callcap.config.schema import ConsentConfig, ConsentRule

Status = Literal["not_required", "granted", "refused", "missing"]
Action = Literal["kept", "discarded", "flagged"]
Method = Literal["dtmf", "inband", "sip_header"]


@dataclass(frozen=True, slots=True)
class Evidence:
    """What decided consent: ``at_s`` is seconds after the answer (the clock ``within_s``
    counts on); ``digit`` is None for a header."""

    method: Method
    digit: str | None
    side: str
    at_s: float


@dataclass(frozen=True, slots=True)
class ConsentDecision:
    mode: Literal["one_party", "all_party"]
    rule: str | None
    status: Status
    evidence: Evidence | None
    action: Action

    @property
    def keeps_audio(self) -> bool:
        return self.action != "discarded"

    def sidecar(self) -> dict[str, Any]:
        """The sidecar's ``consent`` object."""
        ev = self.evidence
        return {
            "mode": self.mode,
            "rule": self.rule,
            "status": self.status,
            "evidence": None
            if ev is None
            else {"method": ev.method, "digit": ev.digit, "side": ev.side, "at_s": ev.at_s},
            "action": self.action,
        }


class ConsentTracker:
    """One call's consent, decided once from the evidence it is shown."""

    def __init__(self, config: ConsentConfig, facts: CallFacts) -> None:
        self.rule: ConsentRule | None = first_match(config.rules, facts)
        self.mode = self.rule.mode if self.rule is not None else config.default.mode
        self._headers = facts.headers
        self.answer: float | None = None
        self.decision: ConsentDecision | None = None
        if self.mode == "one_party":
            self.decision = self._decided("not_required", None)
        elif self.rule is None:
            self.decision = ConsentDecision(self.mode, None, "missing", None, "flagged")

    @property
    def listens_inband(self) -> bool:
        """Whether keypad tones in the audio count (only then is tone detection needed)."""
        return self.decision is None and self.rule is not None and "inband" in self.rule.evidence

    @property
    def deadline(self) -> float | None:
        """Capture time after which no evidence counts (None before the answer)."""
        if self.answer is None or self.rule is None:
            return None
        return self.answer + self.rule.within_s

    def answered(self, ts: float) -> ConsentDecision | None:
        """The call was answered at ``ts``: the window opens; an INVITE header counts now."""
        if self.answer is not None:
            return None
        self.answer = ts
        rule = self.rule
        if self.decision is not None or rule is None or rule.sip_header is None:
            return None
        if "sip_header" in rule.evidence and self._carries(self._headers, rule):
            return self._evidence("granted", "sip_header", None, "caller", ts)
        return None

    def key(self, digit: str, side: str, inband: bool, ts: float) -> ConsentDecision | None:
        """A key ``side`` pressed at capture time ``ts`` (``inband``: heard as a tone)."""
        rule = self.rule
        if self.decision is not None or rule is None or not self._in_window(ts):
            return None
        if ("inband" if inband else "dtmf") not in rule.evidence or side != rule.dtmf_side:
            return None
        method: Method = "inband" if inband else "dtmf"
        if digit == rule.dtmf_digit:
            return self._evidence("granted", method, digit, side, ts)
        if digit == rule.optout_digit:
            return self._evidence("refused", method, digit, side, ts)
        return None

    def header(
        self, headers: tuple[tuple[str, str], ...], side: str, ts: float
    ) -> ConsentDecision | None:
        """An in-dialog request's headers (lower-case names) seen at ``ts``."""
        rule = self.rule
        if (
            self.decision is not None
            or rule is None
            or "sip_header" not in rule.evidence
            or not self._in_window(ts)
            or not self._carries(headers, rule)
        ):
            return None
        return self._evidence("granted", "sip_header", None, side, ts)

    def settle(self, complete_until: float) -> ConsentDecision | None:
        """Every key and header up to capture time ``complete_until`` has been reported:
        past the deadline with no evidence, consent is missing."""
        deadline = self.deadline
        if self.decision is None and deadline is not None and complete_until > deadline:
            return self._missing()
        return None

    def outlook(self) -> ConsentDecision:
        """The decision as it stands, or what ending now would decide — without deciding
        (a crash-recovery checkpoint describes the call as recovery would publish it)."""
        if self.decision is not None:
            return self.decision
        decision = self._missing()
        self.decision = None
        return decision

    def finish(self) -> ConsentDecision:
        """The call is over: whatever was not decided is missing."""
        if self.decision is None:
            return self._missing()
        return self.decision

    # -- internals --------------------------------------------------------------------------

    def _in_window(self, ts: float) -> bool:
        deadline = self.deadline
        return deadline is not None and self.answer is not None and self.answer <= ts <= deadline

    @staticmethod
    def _carries(headers: tuple[tuple[str, str], ...], rule: ConsentRule) -> bool:
        assert rule.sip_header is not None
        name = rule.sip_header.name.lower()
        return any(h == name and glob_match(rule.sip_header.value, v.strip()) for h, v in headers)

    def _evidence(
        self, status: Status, method: Method, digit: str | None, side: str, ts: float
    ) -> ConsentDecision:
        assert self.answer is not None
        at = round(max(0.0, ts - self.answer), 3)
        return self._decided(status, Evidence(method, digit, side, at))

    def _missing(self) -> ConsentDecision:
        return self._decided("missing", None)

    def _decided(self, status: Status, evidence: Evidence | None) -> ConsentDecision:
        action: Action = "kept"
        if status == "refused":
            action = "discarded"
        elif status == "missing":
            keep = self.rule is not None and self.rule.on_missing == "keep_flagged"
            action = "flagged" if keep else "discarded"
        self.decision = ConsentDecision(
            self.mode, self.rule.name if self.rule is not None else None, status, evidence, action
        )
        return self.decision


__all__ = ["ConsentDecision", "ConsentTracker", "Evidence"]
