"""Keypad tones in a recorded call's audio become sidecar ``dtmf`` entries (source
``inband``) with their side and timeline position; a key also signalled out of band is
listed once, as the signalled one; ``dtmf.inband: false`` turns the detection off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from callgen import T0, Call, write_pcap
from test_pci_pause import key_tone, place, record, voice


def keyed_call(tmp: Path) -> Path:
    call = Call()
    answer = call.setup(T0)
    start = answer + 0.1
    caller = voice(4.0, 200) * 0.5
    caller[8000:16000] = 0
    place(caller, 1.0, key_tone("1", 0.12))  # the caller presses 1 ...
    place(caller, 1.5, key_tone("#", 0.06))
    callee = voice(4.0, 110) * 0.5
    callee[16000:20000] = 0
    place(callee, 2.0, key_tone("5", 0.1))  # ... the callee 5, also sent as SIP INFO
    call.stream(start, np.clip(caller, -32768, 32767).astype(np.int16), from_caller=True)
    call.stream(
        start, np.clip(callee, -32768, 32767).astype(np.int16), from_caller=False, seq0=5, ts0=7
    )
    call.request(start + 2.03, "INFO", body="5", ctype="application/dtmf", from_callee=True)
    call.bye(start + 4.3)
    return write_pcap(tmp / "c.pcap", call.records)


def test_tones_are_listed_with_side_position_and_duration(tmp_path: Path) -> None:
    doc, _ = record(tmp_path, keyed_call(tmp_path), "dtmf: {inband: true}\n")
    got = [(d["digit"], d["side"], d["source"]) for d in doc["dtmf"]]
    assert got == [
        ("1", "caller", "inband"),
        ("#", "caller", "inband"),
        ("5", "callee", "sip_info"),
    ]
    one, hash_ = doc["dtmf"][:2]
    assert abs(one["at_s"] - 1.0) <= 0.005 and abs(one["duration_ms"] - 120) <= 5
    assert abs(hash_["at_s"] - 1.5) <= 0.005 and abs(hash_["duration_ms"] - 60) <= 5


def test_inband_detection_can_be_turned_off(tmp_path: Path) -> None:
    doc, _ = record(tmp_path, keyed_call(tmp_path), "dtmf: {inband: false}\n")
    assert [(d["digit"], d["source"]) for d in doc["dtmf"]] == [("5", "sip_info")]
