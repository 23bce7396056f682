"""A flood of never-answered INVITEs costs bounded memory and no real call.

Unanswered INVITEs (no 18x or 2xx from the far end) are tracked up to
``calls.max_pending_calls``; beyond it the oldest of them is evicted and counted, never a
call that rings or was answered.  Pinned on the tracker itself and end to end: 30,000
INVITEs in 3 s around one real call, recorded by ``callcap record`` in a child whose peak
RSS is measured — the real call whole, the flood's cost under 100 MB over the call alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from floods import T0, invite_frame, real_call, record_child, write_pcap
from outputs import published
from tones import held_fraction

from callcap.capture.dialog import CallEnded, CallStarted, CallTracker
from callcap.capture.sip import SipMessage

pytestmark = pytest.mark.slow


def _invite(k: int) -> bytes:
    frame = invite_frame(k)
    return frame[14 + 20 + 8 :]  # the SIP message of the Ethernet/IPv4/UDP frame


def _ringing(invite: bytes) -> bytes:
    text = invite.decode()
    head = {ln.split(":", 1)[0]: ln for ln in text.split("\r\n")[1:] if ":" in ln}
    return (
        "SIP/2.0 180 Ringing\r\n"
        f"{head['Via']}\r\n{head['From']}\r\n{head['To']};tag=callee\r\n"
        f"{head['Call-ID']}\r\n{head['CSeq']}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_the_oldest_unanswered_invite_is_evicted_never_a_ringing_call() -> None:
    evicted: list[tuple[str, str]] = []
    tracker = CallTracker(max_pending=100, on_evict=lambda c, why: evicted.append((c.call_id, why)))
    src, dst = ("10.9.0.1", 5060), ("10.8.0.1", 5060)
    events = tracker.on_message(SipMessage.parse(_invite(0)), T0, src, dst)
    events += tracker.on_message(SipMessage.parse(_ringing(_invite(0))), T0 + 0.05, dst, src)
    for k in range(1, 1001):
        events += tracker.on_message(SipMessage.parse(_invite(k)), T0 + k * 1e-3, src, dst)
    started = [e.call.call_id for e in events if isinstance(e, CallStarted)]
    ended = [e.call.call_id for e in events if isinstance(e, CallEnded)]
    assert len(started) == 1001
    # the 900 oldest of the flood, in order; the ringing call stays
    assert ended == [f"flood-{k}@10.9.{k >> 8}.{k & 0xFF or 1}" for k in range(1, 901)]
    assert [why for _c, why in evicted] == ["pending"] * 900
    assert tracker.counters["pending_evicted"] == 900
    assert len(tracker) == 101 and "flood-0@10.9.0.1" in tracker.calls
    assert not tracker._ended  # evicted calls are not remembered either


def test_a_flood_of_unanswered_invites_costs_bounded_memory_and_no_real_call(
    tmp_path: Path,
) -> None:
    frames, info = real_call(tmp_path / "call.pcap")
    n = 30_000
    # 10,000 INVITEs a second from before the real call's INVITE until after its answer
    times = T0 - 1.0 + np.linspace(0.0, 3.0, n, endpoint=False)
    flood = [(float(t), invite_frame(k)) for k, t in enumerate(times)]
    write_pcap(tmp_path / "flood.pcap", sorted(frames + flood, key=lambda x: x[0]))
    alone = record_child(tmp_path / "call.pcap", tmp_path / "alone")
    flooded = record_child(tmp_path / "flood.pcap", tmp_path / "flooded")
    assert flooded["rss_mb"] - alone["rss_mb"] < 100, (alone, flooded)
    drops = flooded["finished"]["drops"]
    assert isinstance(drops, dict) and drops["pending_evicted"] == n - 4000
    # the real call, answered in the middle of the flood, whole
    (call,) = info.calls  # type: ignore[attr-defined]
    (doc, audio) = published(tmp_path / "flooded")[call.call_id]
    assert doc["end_reason"] in ("bye_caller", "bye_callee") and audio is not None
    first = min(call.caller.first_time, call.callee.first_time)
    for ch, side in ((0, call.caller), (1, call.callee)):
        start = side.first_time - first + 0.1
        assert (
            held_fraction(audio[:, ch], side.tone_hz, start, start + side.packets_sent * 0.02 - 0.2)
            > 0.99
        )
