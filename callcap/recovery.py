"""Crash recovery beside capture: the daemon publishes what dead writers left in the spool
on a thread of its own, so it captures (and says ``READY=1``) at once.

A spool of long calls can take minutes to recover — each recording is hashed and made
durable — and a daemon that recovered first and captured after would miss every call that
starts meanwhile, or outlast systemd's start timeout.  So recovery is a queue of jobs on one
thread:

- a job is the spool's files at the moment it was queued (:func:`spool_files`): at start-up,
  before any worker exists; when a worker dies, after it has.  Files a live writer makes
  later are never in it, even if that writer was given a dead one's pid.
- each entry is published and logged in the audit log under the archive lock, one at a
  time (:func:`recover_entries`): a sweep or ``verify`` never sees a recovered recording
  without its audit entry, and publications of live calls wait for one entry at most.
- at shutdown the thread finishes the entry in hand and stops by a deadline; what is left
  stays in the spool for the next start.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callcap.config.schema import Config
from callcap.errors import CallcapError
from callcap.storage import audit as audit_log
from callcap.storage.spool import Recovered, recover_entries, spool_files


@dataclass(frozen=True, slots=True)
class _Job:
    out: Path
    files: frozenset[Path]
    file_mode: int
    dir_mode: int
    why: str


class SpoolRecovery:
    """Recovers dead writers' spool entries on a background thread, one job at a time."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._deadline: float | None = None  # monotonic: no entry is started after it
        self._thread = threading.Thread(target=self._run, name="spool-recovery", daemon=True)
        self._thread.start()

    def queue(self, config: Config, out: Path, why: str) -> None:
        """Recover what is in ``out``'s spool now (the files are listed here, at once)."""
        files = spool_files(out)
        if files:
            rec = config.recording
            self._jobs.put(_Job(out, files, rec.file_mode, rec.dir_mode, why))

    def close(self, deadline: float) -> None:
        """Finish the queued jobs, starting no entry after ``deadline`` (monotonic)."""
        self._deadline = deadline
        self._jobs.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()) + 30.0)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._recover(job)
            except Exception as exc:  # noqa: BLE001 - the daemon goes on; the entry stays
                self.log.error("spool_recovery_failed", out_dir=str(job.out), error=str(exc)[:500])

    def _late(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _recover(self, job: _Job) -> None:
        started = time.monotonic()
        counts = {"recovered": 0, "damaged": 0}
        entries = recover_entries(
            job.out, file_mode=job.file_mode, dir_mode=job.dir_mode, only=job.files
        )
        log = audit_log.AuditLog(job.out, file_mode=job.file_mode, dir_mode=job.dir_mode)
        stopped = False
        while True:
            if self._late():
                stopped = True
                break
            try:
                with log.locked() as audit:
                    outcome = next(entries, None)
                    if outcome is None:
                        break
                    if isinstance(outcome, Recovered):
                        counts["recovered"] += 1
                        problem = _audit(audit, outcome)
                    else:
                        counts["damaged"] += 1
                        problem = None
            except (OSError, CallcapError) as exc:
                self.log.error("spool_recovery_failed", out_dir=str(job.out), error=str(exc)[:500])
                return
            if isinstance(outcome, Recovered):
                self.log.info(
                    "call_recovered",
                    call_uid=outcome.call_uid,
                    path=str(outcome.wav.path) if outcome.wav is not None else None,
                    sidecar=str(outcome.sidecar),
                    bytes=outcome.wav.size if outcome.wav is not None else None,
                    sha256=outcome.wav.sha256 if outcome.wav is not None else None,
                    duration_s=outcome.duration_s,
                    audio_s=outcome.audio_s,
                )
                if problem is not None:
                    self.log.error("audit_failed", call_uid=outcome.call_uid, error=problem)
            else:
                self.log.error(
                    "spool_entry_damaged",
                    entry=outcome.name,
                    reason=outcome.reason,
                    moved_to=[str(p) for p in outcome.moved_to],
                )
        if counts["recovered"] or counts["damaged"] or stopped:
            self.log.info(
                "spool_recovered",
                out_dir=str(job.out),
                why=job.why,
                **counts,
                seconds=round(time.monotonic() - started, 3),
                stopped_early=stopped,
            )


def _audit(audit: audit_log.AuditWriter, call: Recovered) -> str | None:
    """A recovered recording enters the audit log like any other, so ``verify`` knows it."""
    files: dict[str, audit_log.FileRef] = {}
    try:
        if call.wav is not None:
            files["wav"] = audit.ref(call.wav.path, call.wav.sha256)
        files["sidecar"] = audit.ref(call.sidecar)
        audit.append(
            audit_log.RECORDING_PUBLISHED
            if call.wav is not None
            else audit_log.RECORDING_DISCARDED,
            {"call_uid": call.call_uid, "end_reason": call.end_reason},
            files,
        )
    except (OSError, CallcapError) as exc:
        return str(exc)[:500]
    return None
