"""A small archive made by really recording calls: pcaps from callgen, ``callcap record``.

Three calls a day apart, so a fake clock (``--now``) between their expiry times separates
them: a finance call to a +1800 number (kept 5 years by rule), a call from +4930123 (the
data subject of the erasure tests) and an ordinary call (both kept 90 days by default).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callgen import T0, Call, tone, write_pcap

DAY = 86400.0

RETENTION_CONFIG = """\
retention:
  default: {keep: 90d}
  rules:
    - {name: finance, match: {callee: ["+1800*"]}, keep: 5y}
    - {name: no-consent, match: {consent_status: [missing, refused]}, keep: 0d}
"""

CALLS = (
    # (call_id, caller user, callee user, start)
    ("finance-1@10.20.0.1", "alice", "+18005550100", T0),
    ("subject-1@10.20.0.1", "+4930123", "bob", T0 + DAY),
    ("plain-1@10.20.0.1", "carol", "dave", T0 + 2 * DAY),
)


@dataclass(frozen=True)
class Recorded:
    call_id: str
    call_uid: str
    sidecar: Path
    wav: Path
    doc: dict[str, Any]


def callcap(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "callcap", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if expect is not None:
        assert proc.returncode == expect, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def record_calls(tmp: Path, config: str = RETENTION_CONFIG) -> dict[str, Recorded]:
    """Record the three calls into ``tmp/out``; keyed by call_id."""
    records: list[tuple[float, bytes]] = []
    for i, (call_id, caller, callee, start) in enumerate(CALLS):
        call = Call(
            call_id=call_id,
            caller_port=40000 + 2 * i,
            callee_port=50000 + 2 * i,
            caller_user=caller,
            callee_user=callee,
        )
        answer = call.setup(start)
        call.stream(answer + 0.02, tone(440 + 100 * i, 2.0), from_caller=True)
        call.stream(answer + 0.02, tone(1000, 2.0), from_caller=False)
        call.bye(answer + 3.0)
        records += call.records
    pcap = write_pcap(tmp / "calls.pcap", records)
    cfg = tmp / "callcap.yaml"
    cfg.write_text(config, encoding="utf-8")
    out = tmp / "out"
    callcap("record", str(pcap), "--out", str(out), "--config", str(cfg))
    found: dict[str, Recorded] = {}
    for sidecar in sorted(out.rglob("*.json")):
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        found[doc["call_id"]] = Recorded(
            doc["call_id"], doc["call_uid"], sidecar, sidecar.with_suffix(".wav"), doc
        )
    assert sorted(found) == sorted(c[0] for c in CALLS)
    return found


def audit_entries(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (out / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    ]
