"""Structured hostile traffic — SIP, SDP, RTP/RTCP/RFC 4733, TCP segment orders, IP
fragments, pcap/pcapng structure — through the recorder: no crash, no hang, bounded
memory, valid output.

The CI subset of ``bench/fuzz_structured.py``, whose full run (ten million inputs) is a
bench script with its counts in the closing notes.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from fuzz_structured import TARGETS, Dialog, capture_file, fuzz, sip_message

from callcap.capture.pcapfile import CaptureReader
from callcap.capture.sip import SipMessage
from callcap.errors import ParseError

pytestmark = pytest.mark.slow


def test_the_generators_are_seeded() -> None:
    def some(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        dialog = Dialog("c@x", "a", "b")
        return [sip_message(rng, dialog, hostile=True) for _ in range(50)]

    assert some(3) == some(3) and some(3) != some(4)


def test_valid_structure_gets_through_so_the_deep_code_is_reached() -> None:
    """Most hostile SIP still parses as SIP (the fuzzing is not stuck at the first check)."""
    rng = random.Random(11)
    dialog = Dialog("c@x", "a", "b")
    parsed = 0
    for _ in range(400):
        try:
            msg = SipMessage.parse(sip_message(rng, dialog, hostile=True))
        except ParseError:
            continue
        parsed += msg.header("call-id") == "c@x"
    assert parsed > 100  # a quarter: the rest lie in their length, names or bytes


def test_half_the_capture_files_read_back_their_frames(tmp_path: Path) -> None:
    rng = random.Random(5)
    frames = [(1_700_000_000.0 + i, 1, bytes(14) + struct.pack("!I", i)) for i in range(20)]
    whole = 0
    for n in range(60):
        path = tmp_path / f"f{n}.cap"
        path.write_bytes(capture_file(rng, frames))
        try:
            with CaptureReader(str(path)) as reader:
                got = [f for block in reader.blocks() for f in block.frames()]
        except Exception:  # noqa: BLE001 - a broken file is the point of some of them
            continue
        whole += len(got) == len(frames)
    assert 20 < whole < 50  # the other half lie in their structure


@pytest.mark.parametrize("seed", [1, 2])
def test_structured_inputs_are_recorded_or_refused_never_crash(seed: int) -> None:
    counts, per_target, failures = fuzz(3000, seed, time_limit=10.0, max_rss_mb=1500.0)
    assert failures == [] and counts == {"ok": 3000}
    assert set(per_target) == set(TARGETS)
    assert per_target["capture_file"] == 272 and min(per_target.values()) == 272
