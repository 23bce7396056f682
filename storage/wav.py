"""Streaming stereo WAV writer: RIFF/WAVE below 4 GiB, RF64 (EBU Tech 3306) beyond.

A recording is written block by block as the call runs, so its final size is unknown when
the file is opened.  libsndfile handles this with ``SFC_RF64_AUTO_DOWNGRADE``: the file is
opened as RF64 (a JUNK chunk reserves room for the ds64 chunk) and rewritten as a plain
RIFF header at close if it stayed under the 4 GiB limit of 32-bit RIFF sizes.  So ordinary
calls give ordinary WAV files that every tool reads, and a 74-hour call stays correct.

libsndfile's RF64 writer always describes the samples with a WAVE_FORMAT_EXTENSIBLE ``fmt ``
chunk, which simple readers (Python's ``wave`` before 3.12, many embedded players) reject.
For 16-bit stereo it carries nothing a plain ``WAVE_FORMAT_PCM`` chunk doesn't, so after a
downgrade :meth:`WavWriter.close` rewrites it in place as a 16-byte PCM ``fmt `` chunk
followed by a JUNK chunk covering the freed bytes: the data offset does not move.  (RF64
files keep the extensible chunk: every RF64 reader understands it.)
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import soundfile

from callcap.errors import StorageError, storage_error

SFC_UPDATE_HEADER_NOW = 0x1060
SFC_RF64_AUTO_DOWNGRADE = 0x1210
RIFF_LIMIT = 0xFFFFFFFF
"""Largest RIFF chunk size; libsndfile keeps RF64 for files of this length or more."""

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
KSDATAFORMAT_SUBTYPE_PCM = bytes.fromhex("0100000000001000800000aa00389b71")

_CHUNK = struct.Struct("<4sI")
_FMT_PCM = struct.Struct("<HHIIHH")
_FMT_EXT = struct.Struct("<HHIIHHHHI16s")
_HEADER_SCAN = 512  # libsndfile's header is 112 bytes; fmt is always within the first chunks


class WavWriter:
    """Appends int16 frames to a 16-bit PCM file; ``flush`` makes them durable."""

    def __init__(
        self,
        path: Path,
        *,
        sample_rate: int = 8000,
        channels: int = 2,
        file_mode: int | None = None,
    ) -> None:
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
        if soundfile._snd.sf_command(self._file._file, SFC_RF64_AUTO_DOWNGRADE, ffi.NULL, 1) != 1:
            self._file.close()
            raise StorageError(f"libsndfile refused SFC_RF64_AUTO_DOWNGRADE for {path}")
        if file_mode is not None:
            try:
                os.chmod(path, file_mode)
            except OSError as exc:
                self._file.close()
                raise StorageError(f"cannot chmod {path}: {exc.strerror or exc}") from exc

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def format(self) -> str:
        """``WAV`` or ``RF64``: what the header says (final once the writer is closed)."""
        if self._format is not None:
            return self._format
        return "RF64" if self._projected_bytes() >= RIFF_LIMIT else "WAV"

    @property
    def closed(self) -> bool:
        return bool(self._file.closed)

    def _projected_bytes(self) -> int:
        return 112 + self._frames * self.channels * 2  # libsndfile's RF64 header is 112 bytes

    def write(self, frames: npt.NDArray[np.int16]) -> None:
        """Append ``frames`` (int16, shape ``(n, channels)``)."""
        if frames.ndim != 2 or frames.shape[1] != self.channels or frames.dtype != np.int16:
            shape = f"(n, {self.channels})"
            raise StorageError(
                f"expected int16 frames of shape {shape}, got {frames.dtype} {frames.shape}"
            )
        n = len(frames)
        if n == 0:
            return
        # Straight to libsndfile's sf_writef_short: SoundFile.write spends longer checking
        # and converting its argument in Python than the C call takes to copy a second of
        # audio, and it is called once a second for every call in progress.
        frames = np.ascontiguousarray(frames)
        if self._file.closed:
            raise StorageError(f"cannot write {self.path}: file is closed")
        written = soundfile._snd.sf_writef_short(
            self._file._file, soundfile._ffi.from_buffer("short[]", frames), n
        )
        if written != n:
            code = soundfile._ffi.errno  # the C errno of the failed write(2)
            error = soundfile._ffi.string(soundfile._snd.sf_strerror(self._file._file))
            # The frames that did reach the file are part of it: the caller's timeline
            # must go on from there, not from where it asked to be.
            self._frames += max(0, int(written))
            raise storage_error(
                f"cannot write {self.path}: {error.decode('utf-8', 'replace')}"
                f" ({written} of {n} frames written)",
                code,
            )
        self._frames += n

    def flush(self, *, sync: bool = True) -> None:
        """Commit everything written so far: the spool's once-a-second guarantee.

        libsndfile writes PCM straight through to the file descriptor, so there is no
        user-space buffer to drain; ``SFC_UPDATE_HEADER_NOW`` rewrites the sizes in the header
        (a spool file left by a crash is then a readable WAV up to the last flush).  With
        ``sync`` the file is also fsynced (python-soundfile's ``flush`` is ``sf_write_sync``);
        without, it survives a process crash at once and a power cut from the next sync of
        the filesystem (the daemon syncs the spool's filesystem once per flush interval
        instead of fsyncing every call's file).
        """
        try:
            soundfile._snd.sf_command(
                self._file._file, SFC_UPDATE_HEADER_NOW, soundfile._ffi.NULL, 0
            )
            if sync:
                self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot flush {self.path}: {exc}") from exc

    def close(self) -> None:
        """Finalise the header (RIFF or RF64); idempotent."""
        if self._file.closed:
            return
        try:
            self._file.close()
            with self.path.open("r+b") as f:
                magic = f.read(4)
                if magic == b"RIFF":
                    _tidy_riff_header(f)
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot close {self.path}: {exc}") from exc
        self._format = "RF64" if magic == b"RF64" else "WAV"


def _tidy_riff_header(f: BinaryIO) -> None:
    """Fix up a downgraded file's header in place so the simplest readers accept it.

    * The RIFF size: libsndfile 1.2.2 writes 8 too few for a file with no frames, which puts
      the (empty) data chunk outside the RIFF chunk.
    * An extensible PCM ``fmt `` chunk becomes ``WAVE_FORMAT_PCM`` + JUNK.  Only a chunk
      that is exactly what libsndfile writes for integer PCM (size 40, subformat
      KSDATAFORMAT_SUBTYPE_PCM, valid bits = container bits) is touched; anything else is
      left alone, since it is still a valid WAVE file.
    """
    f.seek(0, os.SEEK_END)
    riff_size = f.tell() - 8
    f.seek(0)
    head = f.read(_HEADER_SCAN)
    if riff_size <= RIFF_LIMIT and _CHUNK.unpack_from(head)[1] != riff_size:
        f.seek(4)
        f.write(struct.pack("<I", riff_size))
    pos = 12
    while pos + _CHUNK.size <= len(head):
        cid, size = _CHUNK.unpack_from(head, pos)
        if cid == b"data":
            break
        if cid == b"fmt ":
            if size != _FMT_EXT.size or pos + 8 + size > len(head):
                break
            tag, chans, rate, byte_rate, align, bits, cb, valid, _mask, guid = _FMT_EXT.unpack_from(
                head, pos + 8
            )
            if tag != WAVE_FORMAT_EXTENSIBLE or cb != 22 or valid != bits:
                break
            if guid != KSDATAFORMAT_SUBTYPE_PCM or chans > 2:
                break
            fmt = _FMT_PCM.pack(WAVE_FORMAT_PCM, chans, rate, byte_rate, align, bits)
            junk_size = size - _FMT_PCM.size - _CHUNK.size
            patch = (
                _CHUNK.pack(b"fmt ", _FMT_PCM.size)
                + fmt
                + _CHUNK.pack(b"JUNK", junk_size)
                + bytes(junk_size)
            )
            f.seek(pos)
            f.write(patch)
            break
        pos += _CHUNK.size + size + (size & 1)
    f.flush()  # durable when published: publish_file fsyncs the file before renaming it


_DS64 = struct.Struct("<QQQI")  # RIFF size, data size, sample count, table length (EBU 3306)
_RF64_PLACEHOLDER = 0xFFFFFFFF


def recover_spooled_wav(path: Path) -> tuple[int, str]:
    """Turn a spool file left by a dead writer into a complete WAV; return (frames, format).

    What survives is "audio up to the last flush", and the header is what says how much
    that is: :meth:`WavWriter.flush` rewrites the header and then fsyncs, so the frame count
    in the header is exactly what was durable at the last flush.  Bytes beyond it were
    written after that flush; after a power cut they may be missing or garbage, so they are
    cut off rather than trusted (after a plain ``kill -9`` they would be intact, but one rule
    for both cases keeps "recovered" meaning the same thing).  If the file is shorter than
    the header claims, the frames actually present (rounded down to whole frames) count.  A
    header that was never flushed (the RF64 placeholder libsndfile writes at open, or the
    RIFF header with an empty data chunk it writes on the first write) counts as zero
    frames.  The result is a RIFF/WAVE file with a plain PCM ``fmt `` chunk below 4 GiB,
    RF64 beyond, exactly as :meth:`WavWriter.close` leaves it.

    Raises :class:`StorageError` if the file is not a WAV this writer could have made.
    """
    try:
        with path.open("r+b") as f:
            frames, fmt = _recover(f, path)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise StorageError(f"cannot recover {path}: {exc.strerror or exc}") from exc
    return frames, fmt


def _recover(f: BinaryIO, path: Path) -> tuple[int, str]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(_HEADER_SCAN)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RF64"):
        raise StorageError(f"{path} is not a RIFF/RF64 WAVE file")
    ds64_at: int | None = None
    ds64_data: int | None = None
    align: int | None = None
    fact_at: int | None = None
    pos = 12
    while True:
        if pos + _CHUNK.size > len(head):
            raise StorageError(f"{path}: no data chunk within the first {_HEADER_SCAN} bytes")
        cid, csize = _CHUNK.unpack_from(head, pos)
        body = pos + _CHUNK.size
        if cid == b"ds64" and body + _DS64.size <= len(head):
            ds64_at = pos
            ds64_data = _DS64.unpack_from(head, body)[1]
        elif cid == b"fmt " and body + _FMT_PCM.size <= len(head):
            align = _FMT_PCM.unpack_from(head, body)[4]
        elif cid == b"fact" and csize >= 4:
            fact_at = body
        elif cid == b"data":
            break
        pos = body + csize + (csize & 1)
    if not align:
        raise StorageError(f"{path}: no usable fmt chunk before the data")
    data_at = pos + _CHUNK.size
    declared = csize
    if head[:4] == b"RF64":
        declared = 0 if ds64_data is None or csize != _RF64_PLACEHOLDER else ds64_data
        if ds64_data is not None and ds64_data >= 1 << 63:  # the open-time placeholder
            declared = 0
    frames = min(declared, max(0, size - data_at)) // align
    data_bytes = frames * align
    end = data_at + data_bytes
    f.truncate(end)
    if fact_at is not None:
        f.seek(fact_at)
        f.write(struct.pack("<I", min(frames, RIFF_LIMIT)))
    if end - 8 > RIFF_LIMIT:
        if ds64_at is None:
            raise StorageError(f"{path}: larger than 4 GiB without a ds64 chunk")
        f.seek(0)
        f.write(b"RF64" + struct.pack("<I", _RF64_PLACEHOLDER))
        f.seek(ds64_at + _CHUNK.size)
        f.write(struct.pack("<QQQ", end - 8, data_bytes, frames))
        f.seek(pos + 4)
        f.write(struct.pack("<I", _RF64_PLACEHOLDER))
        return frames, "RF64"
    f.seek(0)
    f.write(b"RIFF" + struct.pack("<I", end - 8))
    if ds64_at is not None:  # the reserved ds64 becomes padding, as after a downgrade
        f.seek(ds64_at)
        f.write(b"JUNK")
    f.seek(pos + 4)
    f.write(struct.pack("<I", data_bytes))
    _tidy_riff_header(f)
    return frames, "WAV"
