"""Live capacity ladder: ``callcap daemon`` on a veth link, fed N concurrent calls by tcpreplay.

    sudo .venv/bin/python bench/live_ladder.py                      # 500, 1000, 2000, +1000 …
    sudo .venv/bin/python bench/live_ladder.py --calls 50,200 --seconds 10 --json out.json

Why live: ``run_bench.py`` measures the recorder on a file, as fast as it can read; a live
recorder must keep up with packets that arrive at their own pace, and what it cannot take
in time the kernel drops.  So for each rung N of the ladder:

1. a workload of N concurrent G.711 calls (``workload.write_workload``, with its ground
   truth) is generated, or taken from ``--cache``;
2. two fresh network namespaces are joined by a veth pair (names unique to the run, always
   removed, on errors and Ctrl-C too);
3. ``callcap daemon`` runs in the receiving namespace on the receiving veth end, pinned to
   the daemon core with ``taskset``; READY=1 on its notify socket says it captures;
4. its idle RSS (master + workers) is read, then the capture is replayed with ``tcpreplay``
   from the sending namespace, pinned to the sender core, at the pace it was recorded;
5. RSS is sampled every 0.2 s for the peak; after the replay the ladder waits until every
   call is published (``recordings_total`` = N), reads the daemon's CPU time, stops it with
   SIGTERM, and checks every call against the ground truth (``check_calls``).

A rung *holds* when the kernel dropped nothing and every call is complete.  Targets: 2,000
calls held on one core; ≤ 5 µs of daemon CPU per received packet on every rung that held;
≤ 64 KiB of RSS per call over the idle daemon.  MB = 10⁶ bytes, KiB = 1024 bytes.

Where the CPU goes: the daemon's figure is its processes' user + system time (``/proc``).
On a veth link the kernel copies each frame into the capture ring in the *sender's*
softirq, so that part is charged to the sender core, not to the daemon.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# workload.py and run_bench.py are sibling files, not package modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import run_bench
import soundfile
import workload

TARGET_HELD_CALLS = 2000
TARGET_US_PER_PACKET = 5.0
TARGET_KIB_PER_CALL = 64.0
DEFAULT_LADDER = (500, 1000, 2000)
LADDER_STEP = 1000

RATE = 8000
FRAME = 160  # 20 ms
EDGE_S = 0.1  # talk time left out of the tone check at each end
TONE_TOLERANCE_HZ = 5.0
TONE_HELD_SHARE = 0.99
MIN_RMS = 1000.0  # the generator's tones are at 0.3 of full scale: RMS ~ 6950
NFFT = 512  # Hann window, zero-padded, parabolic peak: ~0.1 Hz off for these tones
SAMPLE_S = 0.2
LAG_NOTE_S = 0.05  # a sender this far behind the recorded pace is worth a note
IDLE_S = 2.0  # the idle daemon is watched this long before the replay
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 120.0  # the daemon gives its workers 80 s to publish
REQUIRED_TOOLS = ("ip", "tcpreplay", "taskset")

_ACTUAL = re.compile(r"Actual: (\d+) packets \((\d+) bytes\) sent in ([\d.]+) seconds")
_RATED = re.compile(r"Rated: ([\d.]+) Bps, ([\d.]+) Mbps, ([\d.]+) pps")
_DEVICE = {
    "successful": re.compile(r"Successful packets:\s+(\d+)"),
    "failed": re.compile(r"Failed packets:\s+(\d+)"),
    "retried_enobufs": re.compile(r"Retried packets \(ENOBUFS\):\s+(\d+)"),
    "retried_eagain": re.compile(r"Retried packets \(EAGAIN\):\s+(\d+)"),
}


class LadderError(Exception):
    """A rung could not be run (a tool failed, the daemon did not start)."""


# -- small helpers ------------------------------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """A taskset/cpuset list ("1", "0-3", "0,2-3") as CPU numbers."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return sorted(cpus)


def _iso(text: str) -> float:
    """A sidecar time ("2023-11-14T22:13:20.477Z") as epoch seconds."""
    return dt.datetime.fromisoformat(text).timestamp()


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Cleanup that a second Ctrl-C (or SIGTERM) must not cut short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _ip(*args: str) -> None:
    proc = _run(["ip", *args])
    if proc.returncode != 0:
        raise LadderError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


