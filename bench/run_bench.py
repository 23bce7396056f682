"""callcap against its baselines, on the same capture, in the same run.

    python bench/run_bench.py --calls 200 --seconds 60
    python bench/run_bench.py --capture existing.pcap --json

Why baselines in the same run: packets per second mean nothing across machines, disks and
cache states.  ``tcpdump -r`` is the floor (reading the file and nothing else); a tshark
field extraction is what a user would script today to get RTP out of a capture.  Each tool
runs as a child process on the same file (already in the page cache: counting its records
reads it once first) and is measured for wall time and peak RSS, taken from the child's own
``rusage`` via :func:`os.wait4` — no sampling, no extra dependency (see ``_LAUNCHER`` for
why a small launcher process does the fork).

Targets (issues): callcap with one worker ≥ 8 % of tcpdump's packets/s and ≥ 5× tshark's;
``callcap record --workers 2`` ≥ 1.7× one worker; peak RSS of all of callcap's processes
together ≤ 200 MB (MB = 10⁶ bytes).  With workers, a process's own ``ru_maxrss`` does not
cover its children, so the launcher also samples the whole process tree (every 20 ms) and
reports the peak of the sum — of PSS, which counts a page shared after ``fork`` once, not
once per process as a sum of RSS would.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# workload.py is a sibling file, not a package module: make it importable however we run.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload

TARGET_VS_TCPDUMP_PCT = 8.0
TARGET_VS_TSHARK_X = 5.0
TARGET_WORKERS_X = 1.7
TARGET_RSS_MB = 200.0
TOOLS = ("tcpdump", "tshark", "tshark-streams", "callcap", "callcap-w2")

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\x4d\x3c\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\xa1\xb2\x3c\x4d": ">",
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_PCAPNG_PACKET_BLOCKS = {2, 3, 6}  # obsolete Packet, Simple Packet, Enhanced Packet


@dataclass(frozen=True, slots=True)
class Result:
    """One tool's run on the capture."""

    tool: str
    command: list[str]
    status: str  # "ok", "failed" or "skipped"
    seconds: float | None = None
    packets_per_s: float | None = None
    peak_rss_mb: float | None = None
    peak_tree_pss_mb: float | None = None  # all the tool's processes together (sampled)
    note: str = ""


def count_records(path: Path) -> int:
    """Records in a classic pcap or pcapng file, walking the headers only.

    Counted once, here, so that every tool's rate uses the same denominator (a tool's own
    count may skip what it cannot decode).
    """
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return 0
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic = bytes(buf[:4])
            if magic in _PCAP_MAGICS:
                rec = struct.Struct(_PCAP_MAGICS[magic] + "8xI4x")
                off, n = 24, 0
                unpack = rec.unpack_from
                while off + 16 <= size:
                    (incl,) = unpack(buf, off)
                    off += 16 + incl
                    if off > size:
                        break  # a truncated last record is not a record
                    n += 1
                return n
            if magic == _PCAPNG_SHB:
                return _count_pcapng(buf, size)
    raise ValueError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")


def _count_pcapng(buf: mmap.mmap, size: int) -> int:
    """pcapng: walk blocks (each section header gives the byte order of its section)."""
    off, n, order = 0, 0, "<"
    while off + 12 <= size:
        if bytes(buf[off : off + 4]) == _PCAPNG_SHB:
            order = "<" if bytes(buf[off + 8 : off + 12]) == b"\x4d\x3c\x2b\x1a" else ">"
        btype, blen = struct.unpack_from(order + "II", buf, off)
        if blen < 12 or off + blen > size:
            break
        n += btype in _PCAPNG_PACKET_BLOCKS
        off += blen
    return n


