"""``callcap daemon``: the live recorder's main loop and lifecycle.

Signal handlers only set flags (gunicorn's arbiter does the same); the loop acts on them
between batches of packets: SIGTERM/SIGINT end every call in flight as ``shutdown`` and
publish it, SIGHUP reloads the config (a broken file is logged and the running config kept).
The loop wakes at least four times a second, so flushing, inactivity timeouts and the
systemd watchdog never wait on traffic.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from callcap.capture.live import LiveCapture, build_filter
from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config
from callcap.config.schema import Config
from callcap.control import ControlError, ControlServer
from callcap.errors import CallcapError, CaptureError, ConfigError
from callcap.logs import LogFormat, configure_logging, get_logger
from callcap.pipeline import Pipeline
from callcap.sdnotify import Notifier
from callcap.storage.audit import RECORDING_DISCARDED, RECORDING_PUBLISHED, AuditLog, FileRef
from callcap.storage.layout import ensure_dir
from callcap.storage.spool import Recovered, recover_spool
from callcap.sweeper import RetentionSweeper

POLL_S = 0.25
DRAIN_S = 1.0
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CAPTURE = 3


def _resident_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    import resource

    return round(pages * resource.getpagesize() / 1e6, 1)


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
    ) -> None:
        self.config_path = config_path
        self.interfaces = tuple(interfaces)
        self.out = out
        self.log_format = log_format
        self.pcap = pcap
        self._stop = False
        self._reload = False
        self.notifier = Notifier()
        self.log: Any = get_logger("callcap.daemon")
        self.control: ControlServer | None = None

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop = True

    def _on_reload(self, signum: int, _frame: FrameType | None) -> None:
        self._reload = True

    def _load(self) -> Config:
        return apply_overrides(load_config(self.config_path), self.interfaces, self.out)

    def run(self) -> int:
        try:
            config = self._load()
        except ConfigError as exc:
            configure_logging(self.log_format or "json", "info")
            self.log.error("config_invalid", error=str(exc))
            return EXIT_CONFIG
        configure_logging(self.log_format or config.logging.format, config.logging.level)
        log = self.log
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        out = Path(config.recording.out_dir)
        log.info(
            "daemon_started", config=config.source, out_dir=str(out), pid=__import__("os").getpid()
        )
        try:
            ensure_dir(out, config.recording.dir_mode)
        except OSError as exc:
            log.error("output_unwritable", out_dir=str(out), error=exc.strerror or str(exc))
            return EXIT_CAPTURE
        self._recover(config, out)
        pipeline = Pipeline(config, out, log, durable=True)
        self.control = self._open_control(config, pipeline)
        try:
            if self.pcap is not None:
                return self._replay(pipeline, self.pcap)
            return self._live(pipeline, config)
        finally:
            if self.control is not None:
                self.control.close()
            self.notifier.close()

    def _open_control(self, config: Config, pipeline: Pipeline) -> ControlServer | None:
        """The pause/resume socket; recording goes on without it if it cannot be opened."""
        if config.control.socket is None:
            return None
        try:
            server = ControlServer(
                config.control.socket,
                lambda command, call_id: pipeline.control_pause(call_id, command == "pause"),
                group=config.control.group,
            )
        except ControlError as exc:
            self.log.error("control_unavailable", error=str(exc))
            return None
        self.log.info("control_listening", socket=config.control.socket)
        return server

    def _recover(self, config: Config, out: Path) -> None:
        """Publish the calls a previous run left in the spool (crash, kill -9, power cut).

        Runs before capturing, so the spool holds only dead writers' files (and those of
        another live callcap on the same directory, which are left alone).
        """
        recovered, damaged = recover_spool(
            out, file_mode=config.recording.file_mode, dir_mode=config.recording.dir_mode
        )
        for call in recovered:
            self.log.info(
                "call_recovered",
                call_uid=call.call_uid,
                path=str(call.wav.path) if call.wav is not None else None,
                sidecar=str(call.sidecar),
                bytes=call.wav.size if call.wav is not None else None,
                sha256=call.wav.sha256 if call.wav is not None else None,
                duration_s=call.duration_s,
                audio_s=call.audio_s,
            )
        if recovered:
            self._audit_recovered(config, out, recovered)
        for entry in damaged:
            self.log.error(
                "spool_entry_damaged",
                entry=entry.name,
                reason=entry.reason,
                moved_to=[str(p) for p in entry.moved_to],
            )

    def _audit_recovered(self, config: Config, out: Path, recovered: list[Recovered]) -> None:
        """Recovered recordings enter the audit log like any other, so ``verify`` knows them."""
        try:
            with AuditLog(
                out, file_mode=config.recording.file_mode, dir_mode=config.recording.dir_mode
            ).locked() as audit:
                for call in recovered:
                    files: dict[str, FileRef] = {}
                    if call.wav is not None:
                        files["wav"] = audit.ref(call.wav.path, call.wav.sha256)
                    files["sidecar"] = audit.ref(call.sidecar)
                    audit.append(
                        RECORDING_PUBLISHED if call.wav is not None else RECORDING_DISCARDED,
                        {"call_uid": call.call_uid, "end_reason": "recovered"},
                        files,
                    )
        except (OSError, CallcapError) as exc:
            self.log.error("audit_failed", error=str(exc)[:500])

    def _live(self, pipeline: Pipeline, config: Config) -> int:
        log = self.log
        cap = config.capture
        bpf = build_filter(cap.sip_ports, cap.rtp_port_range)
        try:
            source = LiveCapture(
                cap.interfaces, bpf=bpf, promiscuous=cap.promiscuous, snaplen=cap.snaplen
            )
        except CaptureError as exc:
            log.error("capture_failed", error=str(exc))
            return EXIT_CAPTURE
        with source:
            log.info("capture_started", interfaces=source.interfaces, filter=bpf)
            self.notifier.ready("capturing")
            next_stats = time.monotonic() + config.logging.stats_interval_s
            next_watchdog = time.monotonic()
            sweeper = RetentionSweeper(pipeline.out_dir, log)
            while not self._stop:
                pipeline.run(source.poll(POLL_S))
                if self.control is not None:
                    self.control.poll()
                now = time.time()
                if now >= pipeline.next_tick:
                    pipeline.tick(now)
                mono = time.monotonic()
                if self.notifier.watchdog_interval is not None and mono >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = mono + self.notifier.watchdog_interval
                if mono >= next_stats:
                    next_stats = mono + pipeline.config.logging.stats_interval_s
                    self._stats(pipeline, source)
                if self._reload:
                    self._reload = False
                    self._reconfigure(pipeline)
                sweeper.poll(mono, pipeline.config)
            self._shutdown(pipeline, source)
            sweeper.close()
        return EXIT_OK

    def _replay(self, pipeline: Pipeline, path: str) -> int:
        log = self.log
        try:
            reader = CaptureReader(path)
        except CaptureError as exc:
            log.error("capture_failed", error=str(exc))
            return EXIT_CAPTURE
        with reader:
            log.info("capture_started", pcap=path)
            self.notifier.ready("replaying")
            try:
                pipeline.run_blocks(itertools.takewhile(lambda _b: not self._stop, reader.blocks()))
            except CaptureError as exc:
                log.error("capture_failed", error=str(exc))
        if self._stop:
            self._shutdown(pipeline, None)
        else:
            pipeline.close("capture_end")
            self.notifier.stopping()
            log.info("daemon_stopping", reason="capture_end")
        return EXIT_OK

    def _stats(self, pipeline: Pipeline, source: LiveCapture | None) -> None:
        st = pipeline.stats()
        kernel = source.stats() if source is not None else None
        self.log.info(
            "capture_stats",
            packets=st.frames,
            bytes=pipeline.bytes,
            rtp_packets=st.rtp_packets,
            sip_messages=st.sip_messages,
            kernel_received=kernel.received if kernel else None,
            kernel_dropped=kernel.dropped if kernel else None,
            active_calls=st.active_calls,
            recordings=st.recordings,
            rss_mb=_resident_mb(),
        )
        self.notifier.status(f"{st.active_calls} calls active, {st.recordings} recorded")

    def _reconfigure(self, pipeline: Pipeline) -> None:
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
        pipeline.reconfigure(config)
        self.log.info("config_reloaded", config=config.source, out_dir=str(out))

    def _shutdown(self, pipeline: Pipeline, source: LiveCapture | None) -> None:
        self.notifier.stopping()
        self.log.info("daemon_stopping", reason="signal", active_calls=len(pipeline.recorders))
        if source is not None:
            _drain(pipeline, source)
        pipeline.close("shutdown", time.time())
        self._stats(pipeline, source)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _drain(pipeline: Pipeline, source: LiveCapture) -> None:
    """Feed what the kernel already holds for us, so a call ended by shutdown keeps the audio
    captured up to the signal instead of losing the last poll interval (bounded in time, so
    a flood cannot delay the exit past the unit's stop timeout)."""
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        frames = source.poll(0)
        if not frames:
            return
        for ts, linktype, frame in frames:
            pipeline.feed(ts, linktype, frame)
