"""What floods cost: never-answered INVITEs, and RTP to ports no call negotiated.

    python bench/floods.py invites --invites 50000 --seconds 5
    python bench/floods.py unknown-rtp --packets 1000000 --rate 100000

``invites`` writes one real 12 s call (``workload.write_workload``) with a flood of
never-answered INVITEs (each its own Call-ID, with an SDP offer) over ``--seconds`` in its
middle, records it with ``callcap record`` and, in the same command, the call alone as the
baseline: peak RSS of each, the flood's evictions, and whether the real call came out whole
(every 20 ms frame of both channels holding its tone).

``unknown-rtp`` writes ``--packets`` RTP packets to ports no SDP named, at ``--rate``
packets/s of capture time, beside one real call, and records it and the call alone: the
extra CPU per unknown packet is what the classification step costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from workload import udp_frame, write_workload

from callcap.capture.pcapfile import CaptureReader

T0 = 1_700_000_000.0


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts, frame in frames:
            sec, usec = divmod(round(ts * 1e6), 1_000_000)
            f.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
            f.write(frame)


def real_call(path: Path) -> tuple[list[tuple[float, bytes]], object]:
    info = write_workload(path, calls=1, seconds=12, seed=9, start_time=T0)
    with CaptureReader(str(path)) as reader:
        return [(ts, frame) for ts, _lt, frame in reader], info


def invite_frame(k: int) -> bytes:
    a = f"10.9.{(k >> 8) & 0xFF}.{k & 0xFF or 1}"
    body = (
        f"v=0\r\no=- {k} {k} IN IP4 {a}\r\ns=-\r\nc=IN IP4 {a}\r\nt=0 0\r\n"
        f"m=audio {20000 + (k % 20000) * 2} RTP/AVP 0 8\r\na=sendrecv\r\n"
    )
    text = (
        f"INVITE sip:flood{k}@10.8.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {a}:5060;branch=z9hG4bKflood{k}\r\n"
        f"From: <sip:spam{k}@{a}>;tag=f{k}\r\nTo: <sip:flood{k}@10.8.0.1>\r\n"
        f"Call-ID: flood-{k}@{a}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:spam{k}@{a}:5060>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    return udp_frame(a, 5060, "10.8.0.1", 5060, text.encode())


def rtp_frame(k: int, seq: int) -> bytes:
    header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, 0xF100D + k)
    return udp_frame(
        f"10.7.{k >> 8 & 0xFF}.{k & 0xFF or 1}", 40000 + k % 1000, "10.6.0.1", 50000 + k % 1000,
        header + b"\xff" * 160,
    )  # fmt: skip


# The child's own peak (VmHWM of its address space): getrusage's ru_maxrss would also count
# this parent's pages, which the child held from its fork until its exec.
_MEASURE = """
import sys
from callcap.cli import main
status = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
sys.stderr.write(f"\\nMAXRSS_KB {hwm}\\n")
sys.exit(status)
"""


def record_child(capture: Path, out: Path, config: Path | None = None) -> dict[str, Any]:
    """``callcap record`` in a child: its wall time, CPU time and peak RSS."""
    extra = ["--config", str(config)] if config is not None else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, "record", str(capture), "--out", str(out),
         "--workers", "1", "--log-format", "json", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"record failed ({proc.returncode}): {proc.stderr[-2000:]}")
    finished = [
        json.loads(line) for line in proc.stderr.splitlines() if '"record_finished"' in line
    ]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_mb": next(
            int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")
        )
        / 1024,
        **({"finished": finished[-1]} if finished else {}),
    }


def _whole(out: Path, info: object) -> float:
    """The share of 20 ms frames of the real call, both channels, that hold its tones."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tones import tone_frames  # the test suite's tone detector

    call = info.calls[0]  # type: ignore[attr-defined]
    (sidecar,) = [p for p in out.rglob("*.json") if call.call_id in p.read_text()]
    audio, rate = soundfile.read(sidecar.with_suffix(".wav"), dtype="int16")
    first = min(call.caller.first_time, call.callee.first_time)
    held = []
    for ch, side in ((0, call.caller), (1, call.callee)):
        a = int((side.first_time - first + 0.1) * rate)
        b = int((side.first_time - first + side.packets_sent * 0.02 - 0.1) * rate)
        held.append(float(tone_frames(audio[a:b, ch], side.tone_hz).mean()))
    return min(held)


def invites(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="callcap-flood-") as tmp:
        work = Path(tmp)
        real, info = real_call(work / "call.pcap")
        n = args.invites
        times = T0 + 2.0 + np.linspace(0.0, args.seconds, n, endpoint=False)
        flood = [(float(t), invite_frame(k)) for k, t in enumerate(times)]
        write_pcap(work / "flood.pcap", sorted(real + flood, key=lambda x: x[0]))
        unbounded = work / "unbounded.yaml"
        unbounded.write_text("calls:\n  max_pending_calls: 100000000\n")
        alone = record_child(work / "call.pcap", work / "alone")
        before = record_child(work / "flood.pcap", work / "before", unbounded)
        flooded = record_child(work / "flood.pcap", work / "flooded")
        whole = _whole(work / "flooded", info)
        print(
            f"{n} unanswered INVITEs in {args.seconds:g} s beside one 12 s call: "
            f"peak RSS {flooded['rss_mb']:.0f} MB with calls.max_pending_calls "
            f"(unbounded: {before['rss_mb']:.0f} MB; the call alone: {alone['rss_mb']:.0f} MB), "
            f"{flooded['cpu_s']:.1f} s CPU (unbounded {before['cpu_s']:.1f} s, "
            f"alone {alone['cpu_s']:.1f} s); real call held {whole:.4f} of its frames "
            f"(unbounded: {_whole(work / 'before', info):.4f})"
        )
        fin = flooded.get("finished", {})
        print("record_finished:", {k: v for k, v in fin.items() if k not in ("ts", "level")})


def unknown_rtp(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="callcap-flood-") as tmp:
        work = Path(tmp)
        real, info = real_call(work / "call.pcap")
        n = args.packets
        times = T0 + 1.0 + np.arange(n) / args.rate
        flows = 1000
        noise = [(float(t), rtp_frame(k % flows, k // flows)) for k, t in enumerate(times)]
        write_pcap(work / "noise.pcap", sorted(real + noise, key=lambda x: x[0]))
        alone = record_child(work / "call.pcap", work / "alone")
        noisy = record_child(work / "noise.pcap", work / "noisy")
        extra = (noisy["cpu_s"] - alone["cpu_s"]) / n * 1e6
        whole = _whole(work / "noisy", info)
        print(
            f"{n} RTP packets to unknown ports ({flows} flows, {args.rate:g} packets/s) beside "
            f"one call: {noisy['cpu_s']:.2f} s CPU vs {alone['cpu_s']:.2f} s for the call "
            f"alone: {extra:.2f} µs per unknown packet; capacity at that cost "
            f"{1e6 / extra:,.0f} packets/s per core; peak RSS {noisy['rss_mb']:.0f} MB; "
            f"real call held {whole:.4f} of its frames"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("invites")
    p.add_argument("--invites", type=int, default=50_000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.set_defaults(run=invites)
    p = sub.add_parser("unknown-rtp")
    p.add_argument("--packets", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=100_000.0)
    p.set_defaults(run=unknown_rtp)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