def _callcap_command() -> list[str] | None:
    """The ``callcap`` console script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "callcap"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("callcap")
    return [found] if found else None


# The child is started by this small launcher, not by us: Linux carries the RSS high-water mark
# of the process image a child was forked from into its ru_maxrss (exec keeps the maximum), so
# a tool forked from this numpy-loaded interpreter would never report less than our own RSS.
# A fresh `python -I -S` forks the tool from a ~10 MB image instead, times it and reports its
# rusage.  (Measured: `true` forked from a 218 MB Python reports 218 MB.)
_LAUNCHER = """
import os, sys, threading, time
out = sys.argv[1]

def tree(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return pids

def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

peak = [0]
done = threading.Event()

def sample(pid):
    while not done.wait(0.02):
        peak[0] = max(peak[0], sum(pss_kib(p) for p in tree(pid)))

start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
watcher = threading.Thread(target=sample, args=(pid,), daemon=True)
watcher.start()
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
done.set()
watcher.join()
with open(out, "w") as fh:
    fh.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {peak[0]}")
"""


def _compile_callcap() -> None:
    """Byte-compile callcap's modules, as an installed copy has them.

    An editable install run with ``PYTHONDONTWRITEBYTECODE`` set (common in containers and
    CI) would otherwise compile every module from source at each start: about 0.1 s per run
    that no installed copy pays (``pip install`` compiles at install time).
    """
    packages = ("callcap", "callcap.capture", "callcap.codecs", "callcap.storage", "callcap.config")
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            return
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, maxlevels=0, quiet=1)


def measure(tool: str, argv: list[str], stdout: Path | None, packets: int, work: Path) -> Result:
    """Run ``argv`` once through the launcher: wall time around the child, its peak RSS."""
    err_path = work / f"{tool}.stderr"
    report = work / f"{tool}.rusage"
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *argv]
    with err_path.open("wb") as err, stdout.open("wb") if stdout else open(os.devnull, "wb") as out:
        proc = subprocess.run(launcher, stdout=out, stderr=err, check=False)
    try:
        seconds_s, maxrss_kib, code_s, pss_kib = report.read_text().split()
    except (OSError, ValueError):
        return Result(tool, argv, "failed", note=f"launcher failed (exit {proc.returncode})")
    seconds, code = float(seconds_s), int(code_s)
    rss_mb = int(maxrss_kib) * 1024 / 1e6  # Linux reports KiB
    # a run shorter than one sample has no tree figure: its own peak RSS stands in
    tree_mb = int(pss_kib) * 1024 / 1e6 or rss_mb
    if code != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
        return Result(
            tool, argv, "failed", seconds, None, rss_mb, tree_mb, f"exit {code}: {' | '.join(tail)}"
        )
    pps = packets / seconds if seconds > 0 else None
    return Result(tool, argv, "ok", seconds, pps, rss_mb, tree_mb)


def best_of(runs: Sequence[Result]) -> Result:
    """Fastest wall time of the repeats (the least disturbed by other load), largest peak RSS."""
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        return failed[0]
    fastest = min(runs, key=lambda r: r.seconds or 0.0)
    peak = max(r.peak_rss_mb or 0.0 for r in runs)
    tree = max(r.peak_tree_pss_mb or 0.0 for r in runs)
    return Result(**{**asdict(fastest), "peak_rss_mb": peak, "peak_tree_pss_mb": tree})


def run_tools(
    capture: Path, packets: int, work: Path, tools: Sequence[str], repeat: int = 1
) -> list[Result]:
    cap = str(capture)
    results: list[Result] = []
    rtp_fields = [
        "frame.time_epoch", "ip.src", "udp.srcport", "ip.dst", "udp.dstport",
        "rtp.ssrc", "rtp.seq", "rtp.timestamp", "rtp.payload",
    ]  # fmt: skip
    fields = [arg for f in rtp_fields for arg in ("-e", f)]
    callcap = _callcap_command()
    if callcap and {"callcap", "callcap-w2"} & set(tools):
        _compile_callcap()
    plan: dict[str, tuple[list[str] | None, Path | None, str]] = {
        "tcpdump": (["tcpdump", "-r", cap, "-w", os.devnull], None, "tcpdump not on PATH"),
        "tshark": (
            [
                "tshark",
                "-r",
                cap,
                "-o",
                "rtp.heuristic_rtp:TRUE",
                "-Y",
                "rtp",
                "-T",
                "fields",
                *fields,
            ],
            work / "tshark-rtp.tsv",
            "tshark not on PATH",
        ),
        "tshark-streams": (
            ["tshark", "-r", cap, "-o", "rtp.heuristic_rtp:TRUE", "-q", "-z", "rtp,streams"],
            work / "tshark-streams.txt",
            "tshark not on PATH",
        ),
        "callcap": (
            [*callcap, "record", cap, "--out", str(work / "callcap-out")] if callcap else None,
            None,
            "callcap console script not found (install the project: pip install -e .)",
        ),
        "callcap-w2": (
            [*callcap, "record", "--workers", "2", cap, "--out", str(work / "callcap-w2-out")]
            if callcap
            else None,
            None,
            "callcap console script not found (install the project: pip install -e .)",
        ),
    }
    for tool in tools:
        argv, stdout, missing = plan[tool]
        if argv is None or shutil.which(argv[0]) is None:
            results.append(Result(tool, argv or [], "skipped", note=missing))
            print(f"bench: {tool}: skipped ({missing})", file=sys.stderr)
            continue
        print(f"bench: running {tool} …", file=sys.stderr, flush=True)
        runs: list[Result] = []
        for _ in range(repeat):
            if tool.startswith("callcap"):
                shutil.rmtree(work / f"{tool}-out", ignore_errors=True)
            # Each run starts with nothing waiting to be written back: otherwise a run pays
            # for the disk writes of the one before it (callcap's recordings, tshark's output).
            os.sync()
            runs.append(measure(tool, argv, stdout, packets, work))
            if runs[-1].status != "ok":
                break
        result = best_of(runs)
        if tool.startswith("callcap") and result.status == "ok":
            wavs = sum(1 for _ in (work / f"{tool}-out").rglob("*.wav"))
            result = Result(**{**asdict(result), "note": f"{wavs} recordings"})
        results.append(result)
    return results


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def evaluate(results: Sequence[Result]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """The ratios callcap/tcpdump (%) and callcap/tshark (×), and the issue's three targets."""
    by = {r.tool: r for r in results}

    def pps(tool: str) -> float | None:
        r = by.get(tool)
        return r.packets_per_s if r and r.status == "ok" else None

    vs_tcpdump = _ratio(pps("callcap"), pps("tcpdump"))
    ratios = {
        "callcap_vs_tcpdump_pct": None if vs_tcpdump is None else 100 * vs_tcpdump,
        "callcap_vs_tshark_x": _ratio(pps("callcap"), pps("tshark")),
        "callcap_vs_tshark_streams_x": _ratio(pps("callcap"), pps("tshark-streams")),
        "workers2_vs_1_x": _ratio(pps("callcap-w2"), pps("callcap")),
    }
    mine = [by[t] for t in ("callcap", "callcap-w2") if t in by and by[t].status == "ok"]
    rss = max((r.peak_tree_pss_mb or 0.0 for r in mine), default=None)

    def target(name: str, value: float | None, goal: float, higher: bool) -> dict[str, Any]:
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= goal if higher else value <= goal) else "FAIL"
        return {"target": name, "value": value, "goal": goal, "result": verdict}

    targets = [
        target(
            "callcap >= 8 % of tcpdump packets/s",
            ratios["callcap_vs_tcpdump_pct"],
            TARGET_VS_TCPDUMP_PCT,
            True,
        ),
        target(
            "callcap >= 5x tshark packets/s",
            ratios["callcap_vs_tshark_x"],
            TARGET_VS_TSHARK_X,
            True,
        ),
        target(
            "callcap --workers 2 >= 1.7x one worker",
            ratios["workers2_vs_1_x"],
            TARGET_WORKERS_X,
            True,
        ),
        target("callcap peak memory, all processes <= 200 MB", rss, TARGET_RSS_MB, False),
    ]
    return ratios, targets


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(
    capture: Path,
    packets: int,
    results: Sequence[Result],
    ratios: dict[str, float | None],
    targets: Sequence[dict[str, Any]],
) -> str:
    size_mb = capture.stat().st_size / 1e6
    lines = [
        f"capture: {capture} ({packets} packets, {size_mb:.1f} MB)",
        "",
        f"{'tool':<15} {'seconds':>9} {'packets/s':>12} {'peak RSS MB':>12} "
        f"{'all procs MB':>13}  note",
    ]
    for r in results:
        note = r.note if r.status == "ok" else f"{r.status.upper()}: {r.note}"
        lines.append(
            f"{r.tool:<15} {_fmt(r.seconds, '9.2f')} {_fmt(r.packets_per_s, '12,.0f')} "
            f"{_fmt(r.peak_rss_mb, '12.1f')} {_fmt(r.peak_tree_pss_mb, '13.1f')}  {note}"
        )
    lines += [
        "",
        f"callcap / tcpdump:        {_fmt(ratios['callcap_vs_tcpdump_pct'], '.1f')} %",
        f"callcap / tshark fields:  {_fmt(ratios['callcap_vs_tshark_x'], '.2f')} x",
        f"callcap / tshark streams: {_fmt(ratios['callcap_vs_tshark_streams_x'], '.2f')} x",
        f"--workers 2 / 1 worker:   {_fmt(ratios['workers2_vs_1_x'], '.2f')} x",
        "",
    ]
    for t in targets:
        lines.append(f"{t['result']:<5} {t['target']} (measured {_fmt(t['value'], '.2f')})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark callcap against tcpdump and tshark.")
    p.add_argument("--calls", type=int, default=200, help="calls in the generated workload")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the generated workload")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--codec", choices=workload.CODECS, default="pcmu", help="workload codec")
    p.add_argument("--capture", type=Path, help="benchmark this capture instead of generating one")
    p.add_argument("--keep", action="store_true", help="keep the work directory and print it")
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"comma-separated subset of {','.join(TOOLS)} (default: all)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per tool; the fastest counts (default 1)"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--check", action="store_true", help="exit 1 unless every target passes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        print(f"bench: unknown tool(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="callcap-bench-"))
    try:
        generated: dict[str, Any] | None = None
        if args.capture is not None:
            capture = args.capture.resolve()
        else:
            capture = work / "workload.pcap"
            print(
                f"bench: generating {args.calls} calls x {args.seconds:g} s …",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            info = workload.write_workload(
                capture, calls=args.calls, seconds=args.seconds, seed=args.seed, codec=args.codec
            )
            generated = {
                "calls": args.calls,
                "seconds": args.seconds,
                "seed": args.seed,
                "codec": args.codec,
                "packets": info.total_packets,
                "generation_seconds": time.perf_counter() - started,
            }
        packets = count_records(capture)
        results = run_tools(capture, packets, work, tools, max(1, args.repeat))
        ratios, targets = evaluate(results)
        if args.json:
            doc = {
                "capture": str(capture),
                "capture_bytes": capture.stat().st_size,
                "packets": packets,
                "generated": generated,
                "results": [asdict(r) for r in results],
                "ratios": ratios,
                "targets": targets,
                "work_dir": str(work) if args.keep else None,
            }
            print(json.dumps(doc, indent=2))
        else:
            if generated:
                print(
                    f"generated: {generated['calls']} calls x {generated['seconds']:g} s, "
                    f"{generated['packets']} packets in {generated['generation_seconds']:.2f} s"
                )
            print(render(capture, packets, results, ratios, targets))
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.check and any(t["result"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
