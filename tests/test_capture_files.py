"""Capture files: pcap (both byte orders, µs and ns), pcapng (several interfaces), cut files."""

from __future__ import annotations

import gzip
import logging
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import CookedLinux, Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, PcapWriter

from callcap.capture.pcapfile import MAX_RECORD, CaptureReader
from callcap.errors import CaptureError

BASE = 1_700_000_000


def _frames(count: int = 5) -> list[bytes]:
    return [
        bytes(
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="192.0.2.1", dst="192.0.2.2")
            / UDP(sport=5060, dport=5060)
            / Raw(b"OPTIONS sip:x SIP/2.0\r\n" + bytes([i]) * (i * 37))
        )
        for i in range(count)
    ]


def _read(path: Path) -> tuple[list[tuple[float, int, bytes]], CaptureReader]:
    """The frames, read one by one; read as blocks they must be the same, cut or not."""
    with CaptureReader(path) as reader:
        out = list(reader)
    with CaptureReader(path) as by_block:
        blocks = [frame for block in by_block.blocks() for frame in block.frames()]
    assert blocks == out
    assert (by_block.packets, by_block.truncated) == (reader.packets, reader.truncated)
    return out, reader


def _write_pcap(
    path: Path, frames: list[bytes], fracs: list[int], *, endianness: str, nano: bool
) -> None:
    writer = PcapWriter(str(path), linktype=1, endianness=endianness, nano=nano, sync=True)
    writer.write_header(None)
    for i, (frame, frac) in enumerate(zip(frames, fracs, strict=True)):
        writer.write_packet(frame, sec=BASE + i, usec=frac)
    writer.close()


