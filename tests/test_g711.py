"""G.711 tables and encoders against references that share no code with callcap.

Scale: both references and callcap produce 16-bit linear PCM the way sox and the classic
Sun ``g711.c`` do — µ-law's 14-bit magnitudes (±8031) ×4 → ±32124, A-law's 13-bit magnitudes
(±4032) ×8 → ±32256.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from callcap.codecs.g711 import (
    ALAW_TO_PCM,
    DECODERS,
    ULAW_TO_PCM,
    decode_alaw,
    decode_ulaw,
    encode_alaw,
    encode_ulaw,
)

ALL_CODES = bytes(range(256))


def _ulaw_reference(code: int) -> int:
    """ITU-T G.711 µ-law, written out per code: bits inverted, bias 0x84 (33 in 14-bit × 4)."""
    u = ~code & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def _alaw_reference(code: int) -> int:
    """ITU-T G.711 A-law, written out per code: even bits inverted (0x55), sign 1 = positive."""
    a = code ^ 0x55
    sign, exponent, mantissa = a & 0x80, (a >> 4) & 0x07, a & 0x0F
    magnitude = (
        (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return magnitude if sign else -magnitude


def test_ulaw_table_matches_the_g711_formula_for_all_codes() -> None:
    assert [int(v) for v in decode_ulaw(ALL_CODES)] == [_ulaw_reference(c) for c in range(256)]
    assert ULAW_TO_PCM.dtype == np.int16
    assert (int(ULAW_TO_PCM.min()), int(ULAW_TO_PCM.max())) == (-32124, 32124)


def test_alaw_table_matches_the_g711_formula_for_all_codes() -> None:
    assert [int(v) for v in decode_alaw(ALL_CODES)] == [_alaw_reference(c) for c in range(256)]
    assert ALAW_TO_PCM.dtype == np.int16
    assert (int(ALAW_TO_PCM.min()), int(ALAW_TO_PCM.max())) == (-32256, 32256)


def _tshark_rtp_payloads(pcap: Path) -> dict[int, bytes]:
    """RTP payload bytes per payload type, as tshark dissects them."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            "udp.port==40000,rtp",
            "-T",
            "fields",
            "-e",
            "rtp.p_type",
            "-e",
            "rtp.payload",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    payloads: dict[int, bytes] = {}
    for line in out.splitlines():
        pt, payload = line.split("\t")
        payloads[int(pt)] = bytes.fromhex(payload.replace(":", ""))
    return payloads


