"""Captures read as blocks must be exactly the records of the file.

``CaptureReader.blocks`` finds classic-pcap records by guessing runs of equal-size records
and checking the guess with one array comparison (``_walk_records``); these tests hold it to
a plain record-by-record reader written out here, on captures built to break guesses: runs of every length,
sizes that change every record, records split across reads, files cut anywhere, a corrupt
length field.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callcap.capture import pcapfile
from callcap.capture.block import FrameBlock, batched
from callcap.capture.pcapfile import MAX_RECORD, CaptureReader

Frame = tuple[float, int, bytes]


def _pcap(frames: list[bytes], *, order: str = "<") -> bytes:
    out = [struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, frame in enumerate(frames):
        out.append(
            struct.pack(
                order + "IIII",
                1_700_000_000 + i // 50,
                (i * 20_000) % 10**6,
                len(frame),
                len(frame) + 4,
            )
        )
        out.append(frame)
    return b"".join(out)


def _reference(data: bytes) -> tuple[list[Frame], bool]:
    """Classic pcap read the plain way, one record header after the other: the frames, and
    whether the file ends inside a record or at an impossible length."""
    order = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    frames: list[Frame] = []
    pos = 24
    while pos + 16 <= len(data):
        sec, usec, caplen, _wire = struct.unpack_from(order + "IIII", data, pos)
        if caplen > MAX_RECORD or pos + 16 + caplen > len(data):
            return frames, True
        frames.append((sec + usec / 1e6, 1, data[pos + 16 : pos + 16 + caplen]))
        pos += 16 + caplen
    return frames, pos != len(data)


def _both(path: Path) -> tuple[list[Frame], list[Frame], CaptureReader, CaptureReader]:
    """Frames read one by one and as blocks, after checking both against the reference."""
    expected, cut = _reference(path.read_bytes())
    with CaptureReader(path) as one:
        frames = list(one)
    with CaptureReader(path) as blocks:
        by_block = [f for block in blocks.blocks() for f in block.frames()]
    assert by_block == expected
    assert blocks.truncated == cut
    assert blocks.packets == len(expected)
    return frames, by_block, one, blocks


def _frames_of(sizes: list[int]) -> list[bytes]:
    return [bytes([i & 0xFF]) * size for i, size in enumerate(sizes)]


runs = st.lists(
    st.tuples(st.sampled_from([0, 1, 60, 214, 218, 1500]), st.integers(1, 40)),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(runs=runs, read_size=st.integers(16, 6000), order=st.sampled_from(["<", ">"]))
def test_blocks_are_the_frames_whatever_the_runs_and_reads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runs: list[tuple[int, int]],
    read_size: int,
    order: str,
) -> None:
    monkeypatch.setattr(pcapfile, "_BLOCK_READ", read_size)  # records split across reads
    sizes = [size for size, count in runs for _ in range(count)]
    path = tmp_path / "x.pcap"
    path.write_bytes(_pcap(_frames_of(sizes), order=order))
    frames, by_block, one, blocks = _both(path)
    assert [len(f) for _, _, f in frames] == sizes
    assert by_block == frames
    assert (blocks.packets, blocks.truncated) == (one.packets, one.truncated) == (len(sizes), False)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=60), cut=st.integers(0, 10**6))
def test_a_cut_file_gives_the_same_frames_and_truncation_either_way(
    tmp_path: Path, sizes: list[int], cut: int
) -> None:
    data = _pcap(_frames_of(sizes))
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[: 24 + cut % (len(data) - 23)])
    frames, by_block, one, blocks = _both(path)
    assert by_block == frames
    assert (blocks.packets, blocks.truncated) == (one.packets, one.truncated)


def test_a_corrupt_length_ends_the_blocks_where_it_ends_the_frames(tmp_path: Path) -> None:
    sizes = [214] * 500
    data = bytearray(_pcap(_frames_of(sizes)))
    bad = 24 + 300 * (16 + 214)  # inside a long run of equal records
    struct.pack_into("<I", data, bad + 8, MAX_RECORD + 1)
    path = tmp_path / "bad.pcap"
    path.write_bytes(bytes(data))
    frames, by_block, one, blocks = _both(path)
    assert len(frames) == 300
    assert by_block == frames
    assert blocks.truncated and one.truncated
    assert blocks.packets == 300


def test_a_large_capture_reads_the_same_across_many_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    # mostly RTP-sized frames with SIP-sized ones in between, over several 4 MiB reads
    sizes = [
        int(s) for s in np.where(rng.random(40_000) < 0.02, rng.integers(300, 1400, 40_000), 214)
    ]
    path = tmp_path / "big.pcap"
    path.write_bytes(_pcap(_frames_of(sizes)))
    frames, by_block, _one, blocks = _both(path)
    assert len(frames) == 40_000
    assert by_block == frames
    assert blocks.packets == 40_000


def test_window_reads_the_same_bytes_as_slicing_each_frame() -> None:
    frames: list[Frame] = [(float(i), 1, bytes(range(i, i + 60 + i))) for i in range(20)]
    (block,) = list(batched(frames, size=64))
    assert list(block.frames()) == frames
    rows = np.array([0, 5, 19, 5], dtype=np.int64)
    got = block.window(rows, 10, 40)
    assert got.shape == (4, 40)
    for row, line in zip(rows.tolist(), got, strict=True):
        assert line.tobytes() == frames[row][2][10:50]
    assert block.window(np.zeros(0, dtype=np.int64), 10, 40).shape == (0, 40)


def test_batched_keeps_order_and_splits_at_the_batch_size() -> None:
    frames: list[Frame] = [(float(i), 113 if i % 2 else 1, bytes([i])) for i in range(10)]
    blocks = list(batched(frames, size=4))
    assert [len(b) for b in blocks] == [4, 4, 2]
    assert [f for b in blocks for f in b.frames()] == frames
    assert isinstance(blocks[0], FrameBlock)
    assert blocks[0].linktypes.tolist() == [1, 113, 1, 113]
