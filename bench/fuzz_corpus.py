"""Byte-mutation fuzzing of whole captures: every corpus capture, a few bytes changed.

    python bench/fuzz_corpus.py --inputs 3000 --seed 1            # the full run
    python bench/fuzz_corpus.py --inputs 50 --max-bytes 200000     # a quick look

Each input is one corpus capture (``tests/data/corpus``, or ``$CALLCAP_CORPUS``) with 1 to 8
mutations from a seeded mutator of our own: bit flips, bytes set to boundary values
(0x00, 0x7F, 0x80, 0xFF), 16/32-bit fields set to extremes (lengths, timestamps), runs
inserted, deleted or duplicated.  Mutations land anywhere, pcap/pcapng headers included.
The input goes through the recorder in-process, alternately as ``callcap record`` feeds a
file (:meth:`Pipeline.run_blocks`) and as the daemon's replay path does
(:meth:`Pipeline.run_live`), and is judged:

* **crash**: any exception out of the recorder but the capture reader's own
  ``CaptureError`` (a file it cannot read further is an error it reports, not a crash);
* **hang**: more than ``--time-limit`` seconds for one input;
* **memory**: the process's peak RSS above ``--max-rss-mb``;
* **bad output**: a sidecar that fails the schema, a WAV that cannot be read, or a
  recording longer than the capture's own time span (plus the inactivity timeout).

Exit status 1 if any input failed; each failure is saved (``--save DIR``) for replay.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile

from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config
from callcap.errors import CaptureError
from callcap.pipeline import Pipeline
from callcap.storage.sidecar import validate_sidecar

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus"
CAPTURE_SUFFIXES = (".pcap", ".pcapng")


class _Quiet:
    """A logger that drops everything (a fuzz run logs millions of counted drops)."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: None


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Hang


def corpus_files(root: Path | None = None, max_bytes: int | None = None) -> list[Path]:
    base = root or Path(os.environ.get("CALLCAP_CORPUS", CORPUS))
    files = sorted(p for p in base.iterdir() if p.suffix in CAPTURE_SUFFIXES)
    return [p for p in files if max_bytes is None or p.stat().st_size <= max_bytes]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1 to 8 mutations of ``data`` (never the same input twice for a seed)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not buf:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            continue
        at = rng.randrange(len(buf))
        kind = rng.randrange(7)
        if kind == 0:  # flip a bit
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a boundary byte
            buf[at] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        elif kind == 2 and at + 4 <= len(buf):  # a 32-bit field to an extreme
            value = rng.choice((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)))
            struct.pack_into(rng.choice(("<I", ">I")), buf, at, value)
        elif kind == 3 and at + 2 <= len(buf):  # a 16-bit field (lengths, ports)
            value = rng.choice((0, 1, 0x7FFF, 0x8000, 0xFFFF, rng.getrandbits(16)))
            struct.pack_into(rng.choice(("<H", ">H")), buf, at, value)
        elif kind == 4:  # insert a run
            run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
            buf[at:at] = run
        elif kind == 5:  # delete a run
            del buf[at : at + rng.randint(1, 64)]
        else:  # duplicate a run elsewhere
            n = rng.randint(1, 256)
            chunk = bytes(buf[at : at + n])
            to = rng.randrange(len(buf))
            buf[to:to] = chunk
    return bytes(buf)


@dataclass
class Verdict:
    ok: bool
    kind: str  # "ok", "crash", "hang", "memory", "bad_output"
    detail: str = ""
    seconds: float = 0.0
    recordings: int = 0


