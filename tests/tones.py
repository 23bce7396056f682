"""Is a recorded channel the tone the workload generator sent, frame by frame?

The generator (bench/workload.py) gives every call's caller and callee a pure tone of its
own.  A 20 ms frame of a channel "holds" the tone when nearly all of its energy is at that
frequency and it is well above silence: a projection on the tone's sine and cosine, which
tells the frame apart from silence, from the other side's tone and from another call's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

RATE = 8000
FRAME = 160


def tone_frames(samples: npt.NDArray[np.int16], hz: float) -> npt.NDArray[np.bool_]:
    """For every whole 20 ms frame of ``samples``: does it hold the tone ``hz``?"""
    n = len(samples) // FRAME
    x = samples[: n * FRAME].astype(np.float64).reshape(n, FRAME)
    t = np.arange(n * FRAME, dtype=np.float64).reshape(n, FRAME) / RATE
    w = 2 * np.pi * hz * t
    c = (x * np.cos(w)).sum(axis=1)
    s = (x * np.sin(w)).sum(axis=1)
    power = (x * x).sum(axis=1)
    at_tone = 2.0 * (c * c + s * s) / FRAME
    loud = power / FRAME > 1000.0**2  # the generator's tones are at 0.3 of full scale
    return loud & (at_tone > 0.9 * np.maximum(power, 1e-9))


def held_fraction(samples: npt.NDArray[np.int16], hz: float, start_s: float, end_s: float) -> float:
    """The share of frames from ``start_s`` to ``end_s`` (timeline seconds) holding ``hz``."""
    a, b = int(start_s * RATE), int(end_s * RATE)
    frames = tone_frames(samples[a:b], hz)
    return float(frames.mean()) if len(frames) else 0.0


def assert_whole_or_shown(
    samples: npt.NDArray[np.int16],
    hz: float,
    start_s: float,
    end_s: float,
    gaps: list[dict[str, Any]],
    side: str,
    *,
    floor: float = 0.85,
) -> None:
    """The channel holds ``hz`` from ``start_s`` to ``end_s`` — or nearly (more than
    ``floor`` of its frames), with every frame that does not shown as a gap of ``side``.

    Whole is the rule; the exception is a sender starved on this 2-core machine, whose
    packets then came late or late for good (the timeline follows them, and the hole that
    opens in the speech is listed like a loss): the recorder telling the truth about the
    wire.  A frame missing that no gap of ``side`` covers is audio the recorder lost
    without saying so."""
    if end_s - start_s < 0.1:
        return  # nothing of this stretch to judge
    held = held_fraction(samples, hz, start_s, end_s)
    if held > 0.99:
        return
    a = int(start_s * RATE) // FRAME * FRAME
    frames = tone_frames(samples[a : int(end_s * RATE)], hz)
    spans = [(g["from_s"], g["to_s"]) for g in gaps if g["side"] == side]
    missing = []
    for i in np.flatnonzero(~frames).tolist():
        t0 = (a + i * FRAME) / RATE
        t1 = t0 + FRAME / RATE
        if not any(lo < t1 + 0.02 and hi > t0 - 0.02 for lo, hi in spans):
            missing.append(round(t0, 3))
    assert not missing, (side, held, missing[:12], gaps)
    assert held > floor, (side, held, gaps)


def audio_start(doc: dict[str, Any]) -> float:
    """A sidecar's ``audio.start`` (its timeline's sample 0) as seconds since the epoch."""
    return datetime.fromisoformat(doc["audio"]["start"].replace("Z", "+00:00")).timestamp()


__all__ = [
    "assert_whole_or_shown",
    "audio_start",
    "held_fraction",
    "tone_frames",
]
