"""The sidecar's ``retention`` comes from the first matching rule, on calls really recorded.

Calls are scripted with callgen, recorded by ``callcap record`` with a config, and the
sidecar's ``retention`` fields are checked against dates worked out by hand from the script
(the call ends 4 s after T0 = 2023-11-14T22:13:20Z).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from callgen import T0, Call, tone, write_pcap
from recorded_archive import RETENTION_CONFIG, callcap, record_calls

from callcap.storage.sidecar import validate_sidecar


def test_a_rule_match_sets_rule_keep_and_exact_delete_after(tmp_path: Path) -> None:
    recorded = record_calls(tmp_path)
    finance = recorded["finance-1@10.20.0.1"].doc
    assert finance["end"] == "2023-11-14T22:13:24.000Z"
    # 5y = 5 x 365 days from the end of the call (2024 and 2028 are leap years: 2 days short)
    assert finance["retention"] == {
        "rule": "finance",
        "keep": "5y",
        "delete_after": "2028-11-12T22:13:24.000Z",
        "legal_hold": False,
    }
    plain = recorded["plain-1@10.20.0.1"].doc
    assert plain["end"] == "2023-11-16T22:13:24.000Z"
    assert plain["retention"] == {
        "rule": None,
        "keep": "90d",
        "delete_after": "2024-02-14T22:13:24.000Z",
        "legal_hold": False,
    }
    for rec in recorded.values():
        validate_sidecar(rec.doc)


def _record_one(tmp: Path, config: str, *, invite_extra: str = "") -> dict[str, Any]:
    call = Call(invite_extra=invite_extra, callee_user="+4989000")
    answer = call.setup(T0)
    call.stream(answer + 0.02, tone(440, 1.0), from_caller=True)
    call.bye(answer + 3.0)
    pcap = write_pcap(tmp / "call.pcap", call.records)
    cfg = tmp / "callcap.yaml"
    cfg.write_text(config, encoding="utf-8")
    out = tmp / "out"
    callcap("record", str(pcap), "--out", str(out), "--config", str(cfg))
    (sidecar,) = out.rglob("*.json")
    doc: dict[str, Any] = json.loads(sidecar.read_text(encoding="utf-8"))
    validate_sidecar(doc)
    return doc


def test_the_final_consent_status_selects_a_retention_rule(tmp_path: Path) -> None:
    doc = _record_one(tmp_path, "consent:\n  default: {mode: all_party}\n" + RETENTION_CONFIG)
    assert doc["consent"]["status"] == "missing"
    assert doc["retention"]["rule"] == "no-consent"
    assert doc["retention"]["keep"] == "0d"
    assert doc["retention"]["delete_after"] == doc["end"] == "2023-11-14T22:13:24.000Z"


HEADER_RULES = """\
retention:
  rules:
    - {name: other-trunk, match: {trunk: [192.0.2.0/24]}, keep: 1d}
    - {name: eu, match: {header: {x-jurisdiction: "EU*"}, trunk: [10.20.0.0/24]}, keep: 2y}
    - {name: munich, match: {callee: ["sip:+4989*"]}, keep: 3w}
"""


def test_invite_headers_and_the_trunk_are_matched(tmp_path: Path) -> None:
    doc = _record_one(tmp_path, HEADER_RULES, invite_extra="X-Jurisdiction: EU-west\r\n")
    assert doc["retention"]["rule"] == "eu"
    assert doc["retention"]["keep"] == "2y"
    assert doc["retention"]["delete_after"] == "2025-11-13T22:13:24.000Z"


def test_without_the_header_the_next_rule_decides(tmp_path: Path) -> None:
    doc = _record_one(tmp_path, HEADER_RULES, invite_extra="X-Jurisdiction: US\r\n")
    assert doc["retention"]["rule"] == "munich"
    assert doc["retention"]["delete_after"] == "2023-12-05T22:13:24.000Z"