@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_frames_and_timestamps_round_trip(tmp_path: Path, endianness: str, nano: bool) -> None:
    frames = _frames()
    div = 10**9 if nano else 10**6
    fracs = [0, 1, div // 2, div - 1, 123_457 * (1000 if nano else 1) + (789 if nano else 0)]
    path = tmp_path / "x.pcap"
    _write_pcap(path, frames, fracs, endianness=endianness, nano=nano)
    got, reader = _read(path)
    assert reader.format == "pcap"
    assert reader.packets == len(frames)
    assert not reader.truncated
    assert [f for _, _, f in got] == frames
    assert [lt for _, lt, _ in got] == [1] * len(frames)
    assert [ts for ts, _, _ in got] == [BASE + i + frac / div for i, frac in enumerate(fracs)]
    if not nano:  # µs survive a float exactly enough to get the integers back
        assert [round(ts * 1e6) for ts, _, _ in got] == [
            (BASE + i) * 10**6 + f for i, f in enumerate(fracs)
        ]


def test_pcap_linktype_comes_from_the_global_header(tmp_path: Path) -> None:
    path = tmp_path / "sll.pcap"
    frame = bytes(CookedLinux(proto=0x0800) / IP(dst="192.0.2.9") / UDP() / b"x")
    writer = PcapWriter(str(path), linktype=113, sync=True)
    writer.write_header(None)
    writer.write_packet(frame, sec=BASE, usec=5)
    writer.close()
    got, _ = _read(path)
    assert got == [(BASE + 5e-6, 113, frame)]


def test_gzipped_captures_read_like_the_plain_files(tmp_path: Path) -> None:
    frames = _frames()
    plain = tmp_path / "x.pcap"
    _write_pcap(plain, frames, [7] * len(frames), endianness="<", nano=False)
    ng = tmp_path / "x.pcapng"
    ng.write_bytes(_two_interface_pcapng()[0])
    for source in (plain, ng):
        packed = tmp_path / (source.name + ".gz")
        packed.write_bytes(gzip.compress(source.read_bytes()))
        assert _read(packed)[0] == _read(source)[0]
        assert _read(packed)[0]


def test_pcap_cut_anywhere_in_last_record_yields_earlier_packets_and_flags_truncation(
    tmp_path: Path,
) -> None:
    frames = _frames(4)
    path = tmp_path / "full.pcap"
    _write_pcap(path, frames, [0] * 4, endianness="<", nano=False)
    data = path.read_bytes()
    last_start = len(data) - 16 - len(frames[-1])
    cut = tmp_path / "cut.pcap"
    for end in range(last_start + 1, len(data)):
        cut.write_bytes(data[:end])
        got, reader = _read(cut)
        assert [f for _, _, f in got] == frames[:-1], end
        assert reader.truncated, end
        assert reader.packets == 3
    cut.write_bytes(data[:last_start])  # cut exactly between records: a complete file
    got, reader = _read(cut)
    assert len(got) == 3
    assert not reader.truncated


def test_pcap_record_claiming_an_impossible_length_stops_as_truncated(tmp_path: Path) -> None:
    frames = _frames(2)
    path = tmp_path / "x.pcap"
    _write_pcap(path, frames, [0, 0], endianness="<", nano=False)
    data = bytearray(path.read_bytes())
    second = 24 + 16 + len(frames[0])
    struct.pack_into("<I", data, second + 8, MAX_RECORD + 1)
    path.write_bytes(bytes(data))
    got, reader = _read(path)
    assert [f for _, _, f in got] == frames[:1]
    assert reader.truncated


# -- pcapng ---------------------------------------------------------------------------------------


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(endian + "II", btype, length) + body + struct.pack(endian + "I", length)


def _option(endian: str, code: int, value: bytes) -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def _shb(endian: str) -> bytes:
    return _block(endian, 0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def _idb(endian: str, linktype: int, options: bytes = b"") -> bytes:
    if options:
        options += struct.pack(endian + "HH", 0, 0)
    return _block(endian, 1, struct.pack(endian + "HHI", linktype, 0, 65535) + options)


def _epb(endian: str, ifid: int, ticks: int, frame: bytes) -> bytes:
    head = struct.pack(
        endian + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
    )
    return _block(endian, 6, head + frame)


def _two_interface_pcapng() -> tuple[bytes, list[tuple[float, int, bytes]]]:
    """Section 1 (little-endian): Ethernet at µs (default) and raw IP at ns with an offset;
    section 2 (big-endian, as from ``cat a.pcapng b.pcapng``): SLL at 2^-10 s."""
    eth = _frames(1)[0]
    raw = bytes(IP(src="198.51.100.1", dst="198.51.100.2") / UDP(sport=1, dport=2) / b"raw")
    sll = bytes(CookedLinux(proto=0x0800) / IP() / UDP() / b"sll")
    le, be = "<", ">"
    data = (
        _shb(le)
        + _idb(le, 1)
        + _idb(le, 101, _option(le, 9, b"\x09") + _option(le, 14, struct.pack("<q", 100)))
        + _epb(le, 0, BASE * 10**6 + 250_000, eth)
        + _epb(le, 1, BASE * 10**9 + 123_456_789, raw)
        + _block(le, 0x0BAD, b"custom block, skipped")
        + _shb(be)
        + _idb(be, 113, _option(be, 9, b"\x8a"))
        + _epb(be, 0, BASE * 1024 + 512, sll)
    )
    expected = [
        (BASE + 0.25, 1, eth),
        (BASE + 123_456_789 / 10**9 + 100, 101, raw),
        (BASE + 0.5, 113, sll),
    ]
    return data, expected


def test_pcapng_interfaces_keep_their_own_linktype_resolution_and_offset(tmp_path: Path) -> None:
    data, expected = _two_interface_pcapng()
    path = tmp_path / "multi.pcapng"
    path.write_bytes(data)
    got, reader = _read(path)
    assert reader.format == "pcapng"
    assert got == expected
    assert reader.packets == 3
    assert not reader.truncated


def test_pcapng_written_by_scapy_round_trips(tmp_path: Path) -> None:
    frames = _frames()
    path = tmp_path / "s.pcapng"
    writer = PcapNgWriter(str(path))
    stamps = [Decimal(BASE + i) + Decimal(i * 111_111) / 10**6 for i in range(len(frames))]
    for frame, stamp in zip(frames, stamps, strict=True):
        pkt = Ether(frame)
        pkt.time = stamp
        writer.write(pkt)
    writer.close()
    got, reader = _read(path)
    assert [f for _, _, f in got] == frames
    assert [lt for _, lt, _ in got] == [1] * len(frames)
    assert [ts for ts, _, _ in got] == [BASE + i + i * 111_111 / 10**6 for i in range(len(frames))]
    assert not reader.truncated


def test_pcapng_cut_anywhere_in_last_block_yields_earlier_packets_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    data, expected = _two_interface_pcapng()
    path = tmp_path / "cut.pcapng"
    last_len = struct.unpack_from(">I", data, len(data) - 4)[0]
    last_start = len(data) - last_len
    caplog.set_level(logging.DEBUG)
    for end in range(last_start + 1, len(data)):
        path.write_bytes(data[:end])
        got, reader = _read(path)
        assert got == expected[:-1], end
        assert reader.truncated, end
    assert not [r for r in caplog.records if r.name.startswith("scapy")]
    out, err = capfd.readouterr()
    assert "PcapNg" not in out + err


def test_pcapng_block_with_inconsistent_trailing_length_is_damage(tmp_path: Path) -> None:
    data, expected = _two_interface_pcapng()
    broken = bytearray(data)
    struct.pack_into(">I", broken, len(broken) - 4, 4)  # trailing length disagrees
    path = tmp_path / "bad.pcapng"
    path.write_bytes(bytes(broken))
    got, reader = _read(path)
    assert got == expected[:-1]
    assert reader.truncated


# -- not a capture --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a pcap"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "header cut short"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00", "pcapng"),
        (b"\x1f\x8b\x08\x00garbage", "unreadable"),
    ],
)
def test_non_capture_file_is_a_capture_error_naming_the_file(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(CaptureError) as err:
        CaptureReader(path)
    assert str(path) in str(err.value)
    assert why in str(err.value)


def test_missing_file_is_a_capture_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pcap"
    with pytest.raises(CaptureError, match=r"nope\.pcap"):
        CaptureReader(path)


def test_reader_iterates_once(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    _write_pcap(path, _frames(1), [0], endianness="<", nano=False)
    with CaptureReader(path) as reader:
        assert len(list(reader)) == 1
        with pytest.raises(CaptureError):
            iter(reader)


def test_packet_count_is_known_after_breaking_off(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    _write_pcap(path, _frames(5), [0] * 5, endianness="<", nano=False)
    with CaptureReader(path) as reader:
        for i, _frame in enumerate(reader, 1):
            if i == 2:
                break
    assert reader.packets == 2


def test_every_corpus_capture_reads_completely(corpus: Path, corpus_facts: dict[str, Any]) -> None:
    for name, facts in sorted(corpus_facts.items()):
        with CaptureReader(corpus / name) as reader:
            count = sum(1 for _ in reader)
        with CaptureReader(corpus / name) as by_block:
            assert sum(len(block) for block in by_block.blocks()) == count, name
        assert count == facts["capture"]["packets"], name
        assert reader.packets == count, name
        assert not reader.truncated, name
        assert reader.format == ("pcapng" if name.endswith(".pcapng") else "pcap"), name
