"""In-band DTMF detection: keypad tones in audio are found once, with their timing, and
nothing else is (ITU-T Q.24 frequency, twist and timing limits; speech gives no digits)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
from sipp_harness import make_speech

from callcap.codecs.g711 import decode_alaw, decode_ulaw, encode_alaw, encode_ulaw
from callcap.codecs.inband import HIGH_GROUP, KEYS, LOW_GROUP, InbandDtmfDetector, ToneDigit

RATE = 8000


def key_tone(
    digit: str,
    ms: float,
    *,
    amplitude: float = 6000.0,
    deviation: float = 0.0,
    twist_db: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Both tones of a key; ``twist_db`` is the high tone's level relative to the low one."""
    i = KEYS.index(digit)
    low, high = LOW_GROUP[i // 4], HIGH_GROUP[i % 4]
    t = np.arange(round(ms * RATE / 1000)) / RATE
    return amplitude * np.sin(2 * np.pi * low * (1 + deviation) * t) + amplitude * 10 ** (
        twist_db / 20
    ) * np.sin(2 * np.pi * high * (1 + deviation) * t)


def silence(ms: float) -> npt.NDArray[np.float64]:
    return np.zeros(round(ms * RATE / 1000))


def pcm(*parts: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.concatenate(parts), -32768, 32767).astype(np.int16)


def detect(samples: npt.NDArray[np.int16], block: int = 8000) -> list[ToneDigit]:
    det = InbandDtmfDetector()
    out: list[ToneDigit] = []
    for i in range(0, len(samples), block):
        out += det.feed(samples[i : i + block])
    return out + det.flush()


def keyed(
    sequence: str, *, tone_ms: float = 80, gap_ms: float = 70, **kw: float
) -> tuple[npt.NDArray[np.int16], list[int]]:
    """A key sequence with known tone starts (samples), after 100 ms of silence."""
    parts = [silence(100)]
    starts = []
    pos = len(parts[0])
    for digit in sequence:
        starts.append(pos)
        tone = key_tone(digit, tone_ms, **kw)
        parts += [tone, silence(gap_ms)]
        pos += len(tone) + round(gap_ms * RATE / 1000)
    return pcm(*parts), starts


def test_all_sixteen_keys_are_found_with_start_and_duration() -> None:
    audio, starts = keyed(KEYS)
    found = detect(audio)
    assert "".join(d.digit for d in found) == KEYS
    for digit, start in zip(found, starts, strict=True):
        assert abs(digit.start - start) <= 24  # 3 ms
        assert abs(digit.duration - 640) <= 40  # 80 ms ± 5 ms


@pytest.mark.parametrize("block", [1, 37, 160, 205, 999])
def test_a_tone_split_over_blocks_is_found_once_whatever_the_block_size(block: int) -> None:
    audio, _ = keyed("5#9")
    whole = detect(audio, block=len(audio))
    assert [d.digit for d in whole] == ["5", "#", "9"]
    assert detect(audio, block=block) == whole


def test_random_block_sizes_give_the_same_digits() -> None:
    audio, _ = keyed("0123456789")
    rng = np.random.default_rng(7)
    det = InbandDtmfDetector()
    out: list[ToneDigit] = []
    pos = 0
    while pos < len(audio):
        n = int(rng.integers(1, 700))
        out += det.feed(audio[pos : pos + n])
        pos += n
    assert out + det.flush() == detect(audio)


def sox_key(tmp: Path, digit: str, seconds: float) -> npt.NDArray[np.int16]:
    i = KEYS.index(digit)
    out = tmp / f"key{i}.wav"
    subprocess.run(
        [
            "sox",
            "-n",
            "-r",
            "8000",
            "-b",
            "16",
            "-c",
            "1",
            str(out),
            "synth",
            str(seconds),
            "sine",
            str(LOW_GROUP[i // 4]),
            "sine",
            str(HIGH_GROUP[i % 4]),
            "vol",
            "0.5",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    samples, rate = soundfile.read(str(out), dtype="int16")
    assert rate == RATE
    return np.asarray(samples, dtype=np.int16)


def test_keys_synthesised_by_sox_are_found(tmp_path: Path) -> None:
    parts = []
    for digit in KEYS:
        parts += [silence(60), sox_key(tmp_path, digit, 0.1).astype(np.float64)]
    found = detect(pcm(*parts, silence(60)))
    assert "".join(d.digit for d in found) == KEYS
    assert all(abs(d.duration - 800) <= 40 for d in found)


@pytest.mark.parametrize(
    ("encode", "decode"), [(encode_ulaw, decode_ulaw), (encode_alaw, decode_alaw)]
)
def test_keys_survive_a_g711_round_trip(encode: object, decode: object) -> None:
    audio, starts = keyed(KEYS, amplitude=3000)
    wire = encode(audio)  # type: ignore[operator]
    found = detect(decode(wire))  # type: ignore[operator]
    assert "".join(d.digit for d in found) == KEYS
    assert [abs(d.start - s) <= 24 for d, s in zip(found, starts, strict=True)]


@pytest.mark.parametrize("deviation", [0.015, -0.015])
def test_tones_within_1_5_percent_are_accepted(deviation: float) -> None:
    audio, _ = keyed(KEYS, deviation=deviation)
    assert "".join(d.digit for d in detect(audio)) == KEYS


@pytest.mark.parametrize("deviation", [0.035, -0.035, 0.05, -0.06])
def test_tones_beyond_3_5_percent_are_rejected(deviation: float) -> None:
    audio, _ = keyed(KEYS, deviation=deviation)
    assert detect(audio) == []


@pytest.mark.parametrize("ms", [10, 20, 25, 30])
def test_tones_shorter_than_q24_minimum_are_rejected(ms: float) -> None:
    for offset in range(0, 40, 7):  # every alignment against the analysis frames
        audio = pcm(silence(50), np.zeros(offset), key_tone("7", ms), silence(50))
        assert detect(audio) == []


@pytest.mark.parametrize("ms", [40, 45, 60])
def test_tones_of_40_ms_and_longer_are_accepted(ms: float) -> None:
    for offset in range(0, 40, 7):
        audio = pcm(silence(50), np.zeros(offset), key_tone("7", ms), silence(50))
        (digit,) = detect(audio)
        assert digit.digit == "7"
        assert abs(digit.start - 400 - offset) <= 24
        assert abs(digit.duration - ms * 8) <= 40


def test_a_40_ms_pause_separates_a_repeated_key_and_a_10_ms_dropout_does_not() -> None:
    repeated = pcm(silence(50), key_tone("3", 60), silence(40), key_tone("3", 60), silence(50))
    assert [d.digit for d in detect(repeated)] == ["3", "3"]
    tone = key_tone("3", 120)
    tone[480:560] = 0  # a 10 ms interruption inside one key press
    (digit,) = detect(pcm(silence(50), tone, silence(50)))
    assert abs(digit.duration - 960) <= 40


@pytest.mark.parametrize(("twist_db", "accepted"), [(-7, True), (-9, False), (3, True), (5, False)])
def test_twist_limits_normal_8_db_reverse_4_db(twist_db: float, accepted: bool) -> None:
    audio, _ = keyed(KEYS, amplitude=4000, twist_db=twist_db)
    found = "".join(d.digit for d in detect(audio))
    assert found == (KEYS if accepted else "")


def test_single_tones_and_quiet_keys_are_not_digits() -> None:
    t = np.arange(RATE) / RATE
    lone = 6000 * np.sin(2 * np.pi * 697 * t)
    assert detect(pcm(lone)) == []
    audio, _ = keyed("159", amplitude=120)  # below -40 dBm0
    assert detect(audio) == []


@pytest.mark.parametrize("snr_db", [20, 12])
def test_keys_are_found_in_noise_at_moderate_snr(snr_db: float) -> None:
    audio, _ = keyed(KEYS, tone_ms=100, gap_ms=80, amplitude=4000)
    signal_power = 4000**2  # two tones of amplitude A: A**2 / 2 each
    rng = np.random.default_rng(3)
    noise = rng.normal(0, np.sqrt(signal_power / 10 ** (snr_db / 10)), len(audio))
    found = detect(pcm(audio.astype(np.float64) + noise))
    assert "".join(d.digit for d in found) == KEYS


def test_white_noise_alone_gives_no_digits() -> None:
    noise = np.random.default_rng(11).normal(0, 4000, 60 * RATE)
    assert detect(pcm(noise)) == []


SPEECH = (
    "Thank you for calling. Your call may be recorded for quality and training purposes. "
    "Please have your account number ready. For billing questions, press one; for technical "
    "support, press two; to hear these options again, stay on the line. The weather today is "
    "mostly sunny with a light breeze from the west, and temperatures around twenty degrees. "
    "Could you please spell your surname and tell me the date of your last payment? "
    "Seven hundred and thirty-two, one thousand two hundred and nine, nine, four, one, eight. "
    "Hmmm, aaaah, eeeee, ooooo, mmmm, nnnnn, ssssh, zzzz, a long steady vowel sound. "
)

VOICES = [
    ("en-us", 160, 50),
    ("en-gb+f3", 120, 70),
    ("en+m3", 220, 30),
    ("de", 140, 60),
    ("fr+f2", 180, 80),
    ("es", 100, 40),
    ("it+m1", 260, 55),
    ("en-us+f4", 90, 99),
]


def espeak(tmp: Path, voice: str, speed: int, pitch: int) -> npt.NDArray[np.int16]:
    return make_speech(SPEECH, tmp, voice=voice, speed=speed, pitch=pitch)


def test_minutes_of_varied_speech_give_no_digits(tmp_path: Path) -> None:
    total = 0
    for voice, speed, pitch in VOICES:
        speech = espeak(tmp_path, voice, speed, pitch)
        total += len(speech)
        # loud and through µ-law, as it would arrive from a phone
        loud = np.clip(speech.astype(np.float64) * 2.5, -32768, 32767).astype(np.int16)
        assert detect(speech) == [], voice
        assert detect(decode_ulaw(encode_ulaw(loud))) == [], voice
    assert total >= 3 * 60 * RATE  # several minutes of speech


def test_a_key_pressed_over_speech_is_still_found(tmp_path: Path) -> None:
    speech = espeak(tmp_path, "en-us", 160, 50)[: 3 * RATE].astype(np.float64) * 0.3
    speech[RATE : RATE + 800] += key_tone("8", 100, amplitude=5000)
    found = detect(pcm(speech))
    assert [d.digit for d in found] == ["8"]
    assert abs(found[0].start - RATE) <= 24


def music(seconds: float, seed: int) -> npt.NDArray[np.int16]:
    """Chords and a melody of harmonic notes (equal temperament, decaying like a plucked or
    bowed string).  Two bare sines a keypad pair apart *are* a DTMF key, so notes carry
    the overtones real instruments have."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    out = np.zeros(n)
    note_len = 2000  # 250 ms
    t = np.arange(note_len) / RATE
    for start in range(0, n - note_len, note_len):
        root = 220 * 2 ** (int(rng.integers(0, 30)) / 12)
        chord = [root, root * 2 ** (4 / 12), root * 2 ** (7 / 12)]
        melody = [root * 2 ** (int(rng.integers(12, 30)) / 12)]
        decay = np.exp(-t * float(rng.uniform(2, 10)))
        for f in chord + melody:
            for k in range(1, 9):
                if k * f < RATE / 2:
                    out[start : start + note_len] += (
                        1800 / k * decay * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 6.3))
                    )
    return np.clip(out, -32768, 32767).astype(np.int16)


def test_minutes_of_music_give_no_digits() -> None:
    for seed in range(4):
        tune = music(30.0, seed)
        assert detect(tune) == [], seed
        assert detect(decode_alaw(encode_alaw(tune))) == [], seed
