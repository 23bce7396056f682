"""The pipeline: frames in, recordings out.  The only place where capture, codecs and storage meet.

``feed`` takes one captured frame through every layer; it is the reference for what any frame
means.  Offline files and live sockets come in as blocks of frames (``run_blocks``), where
the RTP of flows ``feed`` has already tied to a call takes the fast lane
(:mod:`callcap.fastlane`) — the same result, a block at a time, bit for bit.  Everything
time-driven (flushing audio blocks, call inactivity, fragment and TCP state expiry) runs from
``tick`` once per flush interval of *capture* time, so a pcap replays exactly as it was
captured, whatever the speed of the machine reading it.

A bad frame or message costs one counted, rate-limited ``packet_dropped`` event and nothing
else: errors never cross from one packet, or one call, into another.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callcap.capture.block import FrameBlock, batched
from callcap.capture.decode import Datagram, PacketDecoder
from callcap.capture.dialog import (
    Call,
    CallAnswered,
    CallEnded,
    CallStarted,
    CallTracker,
    DtmfSignalled,
    Event,
    MediaOffered,
)
from callcap.capture.ip import PROTO_TCP, PROTO_UDP
from callcap.capture.media import MediaRouter, ip_text, pack_ip
from callcap.capture.rtp import parse_rtp
from callcap.capture.sip import SipMessage, SipStreamFramer, looks_like_sip
from callcap.capture.tcp import TcpReassembler
from callcap.capture.timeguard import ClockStep, TimeGuard
from callcap.config.schema import Config
from callcap.consent import ConsentDecision
from callcap.errors import CallcapError, ParseError, StorageError, is_disk_full
from callcap.fastlane import FastLane, flow_key
from callcap.logs import RateLimitedDrops
from callcap.publishing import AuditNote, Entry, Noted, Publisher, Result
from callcap.recorder import CallRecorder, LossSpan, Published
from callcap.sharding import owner_of
from callcap.storage.audit import CONSENT_DECIDED, AuditLog
from callcap.storage.layout import spool_dir
from callcap.storage.reserve import DiskReserve, disk_space
from callcap.storage.spool import FREE_FILES, SpoolSync

MAX_LOSS_SPANS = 1000
"""Sensor loss spans kept for the calls in flight (a sidecar lists at most this many)."""


@dataclass(frozen=True, slots=True)
class PipelineStats:
    frames: int
    rtp_packets: int
    sip_messages: int
    calls_started: int
    recordings: int
    active_calls: int
    drops: dict[str, int]
    #: publications that failed (nothing of the call reached the archive)
    recordings_failed: int = 0
    #: calls whose audio was cut short or not recorded for lack of disk space (or a failed
    #: spool file): published as partial recordings, or as a sidecar saying why
    recordings_incomplete: int = 0
    #: published recordings whose audit entries could not be written
    audit_failed: int = 0


class Pipeline:
    """Wires packet decoding → SIP dialogs / RTP streams → per-call recorders → published files."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        logger: Any,
        *,
        durable: bool = False,
        on_published: Callable[[Published], None] | None = None,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        self.config = config
        #: (this worker's index, how many workers): the calls this pipeline records are
        #: those :func:`~callcap.sharding.owner_of` gives to it; it follows all the others'
        #: signalling and routes too, only to recognise their media and let it pass.
        self.worker = worker
        self.out_dir = out_dir
        self.log = logger
        self.durable = durable
        self.on_published = on_published
        self.audit = AuditLog(
            out_dir, file_mode=config.recording.file_mode, dir_mode=config.recording.dir_mode
        )
        self.decoder = PacketDecoder()
        self.tcp = TcpReassembler()
        self.tracker = CallTracker(
            inactivity_timeout_s=config.calls.inactivity_timeout_s,
            failed_linger_s=config.calls.failed_linger_s,
            max_calls=config.calls.max_active_calls,
            max_pending=config.calls.max_pending_calls,
            on_evict=self._evicted,
        )
        self.router = MediaRouter()
        self.recorders: dict[str, CallRecorder] = {}
        self._foreign: set[str] = set()  # calls in progress that another worker records
        #: Spans of capture time in which the sensor lost frames (live capture's ring
        #: overran, an interface was down), shared with every recorder.
        self.losses: list[LossSpan] = []
        self.drops = RateLimitedDrops(logger, interval_s=config.logging.drop_log_interval_s)
        self.counters: Counter[str] = Counter()
        self._framers: dict[tuple[bytes, int, bytes, int], SipStreamFramer] = {}
        self.lane = FastLane(self)
        self._ending: list[tuple[CallRecorder, CallEnded]] = []  # ended, lane not drained yet
        self._spool_sync = SpoolSync()
        self._publisher = Publisher(self._audit_for)
        self._sip_ports = frozenset(config.capture.sip_ports)
        self._detect_any = config.capture.detect_sip_any_port
        self._interval = config.rtp.flush_interval_ms / 1000.0
        self._next_tick = -math.inf
        self.now = -math.inf
        #: the newest time a tick ran at (a live capture ticks while no frame comes)
        self._ticked = -math.inf
        #: Frame times the capture clock cannot contain are sorted out before they reach a
        #: call (:mod:`callcap.capture.timeguard`): no call can hold a silence longer than
        #: its inactivity timeout, so no frame may move the clock further than that.
        self._guard = TimeGuard(
            config.calls.inactivity_timeout_s,
            self._capture_clock,
            on_fault=self._time_fault,
            on_drop=self._time_impossible,
        )
        self.frames = 0
        self.bytes = 0
        self.rtp_packets = 0
        self.sip_messages = 0
        self.calls_started = 0
        self.recordings = 0
        self.recordings_failed = 0
        self.recordings_incomplete = 0
        self.audit_failed = 0
        self.sources: tuple[str, ...] = ()
        #: Room kept for a full disk (:mod:`callcap.storage.reserve`), taken at the first tick.
        self._reserve = self._new_reserve()
        self._reserve_failed = False
        #: None while the output filesystem has room; else why new calls are not recorded:
        #: ``disk_low`` (below ``storage.min_free``) or ``disk_full`` (a write failed).
        self.disk_state: str | None = None
        #: Calls to checkpoint once the events of the message in hand are handled.
        self._due_checkpoints: dict[str, tuple[CallRecorder, float]] = {}

    # -- the hot path -----------------------------------------------------------------------------

    def run(self, frames: Iterable[tuple[float, int, bytes]]) -> None:
        """Feed many frames: the same as ``feed`` for each, with the fast lane for known RTP
        (frames are batched into blocks; see :meth:`run_blocks`)."""
        self.run_blocks(batched(frames))

    def run_blocks(self, blocks: Iterable[FrameBlock]) -> None:
        """Feed blocks of frames: the same as ``feed`` for every frame, in order, except that
        the RTP of flows the general path already tied to a call takes the fast lane
        (:mod:`callcap.fastlane`); everything it queued is placed before this returns."""
        lane = self.lane
        try:
            for block in self._guard.blocks(blocks):
                if isinstance(block, ClockStep):
                    self._clock_step(block)
                else:
                    lane.run_block(block)
            for block in self._guard.release():  # the capture ends: no frame is held back
                lane.run_block(block)
        finally:
            self._drain_all()

    def run_live(self, blocks: Iterable[FrameBlock]) -> None:
        """:meth:`run_blocks` for a live source: what the fast lane queued stays queued
        (until the next tick, or until it must be placed), so that a wake-up of a few
        milliseconds' frames does not cost a placement of every call.  A last frame whose
        time is in doubt waits for the next wake-up's first (see :class:`TimeGuard`)."""
        lane = self.lane
        for block in self._guard.blocks(blocks):
            if isinstance(block, ClockStep):
                self._clock_step(block)
            else:
                lane.run_block(block)

    def _drain_all(self) -> None:
        """Place everything the fast lane holds, then publish the calls that waited for it."""
        self.lane.drain_all()
        if self._ending:
            self._finish_ended()

    def feed(self, ts: float, linktype: int, frame: bytes) -> None:
        """One captured frame (link-layer bytes) at capture time ``ts``."""
        self.frames += 1
        self.bytes += len(frame)
        if ts > self.now:
            self.now = ts
            if ts >= self._next_tick:
                self.tick(ts)
        try:
            dg = self.decoder.decode(ts, linktype, frame)
            if dg is None:
                return
            if dg.proto == PROTO_UDP:
                route = self.router.match(dg.src, dg.sport, dg.dst, dg.dport)
                if route is not None:
                    self._rtp(ts, route[0], route[1], dg)
                elif (
                    dg.dport in self._sip_ports
                    or dg.sport in self._sip_ports
                    or (self._detect_any and looks_like_sip(dg.payload))
                ):
                    self._sip_datagram(ts, dg)
                else:
                    self.counters["udp_unmatched"] += 1
            elif dg.proto == PROTO_TCP:
                self._tcp(ts, dg)
        except ParseError as exc:
            self.drops.drop(exc.reason, ts, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - one packet's bug must not end every call
            self.internal_error(ts, exc)

    def internal_error(self, ts: float, exc: Exception) -> None:
        """A bug met on one packet: count it, log it (rate-limited) and carry on."""
        self.drops.drop("internal_error", ts, detail=f"{type(exc).__name__}: {exc}"[:300])

    def _rtp(self, ts: float, call_id: str, sender: str, dg: Datagram) -> None:
        payload = dg.payload
        if len(payload) >= 2 and 72 <= (payload[1] & 0x7F) <= 76:
            self.counters["rtcp"] += 1  # RTCP multiplexed on the RTP port (RFC 5761)
            return
        recorder = self.recorders.get(call_id)
        lane = self.lane
        key = flow_key(dg.src, dg.sport, dg.dst, dg.dport)
        room = len(lane.flows) < 4 * self.config.calls.max_active_calls
        endpoints = (dg.src, dg.sport, dg.dst, dg.dport)
        if recorder is None:
            if call_id in self._foreign:
                self.counters["rtp_other_worker"] += 1
                if room:  # its next packets are dropped in the lane, a block at a time
                    lane.learn(key, call_id, None, sender, endpoints)
            else:
                self.counters["rtp_for_ended_call"] += 1
            return
        pt, _marker, seq, rts, ssrc, _cc, body = parse_rtp(payload)
        flow = lane.flows.get(key)
        if flow is not None:
            lane.drain(flow)  # its queued packets came first
        self.rtp_packets += 1
        ctx = recorder.stream_for(sender, dg.src, dg.sport, dg.dst, dg.dport, ssrc, ts)
        recorder.push(ctx, ts, pt, seq, rts, body)
        if room:
            lane.learn(key, call_id, recorder, sender, endpoints).contexts.setdefault(ssrc, ctx)

    # -- SIP --------------------------------------------------------------------------------------

    def _sip_datagram(self, ts: float, dg: Datagram) -> None:
        payload = dg.payload
        if not payload.strip(b"\r\n\x00 "):
            self.counters["sip_keepalive"] += 1  # RFC 5626 CRLF keepalive
            return
        msg = SipMessage.parse(payload)
        self._sip(ts, msg, dg, "udp")

    def _tcp(self, ts: float, dg: Datagram) -> None:
        key = (dg.src, dg.sport, dg.dst, dg.dport)
        framer = self._framers.get(key)
        if framer is None:
            if not dg.payload:
                if dg.dport in self._sip_ports or dg.sport in self._sip_ports:
                    self.tcp.feed(ts, dg)  # SYN: lets the reassembler learn the sequence start
                return
            if not (
                dg.dport in self._sip_ports
                or dg.sport in self._sip_ports
                or (self._detect_any and looks_like_sip(dg.payload))
            ):
                return
            framer = self._framers[key] = SipStreamFramer()
        for chunk in self.tcp.feed(ts, dg):
            for item in framer.feed(chunk):
                if isinstance(item, ParseError):
                    self.drops.drop(item.reason, ts, detail=str(item)[:200])
                else:
                    self._sip(ts, item, dg, "tcp")

    def _sip(self, ts: float, msg: SipMessage, dg: Datagram, transport: str) -> None:
        self.sip_messages += 1
        src = (ip_text(dg.src), dg.sport)
        dst = (ip_text(dg.dst), dg.dport)
        self._handle(self.tracker.on_message(msg, ts, src, dst, transport))
        if msg.is_request:
            self._pci_signal(ts, msg)
            self._consent_signal(ts, msg)

    def _consent_signal(self, ts: float, msg: SipMessage) -> None:
        """An in-dialog request of a call still deciding consent: its headers may be the
        ``sip_header`` evidence (the initial INVITE's are taken at the answer)."""
        call_id = msg.header("call-id")
        rec = self.recorders.get(call_id.strip()) if call_id is not None else None
        if rec is None or rec.consent.decision is not None or rec.consent.answer is None:
            return
        call = rec.call
        try:
            side = call.side_of_sender(msg, msg.from_)
        except ParseError:
            return  # the tracker has counted the malformed From already
        rec.consent_header(msg.headers, side, ts)

    def _pci_signal(self, ts: float, msg: SipMessage) -> None:
        """A pause or resume signalled in SIP: the configured header in any in-dialog
        request (``sip_header``; ``sip_info`` when the request is an INFO), or an INFO whose
        body of the configured type is the pause or resume value."""
        pci = self.config.pci
        value = msg.header(pci.sip_header.name)
        by = "sip_info" if msg.method == "INFO" else "sip_header"
        if value is None and msg.method == "INFO" and msg.body:
            ctype = (msg.content_type or "").lower()
            if ctype == pci.info_content_type.lower():
                value = msg.body.decode("utf-8", "replace")
        if value is None:
            return
        rec = self.recorders.get(msg.call_id)
        if rec is None:
            return
        word = value.strip().lower()
        if word == pci.sip_header.pause.lower():
            self._pause(rec, True, by, rec.position(ts))
        elif word == pci.sip_header.resume.lower():
            self._pause(rec, False, by, rec.position(ts))

    def _pause(self, rec: CallRecorder, pause: bool, by: str, pos: int | None) -> bool:
        changed = rec.pause(by, pos) if pause else rec.resume(by, pos)
        if changed:
            self.log.info(
                "recording_paused" if pause else "recording_resumed",
                call_uid=rec.call_uid,
                by=by,
                at_s=rec.pauses[-1][0 if pause else 1] / 8000,
            )
        return changed

    def control_pause(self, call_id: str, pause: bool) -> dict[str, Any]:
        """``callcap pause|resume``: the answer the control socket sends back."""
        rec = self.recorders.get(call_id)
        if rec is None:
            return {"ok": False, "error": f"no call in progress with Call-ID {_short(call_id)}"}
        now = self.now if math.isfinite(self.now) else None
        changed = self._pause(rec, pause, "control", None if now is None else rec.position(now))
        return {
            "ok": True,
            "call_uid": rec.call_uid,
            "paused": rec.paused,
            "changed": changed,
        }

    def _handle(self, events: list[Event]) -> None:
        """One SIP message's (or a timer's) events.  The calls they start, answer or give
        media are checkpointed once, after all of them: a 200 OK that answers with an SDP
        is one save of the facts, not one per event."""
        due = self._due_checkpoints
        try:
            self._handle_events(events)
        finally:
            if due:
                pending = list(due.values())
                due.clear()
                for rec, ts in pending:
                    if self.recorders.get(rec.call.call_id) is rec:  # not ended meanwhile
                        self._checkpoint(rec, ts)

    def _checkpoint_due(self, rec: CallRecorder, ts: float) -> None:
        self._due_checkpoints[rec.call_uid] = (rec, ts)

    def _handle_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, MediaOffered):
                self._media(event)
            elif isinstance(event, CallStarted):
                self._start(event)
            elif isinstance(event, CallAnswered):
                rec = self.recorders.get(event.call.call_id)
                if event.call.call_id in self._foreign:
                    continue  # another worker's call: it logs the answer
                self.log.info(
                    "call_answered",
                    call_uid=rec.call_uid if rec is not None else None,
                    call_id=_short(event.call.call_id),
                    ts=event.ts,
                )
                if rec is not None:
                    rec.answered(event.ts)
                    self._checkpoint_due(rec, event.ts)
            elif isinstance(event, DtmfSignalled):
                rec = self.recorders.get(event.call.call_id)
                if rec is not None:
                    rec.add_info_dtmf(event.side, event.digit, event.duration_ms, event.ts)
            elif isinstance(event, CallEnded):
                self._end(event)

    def owns(self, call_id: str) -> bool:
        """Does this worker record ``call_id`` (:mod:`callcap.sharding`)?"""
        index, count = self.worker
        return count <= 1 or owner_of(call_id, count) == index

    def _start(self, event: CallStarted) -> None:
        call = event.call
        if not self.owns(call.call_id):
            self._foreign.add(call.call_id)
            return
        if len(self.recorders) >= self.config.calls.max_active_calls:
            self.drops.drop("too_many_calls", event.ts)
            return
        rec = CallRecorder(
            call,
            self.config,
            self.out_dir,
            durable=self.durable,
            sources=self.sources,
            on_consent=self._consent_decided,
            losses=self.losses,
            on_storage_error=self._storage_error,
        )
        if self.disk_state is not None:
            rec.stop_audio(self.disk_state, self._disk_reason(self.disk_state, starting=True))
        self.recorders[call.call_id] = rec
        self.calls_started += 1
        self.log.info(
            "call_started",
            call_uid=rec.call_uid,
            call_id=_short(call.call_id),
            caller=_short(call.from_.uri),
            callee=_short(call.to.uri),
            caller_ip=call.caller_ip,
            callee_ip=call.callee_ip,
        )
        self._checkpoint_due(rec, event.ts)

    def _checkpoint(self, rec: CallRecorder, ts: float) -> None:
        """Save a call's facts to the spool (durable mode); a failure costs this call only."""
        try:
            rec.checkpoint(ts)
        except (OSError, CallcapError) as exc:
            self.drops.drop("spool_write_failed", ts, call_uid=rec.call_uid, detail=str(exc)[:300])
            if is_disk_full(exc):
                self._disk_full(str(exc))

    # -- disk space -------------------------------------------------------------------------------

    def _new_reserve(self) -> DiskReserve:
        return DiskReserve(spool_dir(self.out_dir), self.config.storage.reserve.bytes)

    def _disk_reason(self, state: str, *, starting: bool) -> str:
        when = "when the call began" if starting else "during the call"
        if state == "disk_low":
            min_free = self.config.storage.min_free
            return f"the output filesystem had less than storage.min_free ({min_free}) free {when}"
        return f"the output filesystem was full {when}"

    def _storage_error(self, rec: CallRecorder, exc: StorageError) -> None:
        """A recorder's spool file failed (its audio stopped there): log it, and if the disk
        is full, stop every call's audio (:mod:`callcap.storage.reserve` says why)."""
        self.log.warning(
            "audio_stopped",
            call_uid=rec.call_uid,
            reason=rec.audio_stopped,
            at_s=round(rec.written / 8000, 3),
            error=str(exc)[:300],
        )
        if is_disk_full(exc):
            self._disk_full(str(exc))

    def _disk_full(self, error: str) -> None:
        """A write failed for lack of space: free the reserve, end every call's audio where
        it is (what they hold is published into the freed room), start no new recording."""
        if self.disk_state == "disk_full":
            return
        self.disk_state = "disk_full"
        released = self._reserve.release_all() if self._reserve.held else 0
        self.log.error(
            "disk_full",
            out_dir=str(self.out_dir),
            error=error[:300],
            calls_in_flight=len(self.recorders),
            reserves_released=released,
        )
        reason = self._disk_reason("disk_full", starting=False)
        for rec in self.recorders.values():
            rec.stop_audio("disk_full", reason)

    def _watch_disk(self) -> None:
        """Once per tick: hold the reserve, and follow the free space against
        ``storage.min_free`` (``disk_low`` below it, ``disk_ok`` once above it again by the
        reserve's size; after a full disk, once the reserve could be taken back too)."""
        reserve = self._reserve
        if self.disk_state != "disk_full" and reserve.lost():
            self._disk_full("another process writing to this archive found the disk full")
        space = disk_space(_existing(self.out_dir))
        if space is None:
            return
        available, total = space
        low = self.config.storage.min_free.of(total)
        if self.disk_state is None and not reserve.held and not self._reserve_failed:
            self._take_reserve()  # the first tick (or a new output directory)
        elif self.disk_state == "disk_full":
            if available < low + max(2 * reserve.size, 1 << 20) or not self._take_reserve():
                return
            self._disk_ok(available)
            return
        if low <= 0:
            return
        if self.disk_state is None and available < low:
            self.disk_state = "disk_low"
            self.log.warning(
                "disk_low", out_dir=str(self.out_dir), available=available, min_free=low
            )
        elif self.disk_state == "disk_low" and available >= low + reserve.size:
            self._disk_ok(available)

    def _take_reserve(self) -> bool:
        try:
            if self._reserve.take():
                return True
        except StorageError as exc:
            self._reserve_failed = True  # e.g. no permission: record without a reserve
            self.log.error("disk_reserve_failed", out_dir=str(self.out_dir), error=str(exc)[:300])
            return True
        if self.disk_state is None:
            self._disk_full(f"no room for the reserve of {self._reserve.size} bytes")
        return False

    def _disk_ok(self, available: int) -> None:
        out_dir = str(self.out_dir)
        self.log.info("disk_ok", out_dir=out_dir, available=available, was=self.disk_state)
        self.disk_state = None

    def _consent_decided(self, rec: CallRecorder, decision: ConsentDecision) -> None:
        """A call's consent decision, logged and audited when it is made; a decision to
        keep no audio is checkpointed at once, so a crash before the call ends still leaves
        the sidecar that says why there is no recording."""
        if decision.mode == "one_party":
            return
        method = decision.evidence.method if decision.evidence is not None else None
        self.log.info(
            "consent_decided",
            call_uid=rec.call_uid,
            status=decision.status,
            rule=decision.rule,
            method=method,
            action=decision.action,
        )
        if rec.call.answer is None:
            return  # no window was open: the publication says it, if it has a sidecar
        fields = {
            "call_uid": rec.call_uid,
            "rule": decision.rule,
            "status": decision.status,
            "method": method,
            "action": decision.action,
        }
        self._publisher.note(AuditNote(rec.call_uid, rec.out_dir, CONSENT_DECIDED, fields))
        rec.consent_audited = True
        if not decision.keeps_audio and self.recorders.get(rec.call.call_id) is rec:
            # (a call ending now is published instead: no checkpoint after its last one)
            self._checkpoint(rec, max(self.now, rec.call.answer))

    def _media(self, event: MediaOffered) -> None:
        call_id = event.call.call_id
        rec = self.recorders.get(call_id)
        if rec is None and call_id not in self._foreign:
            return
        self.lane.drain_call(call_id)  # placed under the media description they arrived with
        announced: set[tuple[bytes, int]] = set()
        for md in event.sdp.audio():
            if rec is not None:
                rec.set_media(event.side, md)
            if not self.router.announce(call_id, event.side, md.address, md.port):
                self.counters["sdp_media_not_routable"] += 1
            elif md.address is not None:
                packed = pack_ip(md.address)
                if packed is not None:
                    announced.add((packed, md.port))
        # Routes changed: forget the fast-lane flows they may affect (this call's, and any
        # other call's flow through an address this call now claims); they re-learn from
        # the router on their next packet.
        self.lane.forget_routes(call_id, announced)
        if rec is not None:
            self._checkpoint_due(rec, event.ts)

    def _end(self, event: CallEnded) -> None:
        """A call ended: its media is no longer routed, and it is published once the fast
        lane has placed what it still holds of it (at the next drain: calls ending together
        then cost one drain, not one each).  Calls are finished in the order they ended."""
        call = event.call
        rec = self.recorders.pop(call.call_id, None)
        self.router.forget_call(call.call_id)
        waiting = self.lane.close_call(call.call_id)
        if rec is None:
            self._foreign.discard(call.call_id)
            return
        if waiting or self._ending:
            self._ending.append((rec, event))
        else:
            self._finish(rec, event)

    def _finish_ended(self) -> None:
        """Publish the calls that ended while the lane held frames of theirs (now placed)."""
        ending, self._ending = self._ending, []
        for rec, event in ending:
            self._finish(rec, event)

    def _finish(self, rec: CallRecorder, event: CallEnded) -> None:
        call = event.call
        end = call.end if call.end is not None else event.ts
        try:
            publication = rec.prepare(end)
        except (OSError, CallcapError) as exc:
            rec.discard()
            self.recordings_failed += 1
            self._failed(rec.call_uid, exc)
            return
        doc = publication.doc
        self.log.info(
            "call_ended",
            call_uid=rec.call_uid,
            end_reason=doc["end_reason"],
            duration_s=doc["duration_s"],
        )
        if publication.writer is None and not publication.write_sidecar:
            if rec.audio_stopped is not None and rec.call.answer is not None:
                self.recordings_incomplete += 1  # (record_failed_calls off: no sidecar)
            return  # nothing to publish (a failed call)
        self._publisher.submit(publication)
        self._published(self._publisher.completed())

    def _audit_for(self, out_dir: Path) -> AuditLog:
        """The audit log of the archive a recording goes to (``recording.out_dir`` may have
        been reloaded since the call started: each archive keeps its own log)."""
        if out_dir == self.audit.out_dir:
            return self.audit
        return AuditLog(
            out_dir,
            file_mode=self.config.recording.file_mode,
            dir_mode=self.config.recording.dir_mode,
        )

    def _failed(self, call_uid: str, exc: Exception) -> None:
        self.log.error(
            "recording_failed", call_uid=call_uid, error=str(exc)[:500], exc_type=type(exc).__name__
        )

    def _published(self, outcomes: list[tuple[Entry, Result | Exception]]) -> None:
        """Log (and hand on) what the publisher finished, in the order calls ended."""
        for publication, result in outcomes:
            if isinstance(publication, AuditNote):
                problem = str(result)[:500] if isinstance(result, Exception) else None
                if isinstance(result, Noted):
                    problem = result.problem
                if problem is not None:
                    self.audit_failed += 1
                    self.log.error("audit_failed", call_uid=publication.call_uid, error=problem)
                continue
            if isinstance(result, Exception):
                if not isinstance(result, OSError | CallcapError):
                    self.internal_error(self.now, result)
                self.recordings_failed += 1
                self._failed(publication.call_uid, result)
                if is_disk_full(result):
                    self._disk_full(str(result))
                continue
            assert isinstance(result, tuple)
            outcome, audit_problem = result
            if audit_problem is not None:
                self.audit_failed += 1
                self.log.error("audit_failed", call_uid=outcome.call_uid, error=audit_problem)
            if any(w["code"] in _INCOMPLETE for w in outcome.document.get("warnings") or ()):
                self.recordings_incomplete += 1
            if outcome.wav is not None:
                self.recordings += 1
                self.log.info(
                    "recording_written",
                    call_uid=outcome.call_uid,
                    path=str(outcome.wav.path),
                    sidecar=str(outcome.sidecar),
                    bytes=outcome.wav.size,
                    sha256=outcome.wav.sha256,
                    duration_s=outcome.document["audio"]["duration_s"],
                )
            if self.on_published is not None:
                self.on_published(outcome)

    def settle(self) -> None:
        """Wait until every ended call's files are published (and logged)."""
        self._drain_all()
        self._published(self._publisher.completed(wait=True))

    # -- time -------------------------------------------------------------------------------

    def _evicted(self, call: Call, why: str) -> None:
        """A call ended to make room: counted and logged (rate-limited) as a drop."""
        reason = "pending_evicted" if why == "pending" else "call_evicted"
        self.drops.drop(
            reason,
            self.now if math.isfinite(self.now) else call.last_activity,
            detail=f"call {_short(call.call_id, 100)} ended to make room ({why} limit)",
        )

    def _capture_clock(self) -> float:
        return max(self.now, self._ticked)

    def _time_fault(self, ts: float, given: float) -> None:
        """A frame stamped far from its neighbours (a corrupt record header): it goes on at
        the capture clock, so that it neither moves every call's timeline nor is lost."""
        self.drops.drop(
            "capture_time_fault",
            given,
            detail=f"a frame stamped {ts!r} among frames at {given:.6f}: re-stamped at the latter",
        )
        self.warn_active(
            "capture_time_fault",
            "frames stamped far from every frame around them (corrupt capture times) were "
            "re-stamped at the capture clock while this call was in flight",
        )

    def _time_impossible(self, _ts: float) -> None:
        """A frame stamped before 1970 or after 2199, with no frame near it to borrow a time
        from (:class:`~callcap.capture.timeguard.TimeGuard`): dropped, counted."""
        self.drops.drop(
            "capture_time_impossible",
            self.now if math.isfinite(self.now) else 0.0,
            detail="a frame stamped outside 1970-2199, with no plausible time near it",
        )

    def _clock_step(self, step: ClockStep) -> None:
        """The capture clock jumped by more than a call may stay quiet, and frames keep
        coming at the new time: captures of different times joined, a host clock set.

        No call in flight can span the step.  Forwards, every call in flight is idle past
        its inactivity timeout at the new time: they end as ``timeout`` at their last
        packet, as the tick would end them — but before it, so that no tick writes the
        step as silence.  Backwards, they end as ``capture_end`` at the old clock, and the
        clock starts again at the new time.  Either way each sidecar says so.
        """
        self.counters["capture_clock_steps"] += 1
        active = len(self.recorders)
        (self.log.warning if active else self.log.info)(
            "capture_clock_step",
            from_ts=round(step.before, 6),
            to_ts=round(step.after, 6),
            step_s=round(step.seconds, 3),
            active_calls=active,
        )
        self.warn_active(
            "capture_clock_step",
            f"the capture clock stepped by {step.seconds:+.3f} s (from {step.before:.3f} to "
            f"{step.after:.3f}): the call ends where it did",
        )
        self._drain_all()
        for call_id, rec in self.recorders.items():
            if rec.last_rtp:
                self.tracker.touch(call_id, rec.last_rtp)
        if step.after > step.before:
            self._handle(self.tracker.expire(step.after))
            # what ended is placed and published at the tick of the new time
        else:
            self._handle(self.tracker.close_all("capture_end", step.before))
            self._drain_all()
            self.restart_clock()

    def tick(self, now: float) -> None:
        """Once per flush interval of capture time: write audio blocks, end idle calls.

        Ticks fall on whole multiples of the interval (the first packet of a capture ticks
        at once): where they fall among the packets then depends on the packets alone, not
        on when the clock started or on a quiet capture's ticks, so that a live capture and
        a file of the same wire are recorded alike.
        """
        interval = self._interval
        self._next_tick = (math.floor(now / interval) + 1) * interval
        self._ticked = max(self._ticked, now)
        self._drain_all()
        self._watch_disk()
        tracker = self.tracker
        for call_id, rec in self.recorders.items():
            if rec.last_rtp:
                tracker.touch(call_id, rec.last_rtp)
            try:
                rec.flush(now)
            except (OSError, CallcapError) as exc:  # disk full, permissions: this call only
                self.drops.drop(
                    "spool_write_failed", now, call_uid=rec.call_uid, detail=str(exc)[:300]
                )
                if is_disk_full(exc):
                    self._disk_full(str(exc))
        if self.recorders:
            # Durable mode: the spool survives a power cut within one interval.  Either way,
            # audio reaches the disk as it is written instead of all at once when calls end
            # (publishing fsyncs each file: it then waits for a second of audio, not a call).
            self._spool_sync.request(spool_dir(self.out_dir))
        self._handle(tracker.expire(now))
        if self._ending:
            self._drain_all()
        self._published(self._publisher.completed())
        self.decoder.expire(now)
        self.tcp.expire(now)
        if len(self._framers) > 4 * self.config.calls.max_active_calls:
            self._framers.clear()
            self.counters["tcp_framers_reset"] += 1

    def close(self, reason: str, ts: float | None = None) -> None:
        """End every open call (``capture_end`` / ``shutdown``) and publish what they hold."""
        when = ts if ts is not None else self.now
        if not math.isfinite(when):
            when = 0.0
        for block in self._guard.release():  # a live frame held back by the time guard
            self.lane.run_block(block)
        self._drain_all()
        for call_id, rec in list(self.recorders.items()):
            if rec.last_rtp:
                self.tracker.touch(call_id, rec.last_rtp)
        self._handle(self.tracker.close_all(reason, when))
        self.settle()
        self._publisher.shutdown()
        self._reserve.close()
        FREE_FILES.discard()
        self._spool_sync.close()
        self.drops.flush(when)

    def capture_loss(self, start: float, end: float, reason: str) -> None:
        """The capture lost frames between capture times ``start`` and ``end``: the gaps
        of calls in flight that fall inside are marked as the sensor's in their sidecars."""
        losses = self.losses
        losses.append((start, max(start, end), reason))
        if len(losses) > MAX_LOSS_SPANS or len(losses) % 64 == 0:
            # spans that ended before every call in flight began concern no call any more
            oldest = min((rec.call.start for rec in self.recorders.values()), default=end)
            losses[:] = [span for span in losses if span[1] >= oldest][-MAX_LOSS_SPANS:]

    def warn_active(self, code: str, detail: str) -> None:
        """Attach a warning to every call in flight (e.g. the capture file was cut short)."""
        for rec in self.recorders.values():
            rec.warn(code, detail)

    @property
    def next_tick(self) -> float:
        return self._next_tick

    def reconfigure(self, config: Config) -> None:
        """A reloaded config applies to calls starting from now on; calls in flight keep theirs
        (their settings and their output directory)."""
        self.config = config
        out_dir = Path(config.recording.out_dir)
        if out_dir != self.out_dir or config.storage.reserve.bytes != self._reserve.size:
            self._reserve.close()  # taken again, where it now belongs, at the next tick
            self.out_dir = out_dir
            self._reserve = self._new_reserve()
            self._reserve_failed = False
            self.disk_state = None
        self.audit = self._audit_for(self.out_dir)
        self._sip_ports = frozenset(config.capture.sip_ports)
        self._detect_any = config.capture.detect_sip_any_port
        self._interval = config.rtp.flush_interval_ms / 1000.0

    def restart_clock(self) -> None:
        """Capture time went backwards (the next file is older): start a fresh clock.

        Open calls were ended by the caller (``close``) first, so nothing is placed against
        the old clock.
        """
        self.now = -math.inf
        self._ticked = -math.inf
        self._next_tick = -math.inf

    def stats(self) -> PipelineStats:
        return PipelineStats(
            frames=self.frames,
            rtp_packets=self.rtp_packets,
            sip_messages=self.sip_messages,
            calls_started=self.calls_started,
            recordings=self.recordings,
            active_calls=len(self.recorders),
            drops=dict(self.drops.totals),
            recordings_failed=self.recordings_failed,
            recordings_incomplete=self.recordings_incomplete,
            audit_failed=self.audit_failed,
        )


_INCOMPLETE = frozenset({"disk_full", "disk_low", "audio_write_failed"})
"""Warning codes of a recording cut short or not made (:meth:`CallRecorder.stop_audio`)."""


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing parent (the output directory is made lazily)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _short(value: str | None, limit: int = 200) -> str | None:
    if value is None:
        return None
    text = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"
