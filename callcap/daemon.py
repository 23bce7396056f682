"""``callcap daemon``: the live recorder's master process and its lifecycle.

The master records nothing itself.  It recovers what a previous run left in the spool (in
the background, beside capture: :mod:`callcap.recovery`), starts ``capture.workers``
recording workers (:mod:`callcap.capture_worker`; why several, and why each sees every
frame: :mod:`callcap.workers`) and supervises them:

- **Signals** only set flags (gunicorn's arbiter does the same); the loop acts on them.
  SIGTERM/SIGINT are passed to every worker, which ends its calls in flight as
  ``shutdown`` and publishes them; the master exits 0 once all have.  SIGHUP reloads the
  config: a broken file is logged (``config_invalid``) and the running config kept, a good
  one is handed to every worker.
- **systemd**: ``READY=1`` once every worker captures; ``WATCHDOG=1`` only while every worker
  reports in (a worker stuck in a loop stops the watchdog, and systemd restarts the unit);
  ``STATUS=`` with the merged call counts; ``STOPPING=1`` on shutdown.
- **A worker that dies** (a crash, ``kill -9``) is logged as ``worker_exited``; the calls it
  had in flight are recovered from the spool at once, the way a restart of the whole daemon
  would, and a new worker takes its place.  Other workers' calls are not touched.
- **Counters** of all workers are merged into one ``capture_stats`` every
  ``logging.stats_interval_s``; the control socket's pause/resume goes to the worker that
  records the call; the retention sweep runs here, in a thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from callcap.capture_worker import run_worker
from callcap.config.loader import load_config
from callcap.config.schema import Config
from callcap.control import ControlError, ControlServer
from callcap.errors import ConfigError, StorageError
from callcap.logs import LogFormat, configure_logging, get_logger
from callcap.recovery import SpoolRecovery
from callcap.sdnotify import Notifier
from callcap.sharding import owner_of
from callcap.storage.layout import ensure_dir
from callcap.storage.lock import OutputInUse, OutputLock
from callcap.sweeper import RetentionSweeper
from callcap.workers import Worker, start_worker, wait_any, worker_count

POLL_S: Final = 0.25
EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2
EXIT_CAPTURE: Final = 3
EXIT_BUSY: Final = 4  # the output directory is held by another running recorder
#: A worker that stops reporting for this long is stuck: the watchdog stops being fed.
STUCK_S: Final = 10.0
#: How long a stopping worker may take to publish its calls before it is killed.
STOP_TIMEOUT_S: Final = 50.0  # inside the unit's TimeoutStopSec (60 s)
CONTROL_TIMEOUT_S: Final = 2.0
#: Restarts of dead workers allowed within a minute before the daemon gives up.
MAX_RESTARTS: Final = 5


def _resident_mb(pids: Sequence[int]) -> float:
    """Resident memory of the given processes together, MB (10⁶ bytes)."""
    import resource

    page = resource.getpagesize()
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 1e6, 1)


def apply_overrides(config: Config, interfaces: Sequence[str], out: str | None) -> Config:
    capture = config.capture
    if interfaces:
        capture = dataclasses.replace(capture, interfaces=tuple(interfaces))
    recording = config.recording
    if out:
        recording = dataclasses.replace(recording, out_dir=out)
    return dataclasses.replace(config, capture=capture, recording=recording)


class Daemon:
    def __init__(
        self,
        config_path: str | None,
        *,
        interfaces: Sequence[str] = (),
        out: str | None = None,
        log_format: LogFormat | None = None,
        pcap: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.config_path = config_path
        self.interfaces = tuple(interfaces)
        self.out = out
        self.log_format = log_format
        self.pcap = pcap
        self.workers_override = workers
        self._stop = False
        self._reload = False
        self.notifier = Notifier()
        self.log: Any = get_logger("callcap.daemon")
        self.control: ControlServer | None = None
        self.workers: list[Worker] = []
        self.config: Config | None = None
        self._requests = itertools.count(1)
        self._ready_info: dict[str, Any] = {}
        self._restarts: list[float] = []
        self._retired: list[dict[str, Any]] = []  # last counters of workers that died
        self._last_totals: dict[str, int] = {}
        self._last_stats = time.monotonic()
        self._lock: OutputLock | None = None  # on the output directory, while running
        self._recovery: SpoolRecovery | None = None
        self._stop_deadline: float | None = None  # monotonic, once shutdown has begun

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self._stop = True

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload = True

    def _load(self) -> Config:
        config = apply_overrides(load_config(self.config_path), self.interfaces, self.out)
        if self.workers_override is not None:
            capture = dataclasses.replace(config.capture, workers=self.workers_override)
            config = dataclasses.replace(config, capture=capture)
        return config

    def run(self) -> int:
        try:
            config = self._load()
        except ConfigError as exc:
            configure_logging(self.log_format or "json", "info")
            self.log.error("config_invalid", error=str(exc))
            return EXIT_CONFIG
        self.config = config
        configure_logging(self.log_format or config.logging.format, config.logging.level)
        log = self.log
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        out = Path(config.recording.out_dir)
        count = worker_count(config.capture.workers)
        log.info(
            "daemon_started", config=config.source, out_dir=str(out), pid=os.getpid(), workers=count
        )
        try:
            ensure_dir(out, config.recording.dir_mode)
        except OSError as exc:
            log.error("output_unwritable", out_dir=str(out), error=exc.strerror or str(exc))
            return EXIT_CAPTURE
        try:
            self._lock = self._lock_output(out)
        except OutputInUse:
            return EXIT_BUSY
        except StorageError:
            return EXIT_CAPTURE
        # Listed now, before any worker spools a file; recovered beside capture.
        self._recovery = SpoolRecovery(log)
        self._recovery.queue(config, out, "start")
        try:
            for index in range(count):
                self.workers.append(self._start(index, count))
            self.control = self._open_control(config)
            status = self._wait_ready()
            if status is not None:
                self._stop_workers()
                return status
            return self._supervise()
        finally:
            if self.control is not None:
                self.control.close()
            if self._recovery is not None:
                deadline = self._stop_deadline or time.monotonic() + STOP_TIMEOUT_S
                self._recovery.close(deadline)
            self.notifier.close()
            for worker in self.workers:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join(5)
            if self._lock is not None:
                self._lock.release()

    def _lock_output(self, out: Path, **fields: Any) -> OutputLock:
        """Hold output directory ``out`` (:mod:`callcap.storage.lock`); a refusal is logged
        (``output_in_use`` naming the holder, or ``output_unwritable``), then raised."""
        try:
            return OutputLock(out)
        except OutputInUse as exc:
            self.log.error("output_in_use", out_dir=str(out), pid=exc.pid, error=str(exc), **fields)
            raise
        except StorageError as exc:
            self.log.error("output_unwritable", out_dir=str(out), error=str(exc), **fields)
            raise

    def _start(self, index: int, count: int) -> Worker:
        assert self.config is not None
        return start_worker(index, run_worker, (self.config, index, count, self.pcap))

    def _wait_ready(self) -> int | None:
        """Until every worker captures: None, or the exit status if one of them failed."""
        pending = list(self.workers)
        while pending:
            wait_any(pending, POLL_S)
            for worker in list(pending):
                for message in worker.receive():
                    if message[0] == "ready":
                        worker.ready = True
                        worker.last_heard = time.monotonic()
                        if worker is self.workers[0]:
                            self._ready_info = message[1]
                    elif message[0] == "failed":
                        return int(message[1])
                if worker.ready:
                    pending.remove(worker)
                elif not worker.process.is_alive():
                    worker.process.join(1)
                    return worker.process.exitcode or EXIT_CAPTURE
            if self._stop and pending:
                return EXIT_OK
        info = dict(self._ready_info)
        self.log.info("capture_started", workers=len(self.workers), **info)
        self.notifier.ready("replaying" if self.pcap is not None else "capturing")
        return None

    def _open_control(self, config: Config) -> ControlServer | None:
        """The pause/resume socket; recording goes on without it if it cannot be opened."""
        if config.control.socket is None:
            return None
        try:
            server = ControlServer(config.control.socket, self._control, group=config.control.group)
        except ControlError as exc:
            self.log.error("control_unavailable", error=str(exc))
            return None
        self.log.info("control_listening", socket=config.control.socket)
        return server

    def _control(self, command: str, call_id: str) -> dict[str, Any]:
        """A pause/resume request, answered by the worker that records the call."""
        live = [w for w in self.workers if w.process.is_alive()]
        if not live:
            return {"ok": False, "error": "no recording worker is running"}
        worker = self.workers[owner_of(call_id, len(self.workers))]
        request = next(self._requests)
        if not worker.send(("control", request, command, call_id)):
            return {"ok": False, "error": "the call's recording worker is not running"}
        reply = worker.wait_for("reply", request, CONTROL_TIMEOUT_S)
        if reply is None:
            return {"ok": False, "error": "the call's recording worker did not answer"}
        answer: dict[str, Any] = reply[2]
        return answer

    # -- supervising ----------------------------------------------------------------------

    def _supervise(self) -> int:
        assert self.config is not None
        next_watchdog = time.monotonic()
        next_stats = time.monotonic() + self.config.logging.stats_interval_s
        sweeper = RetentionSweeper(Path(self.config.recording.out_dir), self.log)
        finished = False
        try:
            while not self._stop:
                wait_any(self.workers, POLL_S)
                finished = self._collect()
                if finished:
                    break
                if self.control is not None:
                    self.control.poll()
                mono = time.monotonic()
                interval = self.notifier.watchdog_interval
                if interval is not None and mono >= next_watchdog and self._healthy(mono):
                    self.notifier.watchdog()
                    next_watchdog = mono + interval
                if mono >= next_stats:
                    next_stats = mono + self.config.logging.stats_interval_s
                    self._stats()
                if self._reload:
                    self._reload = False
                    self._reconfigure()
                if sweeper.out_dir != Path(self.config.recording.out_dir):
                    sweeper.close()
                    sweeper = RetentionSweeper(Path(self.config.recording.out_dir), self.log)
                sweeper.poll(mono, self.config)
        finally:
            sweeper.close()
        if finished:  # a replay ran to the end of its file
            self.notifier.stopping()
            self.log.info("daemon_stopping", reason="capture_end")
            self._stats()
            return EXIT_OK
        self._shutdown()
        return EXIT_OK

    def _collect(self) -> bool:
        """Messages and exits of the workers; True when a replay has ended in all of them."""
        done = 0
        for i, worker in enumerate(self.workers):
            self._note_stats(worker)
            if worker.process.is_alive():
                continue
            worker.process.join(1)
            code = worker.process.exitcode
            if self.pcap is not None and code == 0:
                done += 1
                continue
            self._worker_died(i, worker, code)
        return self.pcap is not None and done == len(self.workers)

    def _worker_died(self, index: int, worker: Worker, code: int | None) -> None:
        assert self.config is not None
        log = self.log
        died = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        log.error("worker_exited", worker=index, pid=worker.pid, how=died)
        if self._recovery is not None:
            self._recovery.queue(self.config, Path(self.config.recording.out_dir), "worker_exited")
        mono = time.monotonic()
        self._restarts = [t for t in self._restarts if mono - t < 60.0] + [mono]
        if len(self._restarts) > MAX_RESTARTS:
            log.error("workers_failing", restarts=len(self._restarts), within_s=60)
            self._stop = True
            return
        if worker.stats:
            self._retired.append(worker.stats)  # its counts stay in the running totals
        replacement = self._start(index, len(self.workers))
        self.workers[index] = replacement
        log.info("worker_restarted", worker=index, pid=replacement.pid)

    @staticmethod
    def _note_stats(worker: Worker) -> None:
        """Take what a worker sent: it is alive, and its newest counters."""
        for message in worker.receive():
            worker.last_heard = time.monotonic()
            if message[0] == "stats":
                worker.stats = message[1]

    def _healthy(self, mono: float) -> bool:
        return all(w.process.is_alive() and mono - w.last_heard < STUCK_S for w in self.workers)

    def _stats(self) -> None:
        """One ``capture_stats`` for all workers: running totals and this interval's part."""
        for worker in self.workers:
            worker.send(("stats?",))
        deadline = time.monotonic() + 1.0
        for worker in self.workers:
            if worker.process.is_alive():
                reply = worker.wait_for("stats", None, max(0.0, deadline - time.monotonic()))
                if reply is not None:
                    worker.stats = reply[1]
        totals = _merge([w.stats for w in self.workers], self._retired)
        mono = time.monotonic()
        elapsed = max(1e-9, mono - self._last_stats)
        self._last_stats = mono
        interval = {
            key: totals[key] - self._last_totals.get(key, 0)
            for key in ("packets", "kernel_received", "kernel_dropped", "kernel_freezes")
        }
        self._last_totals = dict(totals)
        pids = [os.getpid(), *[w.pid for w in self.workers if w.pid is not None]]
        self.log.info(
            "capture_stats",
            interval_s=round(elapsed, 3),
            packets_total=totals["packets"],
            packets_interval=interval["packets"],
            bytes_total=totals["bytes"],
            rtp_packets_total=totals["rtp_packets"],
            sip_messages_total=totals["sip_messages"],
            kernel_received_total=totals["kernel_received"],
            kernel_received_interval=interval["kernel_received"],
            kernel_dropped_total=totals["kernel_dropped"],
            kernel_dropped_interval=interval["kernel_dropped"],
            kernel_freezes_total=totals["kernel_freezes"],
            kernel_freezes_interval=interval["kernel_freezes"],
            frames_truncated_total=totals["truncated"],
            ring_blocks_corrupt_total=totals["corrupt_blocks"],
            active_calls=totals["active_calls"],
            recordings_total=totals["recordings"],
            recordings_failed_total=totals["recordings_failed"],
            recordings_incomplete_total=totals["recordings_incomplete"],
            audit_failed_total=totals["audit_failed"],
            workers=len(self.workers),
            cpu_s=round(sum(float(w.stats.get("cpu_s", 0.0)) for w in self.workers), 2),
            rss_mb=_resident_mb(pids),
        )
        self.notifier.status(
            f"{totals['active_calls']} calls active, {totals['recordings']} recorded"
        )

    # -- reload and shutdown --------------------------------------------------------------

    def _reconfigure(self) -> None:
        try:
            config = self._load()
        except ConfigError as exc:
            self.log.error(
                "config_invalid", error=str(exc), file=exc.file, line=exc.line, key=exc.key
            )
            return
        out = Path(config.recording.out_dir)
        try:
            ensure_dir(out, config.recording.dir_mode)
        except OSError as exc:
            self.log.error(
                "output_unwritable", out_dir=str(out), error=exc.strerror or str(exc), kept="config"
            )
            return
        assert self.config is not None
        if self._lock is not None and out.resolve() != self._lock.path.resolve():
            try:
                lock = self._lock_output(out, kept="config")
            except StorageError:
                return
            self._lock.release()
            self._lock = lock
        old = self.config.capture
        if (old.interfaces, old.ring, old.workers, old.snaplen) != (
            config.capture.interfaces,
            config.capture.ring,
            config.capture.workers,
            config.capture.snaplen,
        ):
            self.log.warning(
                "restart_required",
                detail="capture.interfaces, ring, workers and snaplen apply at the next start",
            )
        old_control = self.config.control
        self.config = config
        for worker in self.workers:
            worker.send(("reload", config))
        if (old_control.socket, old_control.group) != (config.control.socket, config.control.group):
            # the control socket moves (or goes, or comes) with the config: a client reads
            # its path from the same file
            if self.control is not None:
                self.control.close()
            self.control = self._open_control(config)
        self.log.info("config_reloaded", config=config.source, out_dir=str(out))

    def _shutdown(self) -> None:
        self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S  # recovery's too
        self.notifier.stopping()
        active = sum(int(w.stats.get("active_calls", 0)) for w in self.workers)
        self.log.info("daemon_stopping", reason="signal", active_calls=active)
        self._stop_workers()
        self._stats()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def _stop_workers(self) -> None:
        """SIGTERM to every worker, then wait for each to publish its calls and exit."""
        for worker in self.workers:
            if worker.process.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self.workers:
            while worker.process.is_alive() and time.monotonic() < deadline:
                self._note_stats(worker)
                worker.process.join(0.1)
            self._note_stats(worker)
            if worker.process.is_alive():
                self.log.error("worker_killed", worker=worker.index, pid=worker.pid)
                worker.process.kill()
            worker.process.join(5)