# -- processes: RSS and CPU from /proc ----------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the daemon's workers), from /proc/<pid>/task/*/children."""
    pids = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pids: Sequence[int]) -> int:
    """VmRSS of the processes, summed (shared pages of forked workers count once each)."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def pss_bytes(pids: Sequence[int]) -> int:
    """Proportional set size, summed: shared pages split between the processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (fields 14 and 15 of /proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            total += int(fields[11]) + int(fields[12])
    return total / tick


# -- the network --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """Two namespaces joined by a veth pair: the sender's end and the recorder's."""

    send_ns: str
    recv_ns: str
    send_dev: str
    recv_dev: str


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace ``ns`` (one this run created)."""
    proc = _run(["ip", "netns", "pids", ns])
    for word in proc.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


@contextlib.contextmanager
def veth_link(tag: str) -> Iterator[Link]:
    """Fresh namespaces ``cclive-<tag>-s``/``-r`` joined by a veth; removed on any exit."""
    link = Link(f"cclive-{tag}-s", f"cclive-{tag}-r", f"cl{tag}s", f"cl{tag}r")
    created: list[str] = []
    try:
        for ns in (link.send_ns, link.recv_ns):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "link", "add", link.send_dev, "netns", link.send_ns, "type", "veth",
            "peer", "name", link.recv_dev, "netns", link.recv_ns,
        )  # fmt: skip
        net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250) + 1}"
        ends = ((link.send_ns, link.send_dev), (link.recv_ns, link.recv_dev))
        for i, (ns, dev) in enumerate(ends):
            # no IPv6 autoconfiguration chatter on the link: only the replayed frames
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  f"net.ipv6.conf.{dev}.disable_ipv6=1"])  # fmt: skip
            _ip("-n", ns, "addr", "add", f"{net}.{i + 1}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield link
    finally:
        with _shielded():
            for ns in created:  # deleting a namespace deletes the interfaces inside it
                _kill_namespace_processes(ns)
                _run(["ip", "netns", "delete", ns])
            left = _run(["ip", "netns", "list"]).stdout.split()
            stuck = [ns for ns in created if ns in left]
            if stuck:
                print(f"live_ladder: could not delete namespace(s) {stuck}", file=sys.stderr)


MIB = 1 << 20


def recordings_size(calls: int, seconds: float) -> int:
    """Room for one rung's recordings and spool: 32 kB/s of WAV per call, for up to twice
    the calls' length (a sender that falls behind stretches them), and the fs's own."""
    return int(calls * seconds * 32_000 * 2) + 1024 * MIB


@contextlib.contextmanager
def recordings_fs(work: Path, size: int, *, keep: bool = False) -> Iterator[Path]:
    """A fresh ext4 of the run's own, made with mkfs's defaults (journal, hashed
    directories — what a sensor's disk has), mounted for the daemons' recordings.

    Why not the work directory's filesystem: what it holds and has just deleted changes what
    a file creation costs.  On an ext4 made without a journal the inode allocator skips
    every inode freed in the last minutes (``recently_deleted``), so right after a rung (or
    another run) removed thousands of recordings a new file costs 0.4-0.5 ms of CPU against
    some 20 µs; a daemon creating four files per call then overruns for the
    benchmark's own clean-up.  A sparse image: only what is written takes room.  ``keep``
    leaves it mounted (``--keep``: the recordings are there to look at)."""
    image = work / "recordings.img"
    mount = work / "recordings"
    mount.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(size)
    made = _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                 "lazy_itable_init=0,lazy_journal_init=0", str(image)], timeout=600)  # fmt: skip
    if made.returncode != 0:
        raise LadderError(f"mkfs.ext4 failed: {made.stderr.strip()[:300]}")
    # nobarrier: the loop device would turn every cache flush into an fsync of the whole
    # image on the host (twice a plain fsync's wait); without, an fsync costs what it costs
    # on the host's disk (0.56 against 0.67 ms for a 640 kB file, measured).
    mounted = _run(["mount", "-o", "loop,nobarrier", str(image), str(mount)], timeout=60)
    if mounted.returncode != 0:
        raise LadderError(f"cannot mount the recordings image: {mounted.stderr.strip()[:300]}")
    try:
        yield mount
    finally:
        if keep:
            print(f"live_ladder: recordings left mounted on {mount}", file=sys.stderr)
        else:
            with _shielded():
                if _run(["umount", str(mount)], timeout=120).returncode != 0:
                    _run(["umount", "-l", str(mount)], timeout=60)
                image.unlink(missing_ok=True)


def link_stats(ns: str, dev: str) -> dict[str, int]:
    """rx/tx packets and drops of ``dev`` in ``ns`` (zeros if ip cannot say)."""
    proc = _run(["ip", "-n", ns, "-s", "-j", "link", "show", dev])
    try:
        stats = json.loads(proc.stdout)[0]["stats64"]
        return {
            "rx_packets": int(stats["rx"]["packets"]),
            "rx_dropped": int(stats["rx"]["dropped"]),
            "tx_packets": int(stats["tx"]["packets"]),
            "tx_dropped": int(stats["tx"]["dropped"]),
        }
    except (ValueError, KeyError, IndexError, TypeError):
        return {"rx_packets": 0, "rx_dropped": 0, "tx_packets": 0, "tx_dropped": 0}


def softnet_dropped() -> int:
    """Packets the kernel's per-CPU input backlogs dropped, all CPUs (machine-wide)."""
    try:
        lines = Path("/proc/net/softnet_stat").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1], 16) for line in lines if line.strip())


# -- the daemon ---------------------------------------------------------------------------


