"""Many captured frames in one buffer: the unit the pipeline's fast lane works on.

A recorder's input is overwhelmingly RTP — fifty small packets a second per direction per
call.  Handing those over one ``bytes`` object at a time costs more Python per packet than
the whole of the work that matters, so capture sources also deliver *blocks*: one buffer
holding the frames back to back (for classic pcap, the very bytes read from the file, record
headers and all) plus numpy arrays of where each frame starts, how long it is, when it was
captured and on what link type.  Header fields of every frame can then be read in one array
operation across the block (:meth:`FrameBlock.window`), and only the frames that need the
general decoders are ever sliced out (:meth:`FrameBlock.frame`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Frame = tuple[float, int, bytes]

DEFAULT_BATCH: Final = 2048
"""Frames per block when blocks are built from single frames (live capture, pcapng)."""


@dataclass(frozen=True, slots=True)
class FrameBlock:
    """``len(starts)`` frames: frame ``i`` is ``data[starts[i] : starts[i] + lengths[i]]``,
    captured at ``times[i]`` (seconds since the epoch, UTC) on link type ``linktypes[i]``.

    Frames are in capture order.  ``data`` may hold bytes between frames (record headers);
    nothing but the frames' own bytes is ever read through the block.
    """

    data: bytes
    starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    times: npt.NDArray[np.float64]
    linktypes: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.starts)

    def frame(self, i: int) -> bytes:
        """Frame ``i`` as its own bytes object (for the general, per-frame path)."""
        start = int(self.starts[i])
        return self.data[start : start + int(self.lengths[i])]

    def frames(self) -> Iterator[Frame]:
        """Every frame as ``(ts, linktype, frame)``, as a per-frame reader yields them."""
        data = self.data
        for start, length, ts, linktype in zip(
            self.starts.tolist(),
            self.lengths.tolist(),
            self.times.tolist(),
            self.linktypes.tolist(),
            strict=True,
        ):
            yield ts, linktype, data[start : start + length]

    def window(self, rows: npt.NDArray[np.int64], offset: int, width: int) -> npt.NDArray[np.uint8]:
        """Bytes ``offset`` to ``offset + width`` of each frame of ``rows``, as a
        ``(len(rows), width)`` array, in one gather.  Every frame asked for must hold them
        (``lengths[rows] >= offset + width``: the caller checks)."""
        return values_at(self.data, self.starts[rows] + offset, np.dtype((np.uint8, (width,))))

    def field(
        self, rows: npt.NDArray[np.int64], offset: int, dtype: npt.DTypeLike
    ) -> npt.NDArray[Any]:
        """One fixed-size field (``dtype``, e.g. ``">u2"``, byte order included) at
        ``offset`` of each frame of ``rows``, in one gather; the frames must hold it."""
        return values_at(self.data, self.starts[rows] + offset, dtype)

    @classmethod
    def of(cls, frames: list[Frame]) -> FrameBlock:
        """A block holding copies of ``frames`` (live capture, pcapng, tests)."""
        n = len(frames)
        lengths = np.fromiter((len(f) for _, _, f in frames), dtype=np.int64, count=n)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        return cls(
            data=b"".join([f for _, _, f in frames]),
            starts=starts,
            lengths=lengths,
            times=np.fromiter((ts for ts, _, _ in frames), dtype=np.float64, count=n),
            linktypes=np.fromiter((lt for _, lt, _ in frames), dtype=np.int64, count=n),
        )


def values_at(data: bytes, at: npt.NDArray[np.int64], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """The ``dtype`` value starting at each byte offset ``at`` of ``data`` (a sub-array
    type such as ``(uint8, (40,))`` gives a row of bytes per offset)."""
    kind = np.dtype(dtype)
    if not len(at):
        return np.zeros(0, dtype=kind)
    # Records and rows of bytes are gathered as opaque items of their size and viewed as
    # what they are after: numpy copies a void item with one memcpy, a structured or
    # sub-array item field by field, ten times slower.
    plain = kind.fields is None and kind.subdtype is None
    item = kind if plain else np.dtype(f"V{kind.itemsize}")
    # a value starting at every byte of the buffer (a read-only view, no copy)
    every: npt.NDArray[Any] = np.ndarray(
        (len(data) - kind.itemsize + 1,), dtype=item, buffer=data, strides=(1,)
    )
    got = every[at]
    if plain:
        return got
    if kind.subdtype is not None:
        base, shape = kind.subdtype
        return got.view(base).reshape((len(at), *shape))
    return got.view(kind)


def batched(frames: Iterable[Frame], size: int = DEFAULT_BATCH) -> Iterator[FrameBlock]:
    """Blocks of up to ``size`` frames from a per-frame source, in order."""
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) >= size:
            yield FrameBlock.of(batch)
            batch = []
    if batch:
        yield FrameBlock.of(batch)