def run_input(
    path: Path, work: Path, *, live: bool, time_limit: float, max_rss_mb: float
) -> Verdict:
    """One capture file through the recorder, judged (see the module docstring)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(None)
    began = time.perf_counter()
    first = last = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        pipeline = Pipeline(config, out, _Quiet())
        try:
            with CaptureReader(str(path)) as reader:
                for block in reader.blocks():
                    if len(block):
                        lo, hi = float(block.times.min()), float(block.times.max())
                        first = lo if first is None else min(first, lo)
                        last = hi if last is None else max(last, hi)
                    if live:
                        pipeline.run_live([block])
                    else:
                        pipeline.run_blocks([block])
        except CaptureError:
            pass  # an unreadable rest of a file: reported by record, not a crash
        pipeline.close("capture_end")
    except _Hang:
        return Verdict(False, "hang", f"over {time_limit} s", time.perf_counter() - began)
    except Exception as exc:  # noqa: BLE001 - that is what is being looked for
        return Verdict(False, "crash", f"{type(exc).__name__}: {exc}"[:500])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - began
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rss_mb > max_rss_mb:
        return Verdict(False, "memory", f"peak RSS {rss_mb:.0f} MB", seconds)
    span = (last - first) if first is not None and last is not None else 0.0
    longest = span + config.calls.inactivity_timeout_s + 1.0
    recordings = 0
    for sidecar in out.rglob("*.json") if out.exists() else ():
        if ".spool" in sidecar.parts:
            continue
        recordings += 1
        try:
            problem = _output_problem(sidecar, longest)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is the finding
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            return Verdict(False, "bad_output", f"{sidecar.name}: {problem}"[:500], seconds)
    return Verdict(True, "ok", seconds=seconds, recordings=recordings)


def _output_problem(sidecar: Path, longest: float) -> str | None:
    """What is wrong with a published sidecar and its WAV (raises if either is unreadable)."""
    doc = json.loads(sidecar.read_text())
    validate_sidecar(doc)
    if doc["audio"] is None:
        return None
    info = soundfile.info(str(sidecar.with_suffix(".wav")))
    seconds = info.frames / info.samplerate
    return f"{seconds:.1f} s of audio" if seconds > longest else None


def fuzz(
    inputs: int,
    seed: int,
    *,
    files: list[Path],
    time_limit: float = 30.0,
    max_rss_mb: float = 1500.0,
    save: Path | None = None,
) -> tuple[Counter[str], list[tuple[str, Verdict]]]:
    """``inputs`` mutated captures (round robin over ``files``): verdict counts, failures."""
    rng = random.Random(seed)
    originals = [(p.name, p.read_bytes()) for p in files]
    counts: Counter[str] = Counter()
    failures: list[tuple[str, Verdict]] = []
    with tempfile.TemporaryDirectory(prefix="callcap-fuzz-") as tmp:
        work = Path(tmp)
        for i in range(inputs):
            name, data = originals[i % len(originals)]
            mutated = mutate(data, rng)
            path = work / f"input{Path(name).suffix}"
            path.write_bytes(mutated)
            verdict = run_input(
                path, work, live=bool(i % 2), time_limit=time_limit, max_rss_mb=max_rss_mb
            )
            counts[verdict.kind] += 1
            if not verdict.ok:
                label = f"{i}:{name}"
                failures.append((label, verdict))
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, save / f"{i:07d}-{name}")
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-bytes", type=int, default=None, help="skip larger captures")
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--max-rss-mb", type=float, default=1500.0)
    parser.add_argument("--save", type=Path, default=None, help="keep failing inputs here")
    args = parser.parse_args(argv)
    files = corpus_files(max_bytes=args.max_bytes)
    began = time.perf_counter()
    counts, failures = fuzz(
        args.inputs,
        args.seed,
        files=files,
        time_limit=args.time_limit,
        max_rss_mb=args.max_rss_mb,
        save=args.save,
    )
    elapsed = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.inputs} inputs from {len(files)} captures, seed {args.seed}: "
        f"{dict(counts)}; {elapsed:.0f} s ({args.inputs / elapsed:.1f} inputs/s), "
        f"peak RSS {rss:.0f} MB"
    )
    for label, verdict in failures:
        print(f"  {label}: {verdict.kind}: {verdict.detail}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
