"""A sender whose packets fall further behind their media time than the recorder waits for
them (a path whose delay grew, a sender that stalls and then sends in bursts) loses no
audio that arrived: its packets are placed where they arrive, after holes listed as gaps,
not dropped as too late — and the fast lane does exactly what packet-by-packet does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
import structlog
from callgen import PTIME, RATE, T0, Call, tone, write_pcap

from callcap.capture.pcapfile import CaptureReader
from callcap.codecs.g711 import decode_ulaw, encode_ulaw
from callcap.config.loader import load_config
from callcap.pipeline import Pipeline

PACKETS = 600  # 12 s of audio


def _arrival(i: int) -> float:
    """On time for 2 s, then 45 % slower than the media clock, in bursts: the sender stalls
    for up to 0.4 s and then sends what it owes at once."""
    if i < 100:
        return i * 0.02
    late = 2.0 + (i - 100) * 0.02 * 1.45
    return late - (late % 0.4) * 0.05  # bunched towards the end of each 0.4 s


def _capture(path: Path) -> npt.NDArray[np.int16]:
    call = Call()
    answer = call.setup(T0)
    start = answer + 0.1
    caller = tone(440, PACKETS * PTIME / RATE)
    coded = encode_ulaw(caller)
    for i in range(PACKETS):
        call.rtp(
            start + _arrival(i),
            from_caller=True,
            seq=100 + i,
            rtp_ts=1000 + i * PTIME,
            payload=coded[i * PTIME : (i + 1) * PTIME],
        )
    call.stream(start, tone(1800, PACKETS * PTIME / RATE), from_caller=False)
    call.bye(start + _arrival(PACKETS - 1) + 0.5)
    write_pcap(path, call.records)
    return decode_ulaw(coded)


def _record(capture: Path, out: Path, *, lane: bool) -> tuple[dict[str, Any], np.ndarray]:
    pipeline = Pipeline(load_config(None), out, structlog.get_logger("test"))
    with CaptureReader(str(capture)) as reader:
        if lane:
            pipeline.run_blocks(reader.blocks())
        else:
            for ts, linktype, frame in reader:
                pipeline.feed(ts, linktype, frame)
    pipeline.close("capture_end")
    (sidecar,) = out.rglob("*.json")
    audio, _rate = soundfile.read(sidecar.with_suffix(".wav"), dtype="int16")
    return json.loads(sidecar.read_text()), audio


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("delay")
    sent = _capture(tmp / "call.pcap")
    return {
        "sent": sent,
        "feed": _record(tmp / "call.pcap", tmp / "feed", lane=False),
        "lane": _record(tmp / "call.pcap", tmp / "lane", lane=True),
    }


def test_no_packet_that_arrived_is_dropped_as_late(recorded: dict[str, Any]) -> None:
    doc, _audio = recorded["feed"]
    (caller,) = [s for s in doc["streams"] if s["side"] == "caller"]
    assert caller["packets"] == PACKETS
    assert caller["lost"] == 0
    assert caller["late"] == 0


def test_every_sample_sent_is_in_the_recording_in_order(recorded: dict[str, Any]) -> None:
    _doc, audio = recorded["feed"]
    channel = audio[:, 0]
    sent = recorded["sent"]
    # nothing lost, nothing written over: the sender's samples, with silence between
    assert np.array_equal(channel[channel != 0], sent[sent != 0])


def test_the_holes_the_lag_opens_are_gaps_and_follow_the_arrivals(
    recorded: dict[str, Any],
) -> None:
    doc, audio = recorded["feed"]
    gaps = [g for g in doc["gaps"] if g["side"] == "caller"]
    assert gaps, "the lag opens holes in the speech: each is listed"
    assert not any(g["capture_loss"] for g in gaps)
    # the caller's audio ends about where its last packet arrived (the callee, on time,
    # ends where its media does), not where its media clock would end it, 45 % earlier;
    # placement may trail arrival by the jitter window it waits for
    caller_end, callee_end = (np.flatnonzero(audio[:, ch])[-1] / RATE for ch in (0, 1))
    lag = _arrival(PACKETS - 1) - (PACKETS - 1) * 0.02
    assert caller_end - callee_end == pytest.approx(lag, abs=0.3)


def test_the_fast_lane_records_what_packet_by_packet_records(recorded: dict[str, Any]) -> None:
    feed_doc, feed_audio = recorded["feed"]
    lane_doc, lane_audio = recorded["lane"]
    assert np.array_equal(feed_audio, lane_audio)
    assert feed_doc["streams"] == lane_doc["streams"]
    assert feed_doc["gaps"] == lane_doc["gaps"]
