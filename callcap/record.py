"""``callcap record``: capture files in, recordings out, on one core or several.

With ``--workers N`` (N > 1) the captures are read by N forked processes at once, each
recording the calls :func:`~callcap.sharding.owner_of` gives it and letting the others'
media pass at the cost of a block lookup (:mod:`callcap.workers` says why every worker reads
everything).  Each worker publishes its own recordings into the same output directory — the
audit log is one chain however many processes append to it — and prints their paths as they
are published; the parent waits for all of them and reports one ``record_finished``.  Only
worker 0 reports problems with the capture files themselves, so that each is said once.

The exit status is 0 when every call was recorded whole, 1 (:data:`EXIT_FAILED`) when a
recording failed, was cut short or not made for lack of disk space, or missed its audit
entry, and 2 (:data:`EXIT_INPUT`, which wins) when the config or a capture is unreadable.
"""

from __future__ import annotations

import itertools
import multiprocessing.connection
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from callcap.capture.pcapfile import CaptureReader
from callcap.config.schema import Config
from callcap.errors import CaptureError
from callcap.logs import get_logger
from callcap.pipeline import Pipeline
from callcap.recorder import Published
from callcap.workers import start_worker, wait_any

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INPUT: Final = 2


@dataclass(frozen=True, slots=True)
class RecordJob:
    config: Config
    captures: tuple[str, ...]
    out: Path


def record(job: RecordJob, workers: int) -> int:
    """Record every call of the job's captures; the exit status (module docstring)."""
    log = get_logger("callcap.record")
    if workers <= 1:
        status, stats = _record(job, 0, 1)
    else:
        started = [start_worker(i, _worker, (job, i, workers)) for i in range(workers)]
        results: dict[int, tuple[int, dict[str, Any]]] = {}
        while len(results) < len(started):
            wait_any([w for w in started if w.index not in results], 1.0)
            for w in started:
                if w.index in results:
                    continue
                for message in w.receive():
                    if message[0] == "done":
                        results[w.index] = (int(message[1]), message[2])
                if w.index not in results and not w.process.is_alive():
                    w.process.join(1)
                    log.error("worker_exited", worker=w.index, how=f"exit {w.process.exitcode}")
                    results[w.index] = (70, {})
        for w in started:
            w.process.join(5)
        status = max(code for code, _s in results.values())
        stats = _sum([s for _c, s in results.values()])
    log.info("record_finished", workers=max(1, workers), **stats)
    sys.stdout.flush()
    return status


def _worker(
    conn: multiprocessing.connection.Connection, job: RecordJob, index: int, count: int
) -> int:
    structlog.contextvars.bind_contextvars(worker=index)
    status, stats = _record(job, index, count)
    conn.send(("done", status, stats))
    return EXIT_OK


def _published(rec: Published) -> None:
    if rec.wav is not None:
        # one write per line: several workers may print at once
        sys.stdout.write(f"{rec.wav.path}\n")
        sys.stdout.flush()


def _record(job: RecordJob, index: int, count: int) -> tuple[int, dict[str, Any]]:
    log = get_logger("callcap.record")
    speaks = index == 0  # capture-file problems are reported once
    pipeline = Pipeline(job.config, job.out, log, on_published=_published, worker=(index, count))
    pipeline.sources = tuple(os.path.basename(p) for p in job.captures)
    status = EXIT_OK
    for name in job.captures:
        try:
            reader = CaptureReader(name)
        except CaptureError as exc:
            if speaks:
                _error(f"cannot read capture {exc}")
                log.error("capture_unreadable", file=name, error=str(exc))
            status = EXIT_INPUT
            continue
        if speaks:
            log.info("capture_opened", file=name, format=reader.format)
        try:
            with reader:
                blocks = reader.blocks()
                for block in blocks:
                    if len(block) and block.times[0] < pipeline.now - 1.0:
                        # An older file after a newer one: unrelated captures, not a rotation.
                        pipeline.close("capture_end")
                        pipeline.restart_clock()
                    pipeline.run_blocks(itertools.chain([block], blocks))
                    break
        except CaptureError as exc:
            if speaks:
                _error(f"cannot read capture {exc}")
                log.error("capture_unreadable", file=name, error=str(exc), packets=reader.packets)
            status = EXIT_INPUT
        if reader.truncated:
            if speaks:
                log.warning("capture_truncated", file=name, packets=reader.packets)
            pipeline.warn_active(
                "capture_truncated",
                f"{os.path.basename(name)} ends mid-record after {reader.packets} packets",
            )
        if speaks:
            log.info("capture_done", file=name, packets=reader.packets)
    pipeline.close("capture_end")
    st = pipeline.stats()
    if st.recordings_failed or st.recordings_incomplete or st.audit_failed:
        status = max(status, EXIT_FAILED)
    return status, {
        "frames": st.frames,
        "rtp_packets": st.rtp_packets,
        "sip_messages": st.sip_messages,
        "calls": st.calls_started,
        "recordings": st.recordings,
        "recordings_failed": st.recordings_failed,
        "recordings_incomplete": st.recordings_incomplete,
        "audit_failed": st.audit_failed,
        "rtp_other_worker": pipeline.counters["rtp_other_worker"],
        "drops": dict(st.drops),
    }


_FAILURES = ("recordings_failed", "recordings_incomplete", "audit_failed")


def _sum(all_stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Workers' counts together: each read every frame and SIP message; calls, RTP and
    recordings are each worker's own."""
    drops: Counter[str] = Counter()
    out: dict[str, Any] = {"frames": 0, "rtp_packets": 0, "sip_messages": 0}
    counted = ("rtp_packets", "calls", "recordings", "rtp_other_worker", *_FAILURES)
    out |= dict.fromkeys(counted, 0)
    for stats in all_stats:
        out["frames"] = max(out["frames"], int(stats.get("frames", 0)))
        out["sip_messages"] = max(out["sip_messages"], int(stats.get("sip_messages", 0)))
        for key in counted:
            out[key] += int(stats.get(key, 0))
        for reason, n in stats.get("drops", {}).items():
            drops[reason] = max(drops[reason], int(n))  # every worker saw every bad frame
    out["drops"] = dict(drops)
    return out


def _error(message: str) -> None:
    sys.stderr.write(f"callcap: error: {message}\n")
    sys.stderr.flush()


__all__ = ["RecordJob", "record"]
