"""The daemon's periodic retention sweep, run beside the capture loop in a worker thread.

A sweep walks the whole archive and may hash gigabytes of audio it deletes; done inline it
would stall packet capture long enough for the kernel to drop packets.  So the main loop
only asks :meth:`RetentionSweeper.poll` (a clock comparison) and at most one sweep thread
runs at a time.  Deletions are serialised with every other archive change by the audit
log's lock, so the thread needs no other coordination with the recorder.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from callcap.config.schema import Config
from callcap.errors import CallcapError
from callcap.storage.archive import Archive


class RetentionSweeper:
    def __init__(self, out_dir: Path, log: Any) -> None:
        self.out_dir = out_dir
        self.log = log
        self._next: float | None = None
        self._thread: threading.Thread | None = None

    def poll(self, mono: float, config: Config) -> None:
        """Start a sweep when ``retention.sweep_interval_s`` has passed (0: never)."""
        interval = config.retention.sweep_interval_s
        if interval <= 0:
            return
        if self._next is None:
            self._next = mono  # the first sweep runs at start-up
        if mono < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        self._next = mono + interval
        rec = config.recording
        archive = Archive(self.out_dir, file_mode=rec.file_mode, dir_mode=rec.dir_mode)
        self._thread = threading.Thread(
            target=self._sweep, args=(archive,), name="retention-sweep", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Wait for a running sweep (it deletes one recording at a time, each consistently)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _sweep(self, archive: Archive) -> None:
        now = datetime.now(UTC)
        try:
            outcomes = archive.sweep(now)
        except (OSError, CallcapError) as exc:
            self.log.error("retention_sweep_failed", error=str(exc)[:500])
            return
        for o in outcomes:
            fields = {"call_uid": o.recording.call_uid, "sidecar": str(o.recording.sidecar)}
            if o.action == "deleted":
                self.log.info("recording_deleted", **fields)
            elif o.action == "kept":
                self.log.info("recording_held", **fields, detail=o.why)
            else:
                self.log.error("retention_sweep_error", **fields, error=o.why[:500])
        self.log.info(
            "retention_swept",
            out_dir=str(self.out_dir),
            now=now.isoformat(),
            deleted=sum(o.action == "deleted" for o in outcomes),
            held=sum(o.action == "kept" for o in outcomes),
            errors=sum(o.action == "error" for o in outcomes),
        )
