"""Streaming stereo WAV writer: RIFF/WAVE below 4 GiB, RF64 (EBU Tech 3306) beyond.

A recording is written block by block as the call runs, so its final size is unknown when
the file is opened.  libsndfile handles this with ``SFC_RF64_AUTO_DOWNGRADE``: the file is
opened as RF64 (a JUNK chunk reserves room for the ds64 chunk) and rewritten as a plain
RIFF header at close if it stayed under the 4 GiB limit of 32-bit RIFF sizes.  So ordinary
calls give ordinary WAV files that every tool reads, and a 74-hour call stays correct.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile

from callcap.errors import StorageError

SFC_RF64_AUTO_DOWNGRADE = 0x1210
RIFF_LIMIT = 0xFFFFFFFF


class WavWriter:
    """Appends int16 frames to a 16-bit PCM file; ``flush`` makes them durable."""

    def __init__(self, path: Path, *, sample_rate: int = 8000, channels: int = 2) -> None:
        self.path = path
        self.channels = channels
        self._frames = 0
        self._format: str | None = None
        try:
            self._file = soundfile.SoundFile(
                str(path),
                "w",
                samplerate=sample_rate,
                channels=channels,
                subtype="PCM_16",
                format="RF64",
            )
        except (OSError, RuntimeError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
            raise StorageError(f"cannot create {path}: {exc}") from exc
        ffi = soundfile._ffi
        soundfile._snd.sf_command(self._file._file, SFC_RF64_AUTO_DOWNGRADE, ffi.NULL, 1)

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def format(self) -> str:
        """``WAV`` or ``RF64``: what the header says (final once the writer is closed)."""
        if self._format is not None:
            return self._format
        return "RF64" if self._projected_bytes() > RIFF_LIMIT else "WAV"

    def _projected_bytes(self) -> int:
        return 80 + self._frames * self.channels * 2

    def write(self, frames: npt.NDArray[np.int16]) -> None:
        if frames.ndim != 2 or frames.shape[1] != self.channels or frames.dtype != np.int16:
            shape = f"(n, {self.channels})"
            raise StorageError(
                f"expected int16 frames of shape {shape}, got {frames.dtype} {frames.shape}"
            )
        if len(frames) == 0:
            return
        try:
            self._file.write(frames)
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot write {self.path}: {exc}") from exc
        self._frames += len(frames)

    def flush(self) -> None:
        """Push audio to the disk (the spool's once-a-second guarantee).

        python-soundfile's ``flush`` is libsndfile's ``sf_write_sync``, which updates the
        header and calls fsync(2) on the file.
        """
        try:
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot flush {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.close()
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot close {self.path}: {exc}") from exc
        with self.path.open("rb") as f:
            magic = f.read(4)
        self._format = "RF64" if magic == b"RF64" else "WAV"

    @property
    def closed(self) -> bool:
        return bool(self._file.closed)
