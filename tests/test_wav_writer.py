"""Streaming WAV writer: plain RIFF for ordinary calls, RF64 past 4 GiB, durable on flush."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile

from callcap.errors import StorageError
from callcap.storage.wav import WavWriter

_RIFF = struct.Struct("<4sI4s")
_DS64 = struct.Struct("<4sIQQQI")


def _stereo(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, (n, 2), dtype=np.int16)


def _chunks(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Chunk id → (offset of its body, size), walking a RIFF/RF64 file's top level."""
    out, pos = {}, 12
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        out[cid] = (pos + 8, size)
        if cid == b"data":
            break
        pos += 8 + size + (size & 1)
    return out


def test_small_recording_is_plain_riff_pcm_readable_by_stdlib_wave(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    frames = _stereo(12_345)
    writer = WavWriter(path)
    writer.write(frames)
    writer.close()
    assert (writer.format, writer.frames) == ("WAV", 12_345)

    data = path.read_bytes()
    assert _RIFF.unpack_from(data) == (b"RIFF", len(data) - 8, b"WAVE")
    chunks = _chunks(data)
    fmt_at, fmt_size = chunks[b"fmt "]
    # WAVE_FORMAT_PCM, 2 ch, 8000 Hz, 32000 B/s, block 4, 16 bit — not WAVE_FORMAT_EXTENSIBLE.
    assert (fmt_size, struct.unpack_from("<HHIIHH", data, fmt_at)) == (
        16,
        (1, 2, 8000, 32000, 4, 16),
    )
    data_at, data_size = chunks[b"data"]
    assert data_size == 12_345 * 4
    assert data[data_at:] == frames.tobytes()

    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        assert w.getnframes() == 12_345
        via_wave = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    via_sndfile, rate = soundfile.read(path, dtype="int16")
    assert rate == 8000
    assert np.array_equal(via_wave, frames)
    assert np.array_equal(via_sndfile, frames)
    assert soundfile.info(str(path)).format == "WAV"


def test_many_small_blocks_give_the_same_file_as_one_block(tmp_path: Path) -> None:
    frames = _stereo(8000 * 3, seed=7)
    one, many = tmp_path / "one.wav", tmp_path / "many.wav"
    w = WavWriter(one)
    w.write(frames)
    w.close()
    w = WavWriter(many)
    for start in range(0, len(frames), 160):  # 20 ms packets
        w.write(frames[start : start + 160])
        if start % 8000 == 0:
            w.flush()
    w.close()
    assert many.read_bytes() == one.read_bytes()


def test_flush_puts_audio_on_disk_before_close(tmp_path: Path) -> None:
    path = tmp_path / "live.wav.part"
    writer = WavWriter(path)
    writer.write(_stereo(8000))
    writer.flush()
    first = path.stat().st_size
    assert first >= 8000 * 4
    writer.write(_stereo(8000, seed=2))
    writer.flush()
    assert path.stat().st_size == first + 8000 * 4
    # A spool file left by a crash right now is a readable WAV up to the last flush.
    info = soundfile.info(str(path))
    assert (info.frames, info.channels) == (16000, 2)
    assert np.array_equal(soundfile.read(path, dtype="int16")[0][8000:], _stereo(8000, seed=2))
    writer.close()


def test_empty_recording_is_a_valid_zero_length_wav(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    writer = WavWriter(path)
    writer.write(np.zeros((0, 2), dtype=np.int16))
    writer.close()
    writer.close()  # idempotent
    with wave.open(str(path), "rb") as w:
        assert w.getnframes() == 0
    assert (writer.format, writer.frames, writer.closed) == ("WAV", 0, True)


def test_file_mode_is_applied_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "m.wav"
    WavWriter(path, file_mode=0o600).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_wrong_shape_or_dtype_is_refused(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "x.wav")
    with pytest.raises(StorageError, match="int16 frames of shape"):
        writer.write(np.zeros((10, 1), dtype=np.int16))
    with pytest.raises(StorageError, match="int16 frames of shape"):
        writer.write(np.zeros((10, 2), dtype=np.float32))
    writer.close()
    assert writer.frames == 0


def test_unwritable_path_raises_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot create"):
        WavWriter(tmp_path / "missing-dir" / "x.wav")


@pytest.mark.slow
def test_recording_past_4_gib_is_rf64_with_a_ds64_chunk(tmp_path: Path) -> None:
    """2**30 frames = 4 GiB of samples: past the RIFF limit, so RF64 (EBU Tech 3306).

    ~10 s (page cache).  ``sox --i`` also reads such a file correctly, but it scans all of
    it (~1 min), so it is not part of the test.
    """
    path = tmp_path / "long.wav"
    block = np.zeros((1 << 24, 2), dtype=np.int16)  # 64 MiB
    tail = _stereo(1000, seed=3)
    blocks = 64
    try:
        writer = WavWriter(path)
        for i in range(blocks):
            writer.write(block)
            if i == blocks - 1:
                writer.flush()  # header update past 4 GiB must not break the file
        writer.write(tail)
        assert writer.format == "RF64"
        writer.close()
        frames = blocks * len(block) + len(tail)
        assert (writer.format, writer.frames) == ("RF64", frames)

        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(512)
            f.seek(size - tail.nbytes)
            end = f.read()
        assert _RIFF.unpack_from(head) == (b"RF64", 0xFFFFFFFF, b"WAVE")
        ds64, ds64_size, riff_size, data_size, sample_count, table = _DS64.unpack_from(head, 12)
        assert (ds64, ds64_size, table) == (b"ds64", 28, 0)
        assert riff_size == size - 8
        assert data_size == frames * 4
        assert sample_count == frames
        data_at, data_size32 = _chunks(head)[b"data"]
        assert data_size32 == 0xFFFFFFFF  # "see ds64"
        assert data_at + data_size == size
        assert end == tail.tobytes()

        info = soundfile.info(str(path))
        assert (info.format, info.frames, info.channels) == ("RF64", frames, 2)
        with soundfile.SoundFile(str(path)) as sf:
            sf.seek(frames - len(tail))
            assert np.array_equal(sf.read(dtype="int16"), tail)
    finally:
        path.unlink(missing_ok=True)