def _sox_decode(law: str, payload: bytes, tmp_path: Path) -> list[int]:
    raw, pcm = tmp_path / f"{law}.raw", tmp_path / f"{law}.s16"
    raw.write_bytes(payload)
    subprocess.run(
        ["sox", "-t", law, "-r", "8000", "-c", "1", str(raw), "-t", "s16", "-L", str(pcm)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return [int(v) for v in np.fromfile(pcm, dtype="<i2")]


@pytest.mark.skipif(not (shutil.which("tshark") and shutil.which("sox")), reason="needs tshark+sox")
def test_tables_match_sox_on_rtp_payloads_dissected_by_tshark(tmp_path: Path) -> None:
    """PT 0 and PT 8 packets carrying all 256 codes, decoded by sox.

    tshark 4.0 has no command-line way to emit decoded RTP audio (its RTP player is GUI-only),
    so tshark dissects the packets — proving which bytes are the PCMU/PCMA payload — and sox's
    own G.711 tables decode them.
    """
    pcap = tmp_path / "g711.pcap"
    packets = [
        Ether()
        / IP(src="192.0.2.1", dst="192.0.2.2")
        / UDP(sport=40000, dport=40000)
        / (bytes([0x80, pt, 0, seq, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44]) + ALL_CODES)
        for seq, pt in enumerate((0, 8))
    ]
    wrpcap(str(pcap), packets)
    payloads = _tshark_rtp_payloads(pcap)
    assert payloads == {0: ALL_CODES, 8: ALL_CODES}
    assert [int(v) for v in DECODERS["PCMU"](payloads[0])] == _sox_decode(
        "ul", payloads[0], tmp_path
    )
    assert [int(v) for v in DECODERS["PCMA"](payloads[8])] == _sox_decode(
        "al", payloads[8], tmp_path
    )


@pytest.mark.parametrize(
    ("decode", "reference"), [(decode_ulaw, _ulaw_reference), (decode_alaw, _alaw_reference)]
)
def test_every_pair_of_codes_decodes_as_the_two_codes_do(decode, reference) -> None:  # type: ignore[no-untyped-def]
    """Long payloads are decoded two codes per lookup: all 65 536 pairs, in a payload long
    enough to take that path, against the per-code formula; and odd or short lengths."""
    per_code = np.array([reference(c) for c in range(256)], dtype=np.int16)
    pairs = np.arange(65536, dtype="<u2").tobytes()  # every (first, second) code pair
    expected = per_code[np.frombuffer(pairs, dtype=np.uint8)]
    got = decode(pairs)
    assert got.dtype == np.int16
    assert np.array_equal(got, expected)
    for n in (1, 63, 64, 65, 161):
        assert np.array_equal(decode(pairs[:n]), expected[:n]), n
    assert np.array_equal(
        decode(np.frombuffer(pairs[:320], dtype=np.uint8).reshape(2, 160)), expected[:320]
    )


def test_decoders_are_looked_up_by_sdp_encoding_name() -> None:
    assert set(DECODERS) == {"PCMU", "PCMA"}
    assert DECODERS["PCMU"] is decode_ulaw
    assert DECODERS["PCMA"] is decode_alaw


def test_decoding_accepts_memoryview_slices_of_a_packet() -> None:
    packet = bytearray(b"\x80\x08\x00\x01" + bytes(8) + b"\xd5\x55\xaa")
    samples = decode_alaw(memoryview(packet)[12:])
    assert samples.tolist() == [8, -8, 32256]


def test_encoding_inverts_decoding_for_every_code() -> None:
    assert encode_alaw(decode_alaw(ALL_CODES)) == ALL_CODES
    # µ-law has two zeros (0x7F = -0, 0xFF = +0); 0xFF is the canonical one.
    expected = bytes(0xFF if c == 0x7F else c for c in range(256))
    assert encode_ulaw(decode_ulaw(ALL_CODES)) == expected


def test_encoding_saturates_out_of_range_input() -> None:
    assert encode_ulaw(np.array([40000, -40000])) == bytes([0x80, 0x00])
    assert encode_alaw(np.array([40000, -40000])) == bytes([0xAA, 0x2A])


@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=200))
def test_encoding_picks_the_nearest_code(values: list[int]) -> None:
    pcm = np.array(values, dtype=np.int16)
    for encode, table in ((encode_ulaw, ULAW_TO_PCM), (encode_alaw, ALAW_TO_PCM)):
        codes = np.frombuffer(encode(pcm), dtype=np.uint8)
        got = np.abs(table[codes].astype(np.int32) - pcm.astype(np.int32))
        best = np.abs(table.astype(np.int32)[None, :] - pcm.astype(np.int32)[:, None]).min(axis=1)
        assert np.array_equal(got, best)


def test_a_full_int16_sweep_stays_within_half_a_step() -> None:
    """Largest G.711 step is 1024 (µ-law) / 1024 (A-law) → error ≤ 512, ±saturation at the ends."""
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    for encode, decode, top in (
        (encode_ulaw, decode_ulaw, 32124),
        (encode_alaw, decode_alaw, 32256),
    ):
        back = decode(encode(pcm)).astype(np.int32)
        inside = np.abs(pcm) <= top
        assert np.abs(back - pcm)[inside].max() <= 512
        assert np.all(np.diff(back) >= 0)  # monotonic