_COUNTERS: Final = (
    "rtp_packets",
    "calls_started",
    "recordings",
    "recordings_failed",
    "recordings_incomplete",
    "audit_failed",
)
_CAPTURE: Final = {
    "kernel_received": "kernel_packets",
    "kernel_dropped": "kernel_dropped",
    "kernel_freezes": "kernel_freezes",
    "truncated": "truncated",
    "corrupt_blocks": "corrupt_blocks",
}


def _merge(live: list[dict[str, Any]], retired: list[dict[str, Any]]) -> dict[str, int]:
    """Running totals of all workers, those that died included.  Every worker sees every
    frame, so ``packets``, ``bytes``, ``sip_messages`` and ``kernel_received`` are the most
    any one saw; what each records, drops or loses is its own, so those add up."""
    out = {"packets": 0, "bytes": 0, "sip_messages": 0, "active_calls": 0}
    out |= dict.fromkeys(_COUNTERS, 0) | dict.fromkeys(_CAPTURE, 0)
    for stats in live + retired:
        capture = stats.get("capture", {})
        out["packets"] = max(out["packets"], int(stats.get("frames", 0)))
        out["bytes"] = max(out["bytes"], int(stats.get("bytes", 0)))
        out["sip_messages"] = max(out["sip_messages"], int(stats.get("sip_messages", 0)))
        out["kernel_received"] = max(out["kernel_received"], int(capture.get("kernel_packets", 0)))
        for key in _COUNTERS:
            out[key] += int(stats.get(key, 0))
        for key, source in _CAPTURE.items():
            if key != "kernel_received":
                out[key] += int(capture.get(source, 0))
    for stats in live:
        out["active_calls"] += int(stats.get("active_calls", 0))
    return out


__all__ = ["Daemon", "apply_overrides"]
