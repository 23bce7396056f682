"""In-band DTMF: keypad tones found in decoded 8 kHz audio (ITU-T Q.23 frequencies, Q.24 limits).

Phones that do not send RFC 4733 events leave the keypad in the audio itself, so consent
evidence and PCI pause sequences have to be heard there too.  The detector is streaming:
audio arrives in blocks of any size, analysis frames sit on one grid of the channel's sample
positions, and the state of a tone in progress crosses block boundaries, so a digit split
over two blocks is reported once.

Per frame (205 samples, the classic 25.6 ms DTMF window, every 5 ms) the eight keypad
frequencies and their second harmonics are measured with Goertzel's single-bin DFT.  The
recursion is evaluated in closed form, as one matrix product of all frames of a block with
the Hann-weighted basis, which gives the same complex bin values without a Python loop per
sample; the tests that need no phase screen every frame, and the rest run on the few
candidates.  A frame is a key press when all of these hold (Q.24 and common receiver practice):

* **Frequency**: the phase advance of a bin between frames 5 ms apart measures the actual
  tone frequency; within 1.5 % it is accepted, beyond 3.5 % rejected (the decision sits at
  2.5 %).  The measured offset also corrects the level for the window's response.
* **Level**: each tone above about -40 dBm0.
* **Twist**: the high-group tone at most 8 dB below the low-group tone (normal twist) and at
  most 4 dB above it (reverse twist).
* **Purity**: the two tones hold at least 80 % of the frame's energy, each beats the other
  tones of its group by 6 dB, and no second harmonic carries more than 6 % of the energy;
  speech and music spread energy over harmonics and formants and fail these.
* **Timing**: a digit is a run of frames with the same key; its edges are where its level is
  within 3 dB of the run's peak, so the measured duration does not depend on the level.
  Tones of 40 ms and longer are always accepted, under 30 ms never.  Two frames 10 dB
  below the key's peak (a pause of 40 ms always gives that) end the digit, so a repeated
  key needs a real pause; an interruption of about 10 ms, where the frames stay loud but
  lose the key, is bridged.  Sparse hits do not make a digit: at least half of a run's
  frames must be the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

RATE = 8000
FRAME = 205
HOP = 40
LOW_GROUP = (697.0, 770.0, 852.0, 941.0)
HIGH_GROUP = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = "123A456B789C*0#D"

FREQ_TOLERANCE = 0.025
MIN_TONE_POWER = 2.0e4  # a sine of amplitude 200 (about -40 dBm0 in G.711's range)
NORMAL_TWIST_DB = 8.0
REVERSE_TWIST_DB = 4.0
MIN_RELATIVE_ENERGY = 0.8
GROUP_DOMINANCE = 4.0  # 6 dB
MAX_HARMONIC_SHARE = 0.06
MIN_TONE_SAMPLES = 300  # 37.5 ms of measured length
MAX_QUIET = 2  # frames 10 dB below the key's peak: a pause (40 ms of silence gives 2)
QUIET = 0.1
MAX_BRIDGE = 8  # loud frames without the key: interruptions of about 10 ms are bridged
MAX_RUN_FRAMES = 4000  # 20 s of frames; bounds memory for a stuck key
#: Frames at a tone's edges reach half the run's peak power when about 70 % of the Hann
#: window's weight lies inside the tone (measured: the first such frame starts one hop
#: before the tone); these turn the first/last such frame into the tone's start and length.
_LEAD = HOP
_TAIL = 2 * HOP + HOP // 2

_FREQS = np.array(LOW_GROUP + HIGH_GROUP)
_ALL_FREQS = np.concatenate([_FREQS, 2 * _FREQS])
_WINDOW = np.hanning(FRAME + 2)[1:-1]
_BASIS = _WINDOW[:, None] * np.exp(-2j * np.pi * np.outer(np.arange(FRAME), _ALL_FREQS) / RATE)
#: The complex basis as real and imaginary columns side by side: one single-precision real
#: matrix product (what BLAS does fastest) yields every bin of every frame.
_BASIS_RI = np.concatenate([_BASIS.real, _BASIS.imag], axis=1).astype(np.float32)
_BINS = len(_ALL_FREQS)
_POWER_SCALE = 2.0 / float(_WINDOW.sum()) ** 2
_ENERGY_WEIGHTS = (_WINDOW**2 / float((_WINDOW**2).sum())).astype(np.float32)
#: The window-response correction multiplies a bin's power by at most 1 / 0.3**2.
_MAX_CORRECTION = 1 / 0.3**2
_EXPECTED_ADVANCE = 2 * np.pi * _FREQS * HOP / RATE


@dataclass(frozen=True, slots=True)
class ToneDigit:
    """One key press heard in the audio: sample positions of the channel's stream."""

    digit: str
    start: int
    duration: int


