"""Real SIP peers for end-to-end tests: a sipp UAC calls a sipp UAS over loopback with known
audio, tcpdump captures the call, and the test gets the capture plus what each side sent.

Audio is speech from espeak-ng (different phrases per side), G.711-encoded into an RTP pcap
that sipp replays with ``play_pcap_audio``; optional RFC 4733 telephone-events are woven into
the caller's stream.  The reference for each side is the G.711 *decoding* of what went on
the wire, so a faithful recording matches it sample for sample.

Everything listens on 127.0.0.1 only (or on the addresses of network namespaces the test
created), on ports chosen at run time, and every child process is killed when the run ends,
whatever happens.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from callcap.codecs.g711 import decode_alaw, decode_ulaw, encode_alaw, encode_ulaw
from callcap.codecs.inband import HIGH_GROUP, KEYS, LOW_GROUP

SIPP_DIR = Path(__file__).resolve().parent / "data" / "sipp"
LOOPBACK = "127.0.0.1"
RATE = 8000
PTIME = 160


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """An even port whose successor (RTCP) is free too."""
    for _ in range(200):
        port = free_udp_port() & ~1
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + 1))
                return port
        except OSError:
            continue
    raise RuntimeError("no free RTP port pair on loopback")


def make_speech(
    text: str, tmp: Path, *, voice: str = "en", speed: int = 150, pitch: int = 50
) -> npt.NDArray[np.int16]:
    """Speech from espeak-ng as 8 kHz mono int16 (resampled by sox)."""
    wav = tmp / "speech.wav"
    raw = tmp / "speech.s16"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        [
            "sox",
            str(wav),
            "-t",
            "raw",
            "-r",
            str(RATE),
            "-c",
            "1",
            "-e",
            "signed-integer",
            "-b",
            "16",
            "-L",
            str(raw),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    samples = np.frombuffer(raw.read_bytes(), dtype="<i2").astype(np.int16)
    return samples[: len(samples) - len(samples) % PTIME]


@dataclass(frozen=True, slots=True)
class Side:
    """What one party put on the wire."""

    pcap: Path
    reference: npt.NDArray[np.int16]  # decoded G.711 of the payloads sent, in order
    dtmf: tuple[tuple[float, str], ...]  # (seconds from the first packet, digit)


_EVENT_CODES = {d: i for i, d in enumerate("0123456789*#ABCD")}


def with_key_tones(
    speech: npt.NDArray[np.int16], tones: tuple[tuple[float, str], ...]
) -> npt.NDArray[np.int16]:
    """``speech`` with a 150 ms keypad tone (the key's two frequencies, ITU-T Q.23) in
    place of the speech at each ``(seconds, digit)``; the tail is padded if needed."""
    out = speech.astype(np.float64)
    t = np.arange(round(0.15 * RATE)) / RATE
    for at, digit in tones:
        i = KEYS.index(digit)
        pair = 6000 * (
            np.sin(2 * np.pi * LOW_GROUP[i // 4] * t) + np.sin(2 * np.pi * HIGH_GROUP[i % 4] * t)
        )
        start = round(at * RATE)
        if start + len(pair) > len(out):
            out = np.concatenate([out, np.zeros(start + len(pair) - len(out))])
        out[start : start + len(pair)] = pair
    return np.clip(out, -32768, 32767).astype(np.int16)


def write_rtp_pcap(
    samples: npt.NDArray[np.int16],
    out: Path,
    *,
    codec: str = "PCMU",
    ssrc: int = 0x1234ABCD,
    seq0: int = 1000,
    ts0: int = 160_000,
    dtmf: tuple[tuple[float, str], ...] = (),
    dtmf_pt: int = 101,
) -> Side:
    """An Ethernet/IPv4/UDP/RTP pcap that sipp's ``play_pcap_audio`` replays with its timing.

    Audio packets are 20 ms apart.  Each DTMF digit replaces the audio during its event
    (100 ms: five updates, then three end packets sharing one timestamp, RFC 4733 §2.5.1.4).
    """
    encode = encode_ulaw if codec == "PCMU" else encode_alaw
    decode = decode_ulaw if codec == "PCMU" else decode_alaw
    pt = 0 if codec == "PCMU" else 8
    payload = encode(samples)
    frames = len(payload) // PTIME
    events: dict[int, tuple[str, int, int]] = {}  # frame index -> (digit, first frame, k)
    for at, digit in dtmf:
        first = round(at * RATE / PTIME)
        for k in range(6):
            events[first + k] = (digit, first, k)
    silence = (b"\xff" if codec == "PCMU" else b"\xd5") * PTIME
    records: list[tuple[float, bytes]] = []
    seq = seq0
    sent_audio = bytearray()
    for i in range(frames):
        t = 1.0 + i * PTIME / RATE
        if i in events:
            digit, first, k = events[i]
            end = k == 5
            body = struct.pack(
                "!BBH", _EVENT_CODES[digit], (0x80 if end else 0) | 10, (k + 1) * PTIME
            )
            marker = 0x80 if k == 0 else 0
            head = struct.pack(
                "!BBHII",
                0x80,
                marker | dtmf_pt,
                seq & 0xFFFF,
                (ts0 + first * PTIME) & 0xFFFFFFFF,
                ssrc,
            )
            for j in range(3 if end else 1):  # the end packet is sent three times, same seq
                records.append((t + j * 0.001, head + body))
            seq += 1
            sent_audio += silence
            continue
        chunk = payload[i * PTIME : (i + 1) * PTIME]
        rtp = (
            struct.pack(
                "!BBHII",
                0x80,
                pt | (0x80 if i == 0 else 0),
                seq & 0xFFFF,
                (ts0 + i * PTIME) & 0xFFFFFFFF,
                ssrc,
            )
            + chunk
        )
        records.append((t, rtp))
        sent_audio += chunk
        seq += 1
    _write_pcap(out, records)
    reference = decode(bytes(sent_audio))
    for at, _digit in dtmf:  # the event span carries no audio at all
        start = round(at * RATE / PTIME) * PTIME
        reference[start : start + 6 * PTIME] = 0
    return Side(out, reference, dtmf)


def _write_pcap(out: Path, records: list[tuple[float, bytes]]) -> None:
    with out.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts, rtp in records:
            udp = struct.pack("!HHHH", 6000, 6000, 8 + len(rtp), 0) + rtp
            total = 20 + len(udp)
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                total,
                0,
                0x4000,
                64,
                17,
                0,
                bytes([10, 1, 1, 1]),
                bytes([10, 1, 1, 2]),
            )
            frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp
            sec = int(ts)
            f.write(
                struct.pack("<IIII", sec, round((ts - sec) * 1e6), len(frame), len(frame)) + frame
            )


@dataclass
class CallRun:
    capture: Path
    caller: Side | None
    callee: Side | None
    uac_log: str = ""
    uas_log: str = ""
    returncodes: dict[str, int] = field(default_factory=dict)


def _render(template: str, **values: str) -> str:
    text = (SIPP_DIR / template).read_text(encoding="ascii")
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@contextlib.contextmanager
def tcpdump(
    capture: Path,
    interface: str = "lo",
    netns: str | None = None,
    ports: tuple[int, ...] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """tcpdump on loopback (of network namespace ``netns`` if given), started and listening
    before the call begins; with ``ports`` only traffic to or from them is kept, so other
    programs' calls on the same loopback interface stay out of the capture.

    ``--immediate-mode`` matters: with the kernel's block-buffered capture ring (TPACKET_V3)
    the packets of a partly filled block are lost when tcpdump is interrupted.
    """
    proc = subprocess.Popen(
        [
            *(["ip", "netns", "exec", netns] if netns else []),
            "tcpdump",
            "-i",
            interface,
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
            str(capture),
            "udp or tcp"
            if not ports
            else "(udp or tcp) and (" + " or ".join(f"port {p}" for p in ports) + ")",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        line = b""
        while b"listening on" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"tcpdump did not start: {line!r}")
            line = proc.stderr.readline()
        yield proc
    finally:
        if proc.poll() is None:
            time.sleep(0.3)  # let the last packets reach the file
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_call(
    tmp: Path,
    *,
    codec: str = "PCMU",
    caller_text: str = "Hello, this is the caller speaking on a recorded line.",
    callee_text: str = "Good morning, you have reached the callee, how can I help?",
    dtmf: tuple[tuple[float, str], ...] = (),
    caller_tones: tuple[tuple[float, str], ...] = (),
    bye_by: str = "caller",
    reject: int | None = None,
    cancel: bool = False,
    timeout: float = 60.0,
    uac_ip: str = LOOPBACK,
    uas_ip: str = LOOPBACK,
    uac_netns: str | None = None,
    uas_netns: str | None = None,
    capture_on: str | None = "lo",
) -> CallRun:
    """One sipp call, over loopback by default, captured with tcpdump on ``capture_on``.

    With ``uac_netns``/``uas_netns`` each peer runs inside that network namespace (the
    test's own) on the address given, and tcpdump runs in the callee's namespace;
    ``capture_on=None`` skips tcpdump (the recorder under test is then the only capture).

    ``dtmf`` keys go out as RFC 4733 events; ``caller_tones`` keys (seconds into the
    caller's speech, digit) are keypad tones in its audio.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    pt = "0" if codec == "PCMU" else "8"
    caller = callee = None
    if cancel:
        uac = _render("uac_cancel.xml", payload_type=pt, codec=codec)
        uas = _render("uas_ring_cancel.xml")
    elif reject is None:
        (tmp / "a").mkdir(exist_ok=True)
        (tmp / "b").mkdir(exist_ok=True)
        caller = write_rtp_pcap(
            with_key_tones(make_speech(caller_text, tmp / "a"), caller_tones),
            tmp / "caller.pcap",
            codec=codec,
            ssrc=0x0A11CE00,
            dtmf=dtmf,
        )
        callee = write_rtp_pcap(
            make_speech(callee_text, tmp / "b", voice="en-us"),
            tmp / "callee.pcap",
            codec=codec,
            ssrc=0x0B0B0B00,
            seq0=65000,
            ts0=0xFFFFF000,
        )
        talk_ms = int(max(len(caller.reference), len(callee.reference)) / RATE * 1000) + 400
        if bye_by == "caller":
            uac_hangup, uas_hangup = _render("uac_bye.xml"), _render("uas_wait_bye.xml")
        else:
            uac_hangup, uas_hangup = (
                _render("uac_wait_bye.xml"),
                _render("uas_bye.xml", talk_ms=str(talk_ms)),
            )
        after_ack = _render(
            "uac_after_ack_talk.xml",
            audio_pcap=str(caller.pcap),
            talk_ms=str(talk_ms),
            hangup=uac_hangup if bye_by == "caller" else "",
        )
        if bye_by != "caller":
            after_ack = _render(
                "uac_after_ack_talk.xml",
                audio_pcap=str(caller.pcap),
                talk_ms="0",
                hangup=uac_hangup,
            )
        uac = _render("uac.xml", payload_type=pt, codec=codec, final="200", after_ack=after_ack)
        uas = _render(
            "uas.xml", payload_type=pt, codec=codec, audio_pcap=str(callee.pcap), hangup=uas_hangup
        )
    else:
        uac = _render("uac.xml", payload_type=pt, codec=codec, final=str(reject), after_ack="")
        uas = _render("uas_reject.xml")
    (tmp / "uac.xml").write_text(uac, encoding="ascii")
    (tmp / "uas.xml").write_text(uas, encoding="ascii")
    uas_port, uac_port = free_udp_port(), free_udp_port()
    uas_media, uac_media = free_port_pair(), free_port_pair()
    capture = tmp / "call.pcap"
    run = CallRun(capture, caller, callee)
    uac_prefix = ["ip", "netns", "exec", uac_netns] if uac_netns else []
    uas_prefix = ["ip", "netns", "exec", uas_netns] if uas_netns else []
    common = [
        "-m",
        "1",
        "-nostdin",
        "-trace_err",
        "-timeout",
        f"{int(timeout)}s",
        "-timeout_error",
    ]
    call_ports = (uas_port, uac_port, uas_media, uas_media + 1, uac_media, uac_media + 1)
    sniffer = (
        tcpdump(capture, capture_on, uas_netns, ports=call_ports)
        if capture_on
        else contextlib.nullcontext()
    )
    with sniffer:
        uas_proc = subprocess.Popen(
            [
                *uas_prefix,
                "sipp",
                "-sf",
                str(tmp / "uas.xml"),
                "-p",
                str(uas_port),
                "-mp",
                str(uas_media),
                "-i",
                uas_ip,
                "-mi",
                uas_ip,
                *common,
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)
            uac_proc = subprocess.run(
                [
                    *uac_prefix,
                    "sipp",
                    "-sf",
                    str(tmp / "uac.xml"),
                    f"{uas_ip}:{uas_port}",
                    "-p",
                    str(uac_port),
                    "-mp",
                    str(uac_media),
                    "-i",
                    uac_ip,
                    "-mi",
                    uac_ip,
                    *common,
                ],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout + 10,
                check=False,
            )
            run.returncodes["uac"] = uac_proc.returncode
            run.uac_log = uac_proc.stderr.decode(errors="replace")
            try:
                uas_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                uas_proc.kill()
                uas_proc.wait()
            run.returncodes["uas"] = uas_proc.returncode
        finally:
            if uas_proc.poll() is None:
                uas_proc.kill()
                uas_proc.wait()
            if uas_proc.stderr is not None:
                run.uas_log = uas_proc.stderr.read().decode(errors="replace")
                uas_proc.stderr.close()
    for log in tmp.glob("*_errors.log"):
        run.uac_log += "\n" + log.read_text(errors="replace")[-2000:]
    return run


def best_lag(reference: npt.NDArray[np.int16], channel: npt.NDArray[np.int16]) -> tuple[float, int]:
    """Normalised correlation of ``reference`` with ``channel`` at the best lag (samples)."""
    ref = reference.astype(np.float64)
    sig = channel.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(ref) + len(sig))))
    spectrum = np.fft.rfft(sig, n) * np.conj(np.fft.rfft(ref, n))
    xcorr = np.fft.irfft(spectrum, n)[: len(sig)]
    lag = int(np.argmax(xcorr))
    segment = sig[lag : lag + len(ref)]
    ref_part = ref[: len(segment)]
    denom = float(np.linalg.norm(ref_part) * np.linalg.norm(segment))
    return (float(ref_part @ segment) / denom if denom else 0.0), lag


def first_rtp_times(capture: Path) -> dict[int, float]:
    """tshark's view (an independent dissector): capture time of the first RTP packet per source port."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(capture),
            "-o",
            "rtp.heuristic_rtp:TRUE",
            "-Y",
            "rtp",
            "-T",
            "fields",
            "-e",
            "frame.time_epoch",
            "-e",
            "udp.srcport",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    first: dict[int, float] = {}
    for line in out.splitlines():
        ts, port = line.split("\t")
        first.setdefault(int(port), float(ts))
    return first


__all__ = [
    "CallRun",
    "Side",
    "best_lag",
    "first_rtp_times",
    "make_speech",
    "run_call",
    "tcpdump",
    "write_rtp_pcap",
]