class Daemon:
    """``callcap daemon`` as a child process: its notify socket and its JSON log."""

    def __init__(self, argv: Sequence[str], notify_path: Path, err_path: Path) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.stats: list[dict[str, Any]] = []  # every capture_stats, in order
        self.counts: collections.Counter[str] = collections.Counter()  # events by name
        self.problems: list[dict[str, Any]] = []  # warning/error events (first 200)
        self.bad_lines = 0
        self._lock = threading.Lock()
        self._err = err_path.open("wb")
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_path = err_path

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if not isinstance(event, dict):
                self.bad_lines += 1
                continue
            name = str(event.get("event"))
            with self._lock:
                self.counts[name] += 1
                if name == "capture_stats":
                    self.stats.append(event)
                elif event.get("level") in ("warning", "error") and len(self.problems) < 200:
                    self.problems.append(event)

    def stderr_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            self._err.flush()
            return " | ".join(self._err_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LadderError(
                    f"daemon exited with {self.proc.returncode} before READY=1: "
                    f"{self.stderr_tail()} {self.problems[-3:]}"
                )
            self.notify.settimeout(0.25)
            try:
                data = self.notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in data.splitlines():
                return
        raise LadderError(f"no READY=1 from the daemon within {timeout:g} s")

    def last_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.stats[-1]) if self.stats else {}

    def stats_count(self) -> int:
        with self._lock:
            return len(self.stats)

    def wait_stats(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, tick: Callable[[], None]
    ) -> bool:
        """Until a capture_stats satisfies ``pred`` (True) or ``timeout`` passes (False);
        ``tick`` runs every sample period meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last_stats()
            if last and pred(last):
                return True
            if self.proc.poll() is not None:
                return False
            tick()
            time.sleep(SAMPLE_S)
        return False

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM and wait: (exit status or None if it had to be killed, seconds)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.kill()
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the master and its workers (by PID), then reap."""
        if self.proc.poll() is None:
            for pid in reversed(self.pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def close(self) -> None:
        with _shielded():
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.kill()
            self._reader.join(timeout=5)
            self.notify.close()
            self._err.close()


def daemon_config(path: Path, out: Path, calls: int, args: argparse.Namespace) -> Path:
    """The rung's config: promiscuous (the replayed frames are not addressed to the veth),
    stats every second, no control socket, no retention sweep, the ring if asked for."""
    ring = {
        key: value
        for key, value in (
            ("block_size", args.ring_block_size),
            ("blocks", args.ring_blocks),
            ("retire_timeout_ms", args.retire_timeout_ms),
        )
        if value is not None
    }
    lines = ["capture:", "  promiscuous: true"]
    if ring:
        lines.append("  ring:")
        lines += [f"    {key}: {value}" for key, value in ring.items()]
    lines += [
        "calls:",
        f"  max_active_calls: {max(10000, 2 * calls)}",
        "recording:",
        f"  out_dir: {json.dumps(str(out))}",
        "retention:",
        "  sweep_interval_s: 0",
        "logging:",
        "  stats_interval_s: 1",
        "control:",
        "  socket: null",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- workloads ----------------------------------------------------------------------------


def workload_files(
    n: int, args: argparse.Namespace, directory: Path
) -> tuple[Path, dict[str, Any], bool]:
    """The rung's pcap and its ground truth (as a dict), generated unless cached.
    Returns (pcap, truth, generated)."""
    stem = f"live-{n}c-{args.seconds:g}s-seed{args.seed}-{args.codec}"
    pcap, info_path = directory / f"{stem}.pcap", directory / f"{stem}.json"
    if pcap.is_file() and info_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            truth = json.loads(info_path.read_text(encoding="utf-8"))
            if len(truth.get("calls", ())) == n:
                return pcap, truth, False
    directory.mkdir(parents=True, exist_ok=True)
    tmp = pcap.with_suffix(".pcap.part")
    info = workload.write_workload(
        tmp, calls=n, seconds=args.seconds, seed=args.seed, codec=args.codec
    )
    truth = info.to_dict()
    info_tmp = info_path.with_suffix(".json.part")
    info_tmp.write_text(json.dumps(truth), encoding="utf-8")
    tmp.replace(pcap)
    info_tmp.replace(info_path)  # the truth last: a pcap without one is regenerated
    return pcap, truth, True


# -- the "complete" check -----------------------------------------------------------------


def dominant_hz(frames: np.ndarray) -> np.ndarray:
    """Dominant frequency of each row (a 20 ms frame): Hann window, zero-padded FFT,
    parabolic interpolation of the log magnitude around the peak bin."""
    window = np.hanning(frames.shape[1])
    mag = np.abs(np.fft.rfft(frames * window, n=NFFT, axis=1))
    k = np.argmax(mag[:, 1:-1], axis=1) + 1
    rows = np.arange(len(frames))
    a, b, c = (np.log(mag[rows, k + d] + 1e-9) for d in (-1, 0, 1))
    denom = a - 2 * b + c
    shift = np.where(denom < 0, 0.5 * (a - c) / np.where(denom < 0, denom, -1.0), 0.0)
    hz: np.ndarray = (k + shift) * RATE / NFFT
    return hz


@dataclass(frozen=True, slots=True)
class ToneCheck:
    """One channel over its talk time, in 20 ms frames."""

    held: int  # frames that hold the tone (loud, dominant frequency within tolerance)
    silent_s: float  # the longest run of frames below MIN_RMS, seconds
    other: int  # loud frames away from any inserted silence whose dominant frequency is another
    edges: int  # loud frames next to or holding inserted silence (their spectrum is smeared)


def tone_check(channel: np.ndarray, hz: float, start_s: float, end_s: float) -> ToneCheck:
    """The 20 ms frames from ``start_s`` to ``end_s`` (seconds into the WAV): how many have
    a dominant frequency within the tolerance of ``hz`` and an RMS well above silence; the
    longest silent stretch; how many loud frames carry another frequency.

    A frame that holds the edge of inserted silence (a run of exact zeros: where placement
    moved on to follow a sender that fell behind its RTP clock), or sits next to one, has a
    spectrum smeared by the step; those are counted apart (``edges``), not as another tone.
    (A 0.3 full-scale tone never decodes to several zero samples in a row.)
    """
    a, b = max(0, round(start_s * RATE)), min(len(channel), round(end_s * RATE))
    n = (b - a) // FRAME
    if n <= 0:
        return ToneCheck(0, 0.0, 0, 0)
    raw = channel[a : a + n * FRAME].reshape(n, FRAME)
    x = raw.astype(np.float64)
    loud = np.sqrt((x * x).mean(axis=1)) >= MIN_RMS
    near = np.abs(dominant_hz(x) - hz) <= TONE_TOLERANCE_HZ
    zero = raw == 0
    run4 = zero[:, :-3] & zero[:, 1:-2] & zero[:, 2:-1] & zero[:, 3:]
    holey = run4.any(axis=1) | ~loud
    edge = holey.copy()
    edge[1:] |= holey[:-1]
    edge[:-1] |= holey[1:]
    quiet = np.concatenate(([0], (~loud).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(quiet))
    longest = int((edges[1::2] - edges[::2]).max()) if len(edges) else 0
    off = loud & ~near
    return ToneCheck(
        int((loud & near).sum()),
        longest * FRAME / RATE,
        int((off & ~edge).sum()),
        int((off & edge).sum()),
    )


def _sidecars(out: Path) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = collections.defaultdict(list)
    for path in out.rglob("*.json"):
        if any(part.startswith(".") for part in path.relative_to(out).parts):
            continue  # the spool
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and "call_id" in doc:
                found[str(doc["call_id"])].append((path, doc))
    return found


def check_call(
    truth: dict[str, Any], found: list[tuple[Path, dict[str, Any]]], stretches: list[float]
) -> list[str]:
    """Why one call is not complete (an empty list: it is).  Complete: one sidecar and a
    WAV; per direction one stream with exactly the packets sent and none lost; and each
    channel holds its side's tone over its talk time — from the side's first packet to the
    end of its last, as they arrived, 0.1 s left out at each end — in at least as many
    20 ms frames (dominant frequency within 5 Hz, RMS well above silence) as 99 % of the
    packets sent there, with at most 1 % of that number of loud frames of another tone away
    from the edges of inserted silence (:func:`tone_check`).

    ``stretches`` gets, per stream, how much longer its packets took to arrive than their
    media lasts (first to last arrival minus 20 ms per packet after the first): a sender
    that falls behind its own RTP clock shows here."""
    if len(found) != 1:
        return ["no sidecar" if not found else f"{len(found)} sidecars"]
    sidecar, doc = found[0]
    for stream in doc.get("streams", ()):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            media = (int(stream["packets"]) - 1) * FRAME / RATE
            stretches.append(_iso(stream["last"]) - _iso(stream["first"]) - media)
    audio = doc.get("audio") or {}
    wav = sidecar.parent / audio["file"] if audio.get("file") else None
    if wav is None or not wav.is_file():
        return ["no WAV"]
    problems: list[str] = []
    streams = {}
    for side in ("caller", "callee"):
        mine = [s for s in doc.get("streams", ()) if s.get("side") == side]
        if len(mine) != 1:
            problems.append(f"{side}: {len(mine)} streams")
            continue
        stream, sent = mine[0], truth[side]["packets_sent"]
        if stream.get("packets") != sent:
            problems.append(f"{side}: packets {stream.get('packets')} != {sent} sent")
        if stream.get("lost") != 0:
            problems.append(f"{side}: lost {stream.get('lost')}")
        streams[side] = stream
    try:
        samples, rate = soundfile.read(str(wav), dtype="int16", always_2d=True)
    except (RuntimeError, OSError) as exc:  # soundfile raises LibsndfileError(RuntimeError)
        return [*problems, f"WAV unreadable: {exc}"]
    if rate != RATE or samples.shape[1] != 2:
        return [*problems, f"WAV is {rate} Hz x {samples.shape[1]} channels"]
    origin = _iso(audio["start"])
    for ch, side in enumerate(("caller", "callee")):
        stream = streams.get(side)
        if stream is None:
            continue
        # From the side's first packet to the end of its last one as they arrived: a
        # sender that fell behind its RTP clock stretches that span, and placement follows
        # the arrivals then (the stretch becomes short silences, not lost audio).
        start = _iso(stream["first"]) - origin
        end = _iso(stream["last"]) - origin + FRAME / RATE
        tone = tone_check(samples[:, ch], truth[side]["tone_hz"], start + EDGE_S, end - EDGE_S)
        expected = max(1, truth[side]["packets_sent"] - round(2 * EDGE_S * RATE / FRAME))
        if tone.held < TONE_HELD_SHARE * expected or tone.other > (1 - TONE_HELD_SHARE) * expected:
            why = [f"{tone.held} of {expected} frames hold it"]
            if tone.silent_s:
                why.append(f"silent for up to {tone.silent_s:.2f} s")
            if tone.other:
                why.append(f"{tone.other} frames of another tone")
            problems.append(f"{side}: tone short ({', '.join(why)})")
    return problems


@dataclass(slots=True)
class CallsCheck:
    """A rung's calls against the ground truth."""

    complete: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # by kind, numbers left out
    examples: list[str] = field(default_factory=list)
    stretch_max_s: float | None = None
    stretch_median_s: float | None = None


def check_calls(out: Path, truth: dict[str, Any]) -> CallsCheck:
    """Every call of a rung's output against the ground truth (see :func:`check_call`)."""
    found = _sidecars(out)
    result = CallsCheck()
    reasons: collections.Counter[str] = collections.Counter()
    stretches: list[float] = []
    for call in truth["calls"]:
        problems = check_call(call, found.get(call["call_id"], []), stretches)
        if not problems:
            result.complete += 1
            continue
        for p in problems:
            reasons[re.sub(r"\d+(\.\d+)?", "N", p)] += 1
        if len(result.examples) < 10:
            result.examples.append(f"{call['call_id']}: {'; '.join(problems)}")
    result.reasons = dict(reasons)
    if stretches:
        result.stretch_max_s = max(stretches)
        result.stretch_median_s = float(np.median(stretches))
    return result


# -- one rung -----------------------------------------------------------------------------


@dataclass(slots=True)
class Rung:
    """Every figure of one rung (None: not measured, see ``status``/``error``)."""

    calls: int
    seconds: float
    workers: int
    daemon_cores: str
    sender_core: int
    status: str = "ok"  # "ok" or "error"
    error: str = ""
    notes: list[str] = field(default_factory=list)
    holds: bool = False
    file_packets: int | None = None
    file_rtp_packets: int | None = None
    file_pps: float | None = None  # the rate the capture was recorded at
    file_span_s: float | None = None  # first to last record of the capture
    multiplier: float = 1.0  # tcpreplay --multiplier (1: the recorded pace)
    generated: bool = False
    generation_s: float | None = None
    sent_packets: int | None = None  # tcpreplay "Actual:"
    sent_failed: int | None = None
    sent_retried: int | None = None
    send_s: float | None = None  # tcpreplay's own elapsed time
    sent_pps: float | None = None  # tcpreplay "Rated:"
    sender_lag_s: float | None = None  # tcpreplay's elapsed time minus the pace asked for
    replay_wall_s: float | None = None  # tcpreplay's run, preloading the file included
    tcpreplay_exit: int | None = None
    tcpreplay_summary: list[str] = field(default_factory=list)
    received_packets: int | None = None  # capture_stats packets_total
    kernel_received: int | None = None
    kernel_dropped: int | None = None
    kernel_freezes: int | None = None
    frames_truncated: int | None = None
    ring_blocks_corrupt: int | None = None
    veth_rx_packets: int | None = None
    veth_rx_dropped: int | None = None
    softnet_dropped: int | None = None  # machine-wide, during the rung
    max_active_calls: int | None = None
    recordings_total: int | None = None
    published: bool = False
    publish_wait_s: float | None = None  # from the end of the replay to the last recording
    wavs: int | None = None
    sidecars: int | None = None
    complete: int | None = None
    incomplete_reasons: dict[str, int] = field(default_factory=dict)
    incomplete_examples: list[str] = field(default_factory=list)
    check_s: float | None = None
    arrival_stretch_max_s: float | None = None  # per stream: arrival span - media span
    arrival_stretch_median_s: float | None = None
    cpu_s: float | None = None  # daemon processes' CPU from idle to all published
    cpu_total_s: float | None = None  # the same since the daemon started
    workers_cpu_s: float | None = None  # capture_stats cpu_s (workers, since start)
    us_per_packet: float | None = None  # cpu_s per received packet
    idle_cpu_pct: float | None = None  # the idle daemon's CPU use, % of one core
    idle_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    rss_per_call_kib: float | None = None  # (peak - idle) / calls
    idle_pss_mb: float | None = None
    end_pss_mb: float | None = None
    daemon_rss_mb_reported: float | None = None  # the daemon's own rss_mb, largest seen
    rss_samples: int = 0
    stop_s: float | None = None
    exit_code: int | None = None
    log_events: dict[str, int] = field(default_factory=dict)
    log_problems: list[dict[str, Any]] = field(default_factory=list)
    bad_log_lines: int = 0


def parse_tcpreplay(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if m := _ACTUAL.search(text):
        out |= {"packets": int(m[1]), "bytes": int(m[2]), "seconds": float(m[3])}
    if m := _RATED.search(text):
        out |= {"Bps": float(m[1]), "Mbps": float(m[2]), "pps": float(m[3])}
    for key, pattern in _DEVICE.items():
        if m := pattern.search(text):
            out[key] = int(m[1])
    return out


def run_rung(
    n: int,
    pcap: Path,
    truth: dict[str, Any],
    rung: Rung,
    args: argparse.Namespace,
    callcap: list[str],
    work: Path,
) -> None:
    """Run one rung, filling ``rung`` in as it goes (so a failure keeps what was measured).
    Its recordings go under ``work`` (the run's own filesystem, unless ``--recordings
    host``)."""
    rung.file_packets = int(truth["total_packets"])
    rung.file_rtp_packets = int(truth["rtp_packets"])
    span = float(truth["end_time"]) - float(truth["start_time"])
    rung.file_span_s = span
    rung.file_pps = rung.file_packets / span if span > 0 else None
    rung.multiplier = args.multiplier
    rdir = work / f"rung-{n}"
    if rdir.exists():  # a rung run again: its last recordings go with the spent ones
        _set_aside(rdir, work, args)
    rdir.mkdir(parents=True)
    out = rdir / "out"
    config = daemon_config(rdir / "callcap.yaml", out, n, args)
    tag = secrets.token_hex(3)
    with veth_link(tag) as link:
        os.sync()  # nothing left to write back from the rung before (or the generator)
        argv = [
            *["ip", "netns", "exec", link.recv_ns, "taskset", "-c", args.daemon_cores],
            *callcap,
            *["daemon", "--config", str(config), "--interface", link.recv_dev],
            *["--out", str(out), "--workers", str(args.workers)],
        ]
        daemon = Daemon(argv, rdir / "notify.sock", rdir / "daemon.stderr")
        try:
            _measure(n, pcap, rung, args, link, daemon, rdir)
        finally:
            daemon.close()
            with daemon._lock:
                rung.log_events = dict(daemon.counts)
                rung.log_problems = daemon.problems[:50]
            rung.bad_log_lines = daemon.bad_lines
            final = daemon.last_stats()
            if final:  # the daemon's last word: counters after its workers stopped
                rung.received_packets = int(final.get("packets_total", 0))
                rung.kernel_received = int(final.get("kernel_received_total", 0))
                rung.kernel_dropped = int(final.get("kernel_dropped_total", 0))
                rung.kernel_freezes = int(final.get("kernel_freezes_total", 0))
                rung.frames_truncated = int(final.get("frames_truncated_total", 0))
                rung.ring_blocks_corrupt = int(final.get("ring_blocks_corrupt_total", 0))
                rung.recordings_total = int(final.get("recordings_total", 0))
    if rung.cpu_s is not None and rung.received_packets:
        rung.us_per_packet = rung.cpu_s / rung.received_packets * 1e6
    if out.is_dir():
        started = time.monotonic()
        rung.wavs = sum(1 for p in out.rglob("*.wav") if ".spool" not in p.parts)
        rung.sidecars = sum(len(v) for v in _sidecars(out).values())
        checked = check_calls(out, truth)
        rung.complete = checked.complete
        rung.incomplete_reasons, rung.incomplete_examples = checked.reasons, checked.examples
        rung.arrival_stretch_max_s = checked.stretch_max_s
        rung.arrival_stretch_median_s = checked.stretch_median_s
        rung.check_s = time.monotonic() - started
    rung.holds = (
        rung.status == "ok"
        and rung.kernel_dropped == 0
        and rung.complete == n
        and rung.published
        and rung.exit_code == 0
    )
    if not args.keep:
        _set_aside(out, work, args)


def _set_aside(path: Path, work: Path, args: argparse.Namespace) -> None:
    """A rung's recordings, done with: deleted at once on the run's own filesystem (GBs at
    the big rungs); on the host's (``--recordings host``) moved aside and deleted when the
    ladder ends, so that no rung pays for the one before (see :func:`recordings_fs`)."""
    if args.recordings == "fresh":
        shutil.rmtree(path, ignore_errors=True)
        return
    spent = work / "spent"
    spent.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        path.rename(spent / f"{path.parent.name}-{path.name}-{secrets.token_hex(3)}")


def _measure(
    n: int,
    pcap: Path,
    rung: Rung,
    args: argparse.Namespace,
    link: Link,
    daemon: Daemon,
    rdir: Path,
) -> None:
    daemon.wait_ready(READY_TIMEOUT_S)
    # Idle: once the master has merged its workers' first counters.
    first = daemon.stats_count()
    daemon.wait_stats(lambda _s: daemon.stats_count() > first, 5.0, lambda: None)
    pids = daemon.pids()
    idle_from, idle_started = cpu_seconds(pids), time.monotonic()
    time.sleep(IDLE_S)
    pids = daemon.pids()
    idle_rss, idle_cpu = rss_bytes(pids), cpu_seconds(pids)
    rung.idle_cpu_pct = 100 * (idle_cpu - idle_from) / (time.monotonic() - idle_started)
    rung.idle_rss_mb = idle_rss / 1e6
    rung.idle_pss_mb = pss_bytes(pids) / 1e6
    peak = idle_rss
    active = 0
    reported_rss = 0.0

    def sample() -> None:
        nonlocal peak, active, reported_rss
        peak = max(peak, rss_bytes(daemon.pids()))
        rung.rss_samples += 1
        last = daemon.last_stats()
        active = max(active, int(last.get("active_calls", 0)))
        reported_rss = max(reported_rss, float(last.get("rss_mb", 0.0)))

    link_before = link_stats(link.recv_ns, link.recv_dev)
    softnet_before = softnet_dropped()
    replay = [
        *["ip", "netns", "exec", link.send_ns, "taskset", "-c", str(args.sender_core)],
        *["tcpreplay", f"--intf1={link.send_dev}"],
        *([] if args.no_preload else ["--preload-pcap"]),
        *([] if args.multiplier == 1.0 else [f"--multiplier={args.multiplier:g}"]),
        str(pcap),
    ]
    out_path, err_path = rdir / "tcpreplay.stdout", rdir / "tcpreplay.stderr"
    print(f"live_ladder: {n} calls: replaying {pcap.name} …", file=sys.stderr, flush=True)
    started = time.monotonic()
    with out_path.open("wb") as out_fh, err_path.open("wb") as err_fh:
        sender = subprocess.Popen(replay, stdout=out_fh, stderr=err_fh, start_new_session=True)
        try:
            limit = started + args.seconds * 3 + 120
            while sender.poll() is None:
                if time.monotonic() > limit:
                    raise LadderError("tcpreplay did not finish in time")
                sample()
                time.sleep(SAMPLE_S)
        finally:
            with _shielded():
                if sender.poll() is None:
                    sender.kill()
                sender.wait()
    replay_end = time.monotonic()
    rung.replay_wall_s = replay_end - started
    rung.tcpreplay_exit = sender.returncode
    text = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    rung.tcpreplay_summary = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("Statistics for")
    ][:20]
    parsed = parse_tcpreplay(text)
    rung.sent_packets = int(parsed["packets"]) if "packets" in parsed else None
    rung.send_s = parsed.get("seconds")
    if rung.send_s is not None and rung.file_span_s is not None:
        rung.sender_lag_s = rung.send_s - rung.file_span_s / args.multiplier
    rung.sent_pps = parsed.get("pps")
    rung.sent_failed = int(parsed["failed"]) if "failed" in parsed else None
    if "retried_enobufs" in parsed or "retried_eagain" in parsed:
        rung.sent_retried = int(parsed.get("retried_enobufs", 0) + parsed.get("retried_eagain", 0))
    if sender.returncode != 0:
        raise LadderError(f"tcpreplay exited with {sender.returncode}: {' | '.join(text.split())}")

    # Every call ends with a BYE: wait for all of them to be published.
    rung.published = daemon.wait_stats(
        lambda s: int(s.get("recordings_total", 0)) >= n, args.publish_timeout, sample
    )
    rung.publish_wait_s = time.monotonic() - replay_end if rung.published else None
    sample()
    pids = daemon.pids()
    end_cpu = cpu_seconds(pids)
    rung.cpu_s = end_cpu - idle_cpu
    rung.cpu_total_s = end_cpu
    rung.end_pss_mb = pss_bytes(pids) / 1e6
    rung.workers_cpu_s = daemon.last_stats().get("cpu_s")
    rung.peak_rss_mb = peak / 1e6
    rung.rss_per_call_kib = (peak - idle_rss) / 1024 / n
    rung.max_active_calls = active
    rung.daemon_rss_mb_reported = reported_rss or None
    link_after = link_stats(link.recv_ns, link.recv_dev)
    rung.veth_rx_packets = link_after["rx_packets"] - link_before["rx_packets"]
    rung.veth_rx_dropped = link_after["rx_dropped"] - link_before["rx_dropped"]
    rung.softnet_dropped = softnet_dropped() - softnet_before
    if not rung.published:
        last = daemon.last_stats().get("recordings_total")
        rung.notes.append(
            f"only {last} of {n} calls published {args.publish_timeout:g} s after the replay"
        )
    rung.exit_code, rung.stop_s = daemon.stop(STOP_TIMEOUT_S)
    if rung.exit_code is None:
        rung.notes.append(f"daemon did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM: killed")
    elif rung.exit_code != 0:
        rung.notes.append(f"daemon exited with {rung.exit_code}: {daemon.stderr_tail()}")


# -- targets and output -------------------------------------------------------------------


def evaluate(rungs: Sequence[Rung], daemon_cores: str) -> list[dict[str, Any]]:
    held = [r for r in rungs if r.holds]
    one_core = len(parse_cpu_list(daemon_cores)) == 1

    def target(name: str, value: float | None, goal: float, ok: bool | None, note: str = "") -> Any:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        return {"target": name, "value": value, "goal": goal, "result": verdict, "note": note}

    big = [r for r in rungs if r.calls >= TARGET_HELD_CALLS]
    most = max((r.calls for r in held), default=None)
    if not one_core:
        t1 = target(
            "2000 calls held on one core", most, TARGET_HELD_CALLS, None,
            f"daemon ran on CPUs {daemon_cores}",
        )  # fmt: skip
    elif not big:
        t1 = target(
            "2000 calls held on one core", most, TARGET_HELD_CALLS, None, "no rung >= 2000 ran"
        )
    else:
        t1 = target(
            "2000 calls held on one core",
            most,
            TARGET_HELD_CALLS,
            any(r.holds for r in big),
        )

    def at_most(name: str, values: list[float], goal: float) -> Any:
        worst = max(values) if values else None
        ok = None if worst is None else worst <= goal
        return target(name, worst, goal, ok, "" if values else "no rung held")

    return [
        t1,
        at_most(
            "CPU <= 5 us per received packet, every rung held",
            [r.us_per_packet for r in held if r.us_per_packet is not None],
            TARGET_US_PER_PACKET,
        ),
        at_most(
            "RSS <= 64 KiB per active call, every rung held",
            [r.rss_per_call_kib for r in held if r.rss_per_call_kib is not None],
            TARGET_KIB_PER_CALL,
        ),
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    ("calls", "calls", "d"),
    ("file pkts", "file_packets", ",d"),
    ("sent", "sent_packets", ",d"),
    ("received", "received_packets", ",d"),
    ("drops", "kernel_dropped", ",d"),
    ("freezes", "kernel_freezes", ",d"),
    ("WAVs", "wavs", "d"),
    ("complete", "complete", "d"),
    ("CPU s", "cpu_s", ".2f"),
    ("µs/pkt", "us_per_packet", ".2f"),
    ("sent pps", "sent_pps", ",.0f"),
    ("send lag s", "sender_lag_s", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".1f"),
    ("idle RSS MB", "idle_rss_mb", ".1f"),
    ("KiB/call", "rss_per_call_kib", ".1f"),
)


def render(rungs: Sequence[Rung], targets: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"callcap daemon live ladder: {meta['seconds']:g} s calls, {meta['workers']} worker(s) "
        f"on CPU {meta['daemon_cores']}, tcpreplay on CPU {meta['sender_core']}, "
        f"ring {meta['ring']}",
        "",
        "| " + " | ".join(title for title, _k, _s in COLUMNS) + " | holds |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|:---:|",
    ]
    for r in rungs:
        cells = [_fmt(getattr(r, key), spec) for _t, key, spec in COLUMNS]
        verdict = "yes" if r.holds else ("ERROR" if r.status == "error" else "no")
        lines.append("| " + " | ".join(cells) + f" | {verdict} |")
    notes = []
    for r in rungs:
        if r.error:
            notes.append(f"{r.calls} calls: error: {r.error}")
        notes += [f"{r.calls} calls: {note}" for note in r.notes]
        if r.incomplete_reasons:
            top = ", ".join(f"{k} x{v}" for k, v in sorted(r.incomplete_reasons.items())[:6])
            notes.append(f"{r.calls} calls: incomplete: {top}")
        if r.sent_packets is not None and r.file_packets and r.sent_packets != r.file_packets:
            notes.append(f"{r.calls} calls: tcpreplay sent {r.sent_packets} of {r.file_packets}")
        if r.veth_rx_dropped:
            notes.append(f"{r.calls} calls: the receiving veth dropped {r.veth_rx_dropped}")
        lag, span = r.sender_lag_s, r.file_span_s
        if lag is not None and span and LAG_NOTE_S < lag < span:
            stretch = _fmt(r.arrival_stretch_median_s, ".2f")
            notes.append(
                f"{r.calls} calls: tcpreplay fell {lag:.2f} s behind the pace asked for "
                f"(streams arrived {stretch} s slower than their media, median); "
                f"--multiplier {r.multiplier * span / (span - lag):.3f} would make up for it"
            )
    if notes:
        lines += ["", *notes]
    lines.append("")
    for t in targets:
        note = f"; {t['note']}" if t["note"] else ""
        lines.append(
            f"{t['result']:<5} {t['target']} (measured {_fmt(t['value'], '.2f')}, "
            f"goal {t['goal']:g}{note})"
        )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Live capacity ladder: callcap daemon on a veth link, fed by tcpreplay "
        "(needs root: it creates network namespaces)."
    )
    p.add_argument(
        "--calls",
        help="comma-separated rungs, all run (default: 500,1000,2000, then +1000 while held)",
    )
    p.add_argument("--max-calls", type=int, default=10000, help="cap of the default ladder (10000)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each call set (20)")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--codec", choices=workload.CODECS, default="pcmu", help="workload codec")
    p.add_argument("--cache", type=Path, help="keep/reuse the workload pcaps in this directory")
    p.add_argument("--workers", type=int, default=1, help="daemon recording workers (1)")
    p.add_argument(
        "--daemon-cores", default="1", help="taskset CPU list for the daemon (default 1)"
    )
    p.add_argument("--sender-core", type=int, default=0, help="CPU for tcpreplay (default 0)")
    p.add_argument(
        "--bench-core",
        type=int,
        help="CPU this script runs on (default: the sender core, off the daemon's)",
    )
    p.add_argument("--ring-block-size", type=int, help="capture.ring.block_size (bytes)")
    p.add_argument("--ring-blocks", type=int, help="capture.ring.blocks")
    p.add_argument("--retire-timeout-ms", type=int, help="capture.ring.retire_timeout_ms")
    p.add_argument(
        "--publish-timeout",
        type=float,
        default=120.0,
        help="seconds after the replay to wait for every call's recording (120)",
    )
    p.add_argument("--no-preload", action="store_true", help="no tcpreplay --preload-pcap")
    p.add_argument(
        "--multiplier",
        type=float,
        default=1.0,
        help="tcpreplay --multiplier (default 1: the recorded pace; bench/README.md says "
        "when to raise it)",
    )
    p.add_argument(
        "--recordings",
        choices=("fresh", "host"),
        default="fresh",
        help="where the daemon records: a fresh ext4 of the run's own (default), or the "
        "work directory's filesystem",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory and print it")
    p.add_argument("--check", action="store_true", help="exit 1 unless every target passes")
    return p


def _preflight(args: argparse.Namespace) -> list[str] | str:
    """The callcap command, or what is missing."""
    if sys.platform != "linux":
        return "Linux only (network namespaces, TPACKET_V3)"
    if os.geteuid() != 0:
        return "must run as root (it creates network namespaces and veth pairs)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tool(s) on PATH: {', '.join(missing)} (iproute2, tcpreplay, util-linux)"
    if args.recordings == "fresh":
        missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
        if missing:
            return f"missing tool(s) for --recordings fresh: {', '.join(missing)} (e2fsprogs)"
    callcap = run_bench._callcap_command()
    if callcap is None:
        return "callcap console script not found (install the project: pip install -e .)"
    try:
        daemon_cpus = parse_cpu_list(args.daemon_cores)
    except ValueError as exc:
        return f"--daemon-cores: {exc}"
    allowed = os.sched_getaffinity(0)
    cores = {*daemon_cpus, args.sender_core}
    if args.bench_core is not None:
        cores.add(args.bench_core)
    if not cores <= allowed:
        return f"CPU(s) {sorted(cores - allowed)} not available (allowed: {sorted(allowed)})"
    if args.sender_core in daemon_cpus:
        print("live_ladder: warning: the sender shares a CPU with the daemon", file=sys.stderr)
    if args.workers < 1 or args.seconds < 1 or args.max_calls < 1:
        return "--workers, --seconds and --max-calls must be at least 1"
    if args.multiplier <= 0:
        return "--multiplier must be > 0"
    return callcap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    explicit: list[int] | None = None
    if args.calls:
        try:
            explicit = [int(x) for x in args.calls.split(",") if x.strip()]
        except ValueError:
            print(f"live_ladder: --calls: not a list of numbers: {args.calls!r}", file=sys.stderr)
            return 2
        if not explicit or min(explicit) < 1 or max(explicit) > workload.MAX_CALLS:
            print(f"live_ladder: --calls: each rung 1..{workload.MAX_CALLS}", file=sys.stderr)
            return 2
    callcap = _preflight(args)
    if isinstance(callcap, str):
        print(f"live_ladder: {callcap}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.sender_core if args.bench_core is None else args.bench_core})
    run_bench._compile_callcap()
    # SIGTERM/SIGHUP unwind like Ctrl-C, through every cleanup.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _f: sys.exit(128 + signum))

    work = Path(tempfile.mkdtemp(prefix="callcap-live-"))
    cache = args.cache.resolve() if args.cache else work / "workloads"
    ring = {
        "block_size": args.ring_block_size,
        "blocks": args.ring_blocks,
        "retire_timeout_ms": args.retire_timeout_ms,
    }
    meta = {
        "seconds": args.seconds,
        "seed": args.seed,
        "codec": args.codec,
        "workers": args.workers,
        "daemon_cores": args.daemon_cores,
        "sender_core": args.sender_core,
        "ring": {k: v for k, v in ring.items() if v is not None} or "daemon default",
        "preload": not args.no_preload,
        "multiplier": args.multiplier,
        "callcap": callcap,
        "kernel": os.uname().release,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    meta["recordings"] = args.recordings
    rungs: list[Rung] = []
    interrupted = False
    stack = contextlib.ExitStack()
    try:
        plan = list(explicit) if explicit else [n for n in DEFAULT_LADDER if n <= args.max_calls]
        base = work
        if args.recordings == "fresh":
            biggest = max(explicit) if explicit else args.max_calls
            size = recordings_size(biggest, args.seconds)
            try:
                base = stack.enter_context(recordings_fs(work, size, keep=args.keep))
            except (LadderError, OSError, subprocess.SubprocessError) as exc:
                print(f"live_ladder: {exc}", file=sys.stderr)
                return 2
        i = 0
        while i < len(plan):
            n = plan[i]
            rung = Rung(n, args.seconds, args.workers, args.daemon_cores, args.sender_core)
            rungs.append(rung)
            try:
                started = time.monotonic()
                print(f"live_ladder: {n} calls: workload …", file=sys.stderr, flush=True)
                pcap, truth, rung.generated = workload_files(n, args, cache)
                rung.generation_s = time.monotonic() - started
                run_rung(n, pcap, truth, rung, args, callcap, base)
                if args.cache is None and not args.keep:
                    pcap.unlink(missing_ok=True)
            except (LadderError, OSError, subprocess.SubprocessError, ValueError) as exc:
                rung.status, rung.error = "error", str(exc)[:2000]
                print(f"live_ladder: {n} calls: error: {rung.error}", file=sys.stderr)
            print(
                f"live_ladder: {n} calls: {'holds' if rung.holds else 'does not hold'} "
                f"(drops {rung.kernel_dropped}, complete {rung.complete}/{n}, "
                f"{_fmt(rung.us_per_packet, '.2f')} µs/packet)",
                file=sys.stderr,
                flush=True,
            )
            i += 1
            if explicit is None:
                if not rung.holds:
                    break  # the ladder climbs while it holds
                if i == len(plan) and n + LADDER_STEP <= args.max_calls:
                    plan.append(n + LADDER_STEP)
    except KeyboardInterrupt:
        interrupted = True
        print("live_ladder: interrupted; reporting the rungs so far", file=sys.stderr)
    finally:
        with _shielded():
            stack.close()
            if args.keep:
                print(f"live_ladder: kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)

    targets = evaluate(rungs, args.daemon_cores)
    print(render(rungs, targets, meta))
    if args.json:
        doc = {
            **meta,
            "interrupted": interrupted,
            "work_dir": str(work) if args.keep else None,
            "rungs": [dataclasses.asdict(r) for r in rungs],
            "targets": targets,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if interrupted:
        return 130
    if any(r.status == "error" for r in rungs):
        return 1
    if args.check and any(t["result"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