def _hann_response(bins: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Amplitude response of the Hann window ``bins`` DFT bins off centre (1 at 0)."""
    denom = 1.0 - bins**2
    near = np.abs(denom) < 1e-6
    safe = np.where(near, 1.0, denom)
    return np.where(near, 0.5, np.sinc(bins) / safe)


@dataclass(slots=True)
class _Run:
    key: int
    frames: list[int] = field(default_factory=list)
    powers: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    quiet: int = 0
    peak: float = 0.0


class InbandDtmfDetector:
    """Feed one channel's decoded samples in order; get the digits whose tone has ended."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)
        self._frame0 = 0  # index of the frame starting at the head of ``_buf``
        self._prev: npt.NDArray[np.complex128] | None = None
        self._run: _Run | None = None
        self.samples = 0

    def feed(self, samples: npt.NDArray[np.int16]) -> list[ToneDigit]:
        self.samples += len(samples)
        buf = np.concatenate([self._buf, samples.astype(np.float32)])
        count = (len(buf) - FRAME) // HOP + 1 if len(buf) >= FRAME else 0
        if count <= 0:
            self._buf = buf
            return []
        frames = np.ascontiguousarray(
            np.lib.stride_tricks.sliding_window_view(buf, FRAME)[::HOP][:count]
        )
        keys, powers, totals = self._classify(frames)
        first = self._frame0
        self._buf = buf[count * HOP :]
        self._frame0 += count
        if self._run is None and not (keys >= 0).any():
            return []
        out: list[ToneDigit] = []
        for i in range(count):
            self._step(first + i, int(keys[i]), float(powers[i]), float(totals[i]), out)
        return out

    def flush(self) -> list[ToneDigit]:
        """The stream ended: report a tone still sounding (it ended with the audio)."""
        out: list[ToneDigit] = []
        if self._run is not None:
            self._close(out)
        return out

    def _classify(
        self, frames: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Key index per frame (-1: none), the pair's level and the frame's mean power.

        Tests that need no phase run on every frame and admit the few candidates (a pair
        dominating its groups, loud enough, holding enough of the energy even after the
        largest possible window correction); the phase, frequency, twist and harmonic tests
        run on those only.
        """
        ri = frames @ _BASIS_RI
        re, im = ri[:, :_BINS], ri[:, _BINS:]
        power = (re * re + im * im) * np.float32(_POWER_SCALE)
        total = ((frames * frames) @ _ENERGY_WEIGHTS).astype(np.float64)
        count = len(frames)
        fund = re[:, :8].astype(np.complex128)
        fund.imag = im[:, :8]
        prev_last = self._prev
        self._prev = fund[-1].copy()
        low = np.argmax(power[:, :4], axis=1)
        high = np.argmax(power[:, 4:8], axis=1) + 4
        rows = np.arange(count)
        raw_low = power[rows, low]
        raw_high = power[rows, high]
        others_low = np.partition(power[:, :4], 2, axis=1)[:, 2]
        others_high = np.partition(power[:, 4:8], 2, axis=1)[:, 2]
        candidate = (
            (raw_low >= GROUP_DOMINANCE * others_low)
            & (raw_high >= GROUP_DOMINANCE * others_high)
            & (raw_low * _MAX_CORRECTION >= MIN_TONE_POWER)
            & (raw_high * _MAX_CORRECTION >= MIN_TONE_POWER)
            & ((raw_low + raw_high) * _MAX_CORRECTION >= MIN_RELATIVE_ENERGY * total)
        )
        keys = np.full(count, -1, dtype=np.int64)
        levels = np.zeros(count)
        idx = np.nonzero(candidate)[0]
        if not len(idx):
            return keys, levels, total
        low, high = low[idx], high[idx]
        pick = np.stack([low, high], axis=1)
        current = np.take_along_axis(fund[idx], pick, axis=1)
        before = np.zeros_like(current)
        inner = idx > 0
        before[inner] = np.take_along_axis(fund[idx[inner] - 1], pick[inner], axis=1)
        if not inner[0] and prev_last is not None:
            before[0] = prev_last[pick[0]]
        advance = np.angle(current * np.conj(before)) - _EXPECTED_ADVANCE[pick]
        advance = (advance + np.pi) % (2 * np.pi) - np.pi
        offset_hz = advance * RATE / (2 * np.pi * HOP)
        response = _hann_response(offset_hz * FRAME / RATE)
        raw = np.stack([raw_low[idx], raw_high[idx]], axis=1).astype(np.float64)
        corrected = raw / np.maximum(response, 0.3) ** 2
        p_low, p_high = corrected[:, 0], corrected[:, 1]
        sub_total = total[idx]
        deviation = np.abs(offset_hz) / _FREQS[pick]
        # The low tone's second harmonic (1394-1882 Hz) lies a bin or two from some high
        # tones, whose window leakage into that bin is not a harmonic: allow for it.
        high_hz = _FREQS[high] + offset_hz[:, 1]
        leak = p_high * _hann_response((2 * _FREQS[low] - high_hz) * FRAME / RATE) ** 2
        harmonic_room = (np.sqrt(MAX_HARMONIC_SHARE * sub_total) + np.sqrt(leak)) ** 2
        sub_power = power[idx]
        sub_rows = np.arange(len(idx))
        ok = (
            (p_low >= MIN_TONE_POWER)
            & (p_high >= MIN_TONE_POWER)
            & (p_low + p_high >= MIN_RELATIVE_ENERGY * sub_total)
            & (deviation[:, 0] <= FREQ_TOLERANCE)
            & (deviation[:, 1] <= FREQ_TOLERANCE)
            & (p_low <= p_high * 10 ** (NORMAL_TWIST_DB / 10))
            & (p_high <= p_low * 10 ** (REVERSE_TWIST_DB / 10))
            & (sub_power[sub_rows, low + 8] <= harmonic_room)
            & (sub_power[sub_rows, high + 8] <= MAX_HARMONIC_SHARE * sub_total)
        )
        keys[idx] = np.where(ok, low * 4 + (high - 4), -1)
        levels[idx] = p_low + p_high
        return keys, levels, total

    def _step(self, frame: int, key: int, power: float, total: float, out: list[ToneDigit]) -> None:
        run = self._run
        if key >= 0:
            if run is not None and run.key != key:
                self._close(out)
                run = None
            if run is None:
                run = self._run = _Run(key)
            if len(run.frames) < MAX_RUN_FRAMES:
                run.frames.append(frame)
                run.powers.append(power)
            else:  # a tone held for minutes: keep its head and its latest frame only
                run.frames[-1] = frame
                run.powers[-1] = power
            run.hits += 1
            run.misses = 0
            run.quiet = 0
            run.peak = max(run.peak, power)
        elif run is not None:
            # A pause is signal gone quiet; a frame that is loud but not the key (a dropout
            # spreads the tones' spectrum) ends the key press only if it lasts.
            if total < QUIET * run.peak:
                run.quiet += 1
            run.misses += 1
            if run.quiet >= MAX_QUIET or run.misses > MAX_BRIDGE:
                self._close(out)

    def _close(self, out: list[ToneDigit]) -> None:
        run = self._run
        assert run is not None
        self._run = None
        floor = max(run.powers) / 2
        strong = [f for f, p in zip(run.frames, run.powers, strict=True) if p >= floor]
        first, last = strong[0], strong[-1]
        duration = (last - first + 1) * HOP + _TAIL
        if duration >= MIN_TONE_SAMPLES and 2 * run.hits >= last - first + 1:
            out.append(ToneDigit(KEYS[run.key], first * HOP + _LEAD, duration))


__all__ = ["FRAME", "HIGH_GROUP", "HOP", "KEYS", "LOW_GROUP", "InbandDtmfDetector", "ToneDigit"]
