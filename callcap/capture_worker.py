"""One recording worker of ``callcap daemon``: a capture source, a pipeline, a pipe to the master.

The master (:mod:`callcap.daemon`) forks one of these per worker (:mod:`callcap.workers`
says why every worker sees every frame and records only its own calls).  A worker opens its
own capture ring, runs the pipeline on the blocks it hands over, and tells the master what it
needs to know — ready, alive, counters — over its pipe; it logs its own events (calls,
recordings, drops, overruns) with a ``worker`` field.

Time: packets carry the kernel's receive timestamp, which places audio and drives the
pipeline's ticks while traffic flows.  When the capture is quiet the loop ticks the pipeline
by the monotonic clock, expressed on the capture clock as *the newest packet time plus the
monotonic time since it arrived*, so that a wall clock stepped by NTP never ends calls early
or pads them with silence.

Messages, worker → master: ``("ready", info)``, ``("stats", counters)`` (every
``logging.stats_interval_s`` and when asked), ``("alive",)`` (twice a second at least),
``("reply", request_id, answer)``.  Master → worker: ``("control", request_id, command,
call_id)``, ``("reload", config)``, ``("stats?",)``.  SIGTERM/SIGINT stop the worker: it
reads what the kernel already holds, ends every call in flight as ``shutdown``, publishes
them and exits 0.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, Final

import structlog

from callcap.capture.bpf import build_filter
from callcap.capture.live import CaptureEvent, LiveCapture, Polled, RingSpec
from callcap.capture.pcapfile import CaptureReader
from callcap.capture.wallclock import WallClockSteps
from callcap.config.schema import Config
from callcap.errors import CaptureError
from callcap.logs import get_logger
from callcap.pipeline import Pipeline

POLL_S: Final = 0.25
ALIVE_S: Final = 0.5
DRAIN_S: Final = 1.0
EXIT_OK: Final = 0
EXIT_CAPTURE: Final = 3


class CaptureWorker:
    """The worker's state and loop (see the module docstring)."""

    def __init__(
        self,
        conn: multiprocessing.connection.Connection,
        config: Config,
        index: int,
        count: int,
        pcap: str | None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.index = index
        self.count = count
        self.pcap = pcap
        self._stop = False
        structlog.contextvars.bind_contextvars(worker=index)
        self.log: Any = get_logger("callcap.daemon")
        self.pipeline = Pipeline(
            config,
            Path(config.recording.out_dir),
            self.log,
            durable=True,
            worker=(index, count),
        )
        self._next_alive = 0.0
        self._next_stats = 0.0
        self._overruns: dict[str, float] = {}  # interface → monotonic start of its overrun
        self._source: LiveCapture | None = None
        self._steps: WallClockSteps | None = None  # live capture only

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self._stop = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master reloads, then tells us
        self.log.info("worker_started", pid=os.getpid(), workers=self.count)
        try:
            if self.pcap is not None:
                return self._replay(self.pcap)
            return self._live()
        finally:
            with contextlib.suppress(OSError, ValueError):
                self._send(("stats", self._counters()))
            sys.stdout.flush()

    # -- live -----------------------------------------------------------------------------

    def _live(self) -> int:
        cap = self.config.capture
        bpf = build_filter(cap.sip_ports, cap.rtp_port_range)
        ring = cap.ring
        try:
            source = LiveCapture(
                cap.interfaces,
                bpf=bpf,
                promiscuous=cap.promiscuous,
                snaplen=cap.snaplen,
                ring=RingSpec(ring.block_size, ring.blocks, ring.retire_timeout_ms),
            )
        except CaptureError as exc:
            self.log.error("capture_failed", error=str(exc))
            self._send(("failed", EXIT_CAPTURE, str(exc)))
            return EXIT_CAPTURE
        pipeline = self.pipeline
        self._source = source
        with source:
            self._send(("ready", {"interfaces": source.interfaces, "filter": bpf}))
            clock = _CaptureClock()
            steps = self._steps = WallClockSteps()
            while not self._stop:
                polled = source.poll(POLL_S)
                self._wall_clock(steps, clock)
                self._absorb(polled, clock)
                mono = time.monotonic()
                now = clock.now(mono)
                if now is not None and now >= pipeline.next_tick:
                    pipeline.tick(now)
                self._messages()
                self._report(mono)
            self._shutdown(source, clock)
        return EXIT_OK

    def _wall_clock(self, steps: WallClockSteps, clock: _CaptureClock) -> None:
        """A step of the wall clock (NTP, an admin) is taken out of the kernel's frame
        stamps while calls are in flight; with none in flight the capture takes up the
        wall clock again (see :mod:`callcap.capture.wallclock`)."""
        pipeline = self.pipeline
        step = steps.check()
        if step is not None:
            pipeline.counters["wall_clock_steps"] += 1
            self.log.warning(
                "wall_clock_step",
                step_s=round(step, 6),
                active_calls=len(pipeline.recorders),
                detail="calls in flight keep the clock they began with",
            )
        if steps.shift and not pipeline.recorders and not pipeline.tracker.calls:
            moved = steps.rebase()
            if moved < 0:  # no call in flight: nothing is placed against the old clock
                pipeline.restart_clock()
            clock.reset()
            self.log.info("wall_clock_taken_up", moved_s=round(moved, 6))

    def _absorb(self, polled: Polled, clock: _CaptureClock) -> None:
        """One wake-up's blocks into the pipeline, its capture events into the log."""
        steps = self._steps
        for event in polled.events:
            self._event(event)
        for loss in polled.losses:
            start, end = loss.start, loss.end
            if steps is not None:
                start, end = steps.correct_time(start), steps.correct_time(end)
            self.pipeline.capture_loss(start, end, loss.reason)
            self.log.warning(
                "capture_loss",
                interface=loss.interface,
                reason=loss.reason,
                from_ts=round(start, 6),
                to_ts=round(end, 6),
                frames=loss.frames,
            )
        if polled.blocks:
            blocks = polled.blocks
            if steps is not None:
                blocks = [steps.correct(block) for block in blocks]
            self.pipeline.run_live(blocks)
            clock.saw(float(blocks[-1].times.max()), time.monotonic())

    def _event(self, event: CaptureEvent) -> None:
        log = self.log
        if event.kind == "overrun_started":
            self._overruns[event.interface] = time.monotonic()
            log.warning("capture_overrun", state="started", interface=event.interface)
        elif event.kind == "overrun_ended":
            began = self._overruns.pop(event.interface, None)
            log.warning(
                "capture_overrun",
                state="ended",
                interface=event.interface,
                dropped=event.dropped,
                freezes=event.freezes,
                duration_s=None if began is None else round(time.monotonic() - began, 3),
            )
        elif event.kind == "block_corrupt":
            self.pipeline.drops.drop("ring_block_corrupt", self.pipeline.now, detail=event.detail)
        else:  # interface_down, interface_up, interface_reopened, interface_reopen_failed
            fields: dict[str, Any] = {"interface": event.interface}
            if event.outage_s is not None:
                fields["outage_s"] = event.outage_s
            if event.detail is not None:
                fields["error"] = event.detail
            log.warning(event.kind, **fields)

    def _shutdown(self, source: LiveCapture, clock: _CaptureClock) -> None:
        pipeline = self.pipeline
        self.log.info("worker_stopping", active_calls=len(pipeline.recorders))
        # What the kernel already holds for us, so that a call ended by shutdown keeps the
        # audio captured up to the signal (bounded: a flood must not delay the exit past
        # the unit's stop timeout).
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            polled = source.poll(0)
            if not polled.blocks and not polled.losses:
                break
            self._absorb(polled, clock)
        end = clock.now(time.monotonic())
        pipeline.close("shutdown", end if end is not None else time.time())

    # -- replay ---------------------------------------------------------------------------

    def _replay(self, path: str) -> int:
        try:
            reader = CaptureReader(path)
        except CaptureError as exc:
            self.log.error("capture_failed", error=str(exc))
            self._send(("failed", EXIT_CAPTURE, str(exc)))
            return EXIT_CAPTURE
        pipeline = self.pipeline
        with reader:
            self._send(("ready", {"pcap": path}))
            try:
                blocks = itertools.takewhile(lambda _b: not self._stop, reader.blocks())
                for block in blocks:
                    pipeline.run_live([block])
                    self._messages()
                    self._report(time.monotonic())
            except CaptureError as exc:
                self.log.error("capture_failed", error=str(exc))
        pipeline.close("shutdown" if self._stop else "capture_end")
        return EXIT_OK

    # -- the master's pipe --------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            self._stop = True  # the master is gone: finish and exit

    def _messages(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                self._handle(message)
        except (EOFError, OSError):
            self._stop = True

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "control":
            _kind, request, command, call_id = message
            answer = self.pipeline.control_pause(call_id, command == "pause")
            self._send(("reply", request, answer))
        elif kind == "reload":
            self.config = message[1]
            self.pipeline.reconfigure(self.config)
        elif kind == "stats?":
            self._send(("stats", self._counters()))

    def _report(self, mono: float) -> None:
        if mono >= self._next_stats:
            self._next_stats = mono + max(1.0, self.pipeline.config.logging.stats_interval_s / 4)
            self._send(("stats", self._counters()))
            self._next_alive = mono + ALIVE_S
        elif mono >= self._next_alive:
            self._next_alive = mono + ALIVE_S
            self._send(("alive",))

    def _counters(self) -> dict[str, Any]:
        p = self.pipeline
        st = p.stats()
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "frames": st.frames,
            "bytes": p.bytes,
            "rtp_packets": st.rtp_packets,
            "sip_messages": st.sip_messages,
            "calls_started": st.calls_started,
            "recordings": st.recordings,
            "recordings_failed": st.recordings_failed,
            "recordings_incomplete": st.recordings_incomplete,
            "audit_failed": st.audit_failed,
            "active_calls": st.active_calls,
            "rtp_other_worker": p.counters["rtp_other_worker"],
            "drops": dict(st.drops),
            "cpu_s": round(sum(os.times()[:2]), 3),
        }
        if self._source is not None:
            out["capture"] = asdict(self._source.stats())
        return out


class _CaptureClock:
    """The capture clock while no packet moves it: the newest kernel timestamp plus the
    monotonic time since it was taken (never a wall clock that NTP may step)."""

    def __init__(self) -> None:
        self._ts: float | None = None
        self._mono = 0.0

    def reset(self) -> None:
        """The frames' clock was taken up anew: the next frame sets it."""
        self._ts = None

    def saw(self, ts: float, mono: float) -> None:
        if self._ts is None or ts >= self._ts:
            self._ts = ts
            self._mono = mono

    def now(self, mono: float) -> float | None:
        if self._ts is None:
            return None
        return self._ts + (mono - self._mono)


def run_worker(
    conn: multiprocessing.connection.Connection,
    config: Config,
    index: int,
    count: int,
    pcap: str | None,
) -> int:
    """The worker process's entry point (see :func:`callcap.workers.start_worker`)."""
    return CaptureWorker(conn, config, index, count, pcap).run()


__all__ = ["CaptureWorker", "run_worker"]
