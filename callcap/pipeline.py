"""The pipeline: frames in, recordings out.  The only place where capture, codecs and storage meet.

``feed`` is the hot path, called once per captured frame, for offline files and live sockets
alike.  Everything time-driven (flushing audio blocks, call inactivity, fragment and TCP state
expiry) runs from ``tick`` once per flush interval of *capture* time, so a pcap replays exactly
as it was captured, whatever the speed of the machine reading it.

A bad frame or message costs one counted, rate-limited ``packet_dropped`` event and nothing
else: errors never cross from one packet, or one call, into another.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from callcap.capture.decode import Datagram, PacketDecoder
from callcap.capture.dialog import (
    CallAnswered,
    CallEnded,
    CallStarted,
    CallTracker,
    DtmfSignalled,
    Event,
    MediaOffered,
)
from callcap.capture.media import MediaRouter, ip_text, pack_ip
from callcap.capture.rtp import parse_rtp
from callcap.capture.sip import SipMessage, SipStreamFramer, looks_like_sip
from callcap.capture.stream import place_runs
from callcap.capture.tcp import TcpReassembler
from callcap.config.schema import Config
from callcap.consent import ConsentDecision
from callcap.errors import CallcapError, ParseError
from callcap.logs import RateLimitedDrops
from callcap.recorder import CallRecorder, Publication, Published
from callcap.storage.audit import (
    CONSENT_DECIDED,
    PAUSE,
    RECORDING_DISCARDED,
    RECORDING_PUBLISHED,
    AuditLog,
    AuditWriter,
    FileRef,
)
from callcap.storage.layout import spool_dir
from callcap.storage.publish import BackgroundPublisher
from callcap.storage.spool import SpoolSync

UDP = 17
TCP = 6

_RTP_FIXED = struct.Struct("!HII")  # sequence, timestamp, SSRC (RFC 3550 §5.1)
_FAST_ETH_IP4 = b"\x08\x00\x45"  # Ethernet type IPv4, then version 4 with a 20-byte header


class _FastFlow:
    """A UDP flow already known to carry one call's RTP: Ethernet/IPv4 frames of it skip the
    general decoders.  Built by the general path on the first packet, dropped whenever
    media routes change, so it can never disagree with the router.

    Frames of the flow wait in ``frames``/``arrivals`` (at most one tick of capture time, or
    :data:`_MAX_RUN` frames) and are then decoded and placed as one run with numpy.
    """

    __slots__ = (
        "arrivals",
        "contexts",
        "dport",
        "dst",
        "frames",
        "recorder",
        "sender",
        "sport",
        "src",
    )

    def __init__(self, recorder: CallRecorder, sender: str, dg: Datagram) -> None:
        self.recorder = recorder
        self.sender = sender
        self.src = dg.src
        self.sport = dg.sport
        self.dst = dg.dst
        self.dport = dg.dport
        self.contexts: dict[int, Any] = {}
        self.frames: list[bytes] = []
        self.arrivals: list[float] = []


@dataclass(slots=True)
class _Run:
    """A fast-lane flow's queue, about to be placed as one run of one stream."""

    flow: _FastFlow
    arrivals: list[float]
    frames: list[bytes]
    ctx: Any
    pt: int
    end: int  # payload end offset in each frame
    decoder: Any


_MAX_RUN = 512

_RUN_ATTEMPTS = 4
"""Rounds of run placement per drain: a run broken by loss or reordering is split at the
break and its rest tried again, up to this many times; then the rest goes packet by packet."""


def _plain_rtp(b0: int, pt: int, end: int, ip_end: int, size: int) -> bool:
    """Does an Ethernet/IPv4/UDP frame of ``size`` bytes carry plain RTP the fast lane can
    take: version 2 with no padding, extension or CSRCs, a payload (the UDP length ``end``
    bounded by the IP length ``ip_end``, bounded by the frame), and no RTCP payload type
    (RFC 5761 multiplexing)?"""
    return b0 == 0x80 and _RTP_PAYLOAD_AT < end <= ip_end <= size and not 72 <= pt <= 76


def _break_of(run: _Run) -> int:
    """Index of the first frame of a turned-down run that does not continue the sequence
    (the stream's last packet, then each frame's predecessor); the whole run if none does."""
    expected = run.ctx.stream.next_seq
    for i, frame in enumerate(run.frames):
        seq = (frame[44] << 8) | frame[45]
        if seq != expected:
            return i
        expected = (seq + 1) & 0xFFFF
    return len(run.frames)


"""Frames a fast-lane flow queues before they are processed (bounds the memory of a flow
whose capture clock stalls, so that no tick comes)."""

# A run of equal-length Ethernet/IPv4(20 bytes)/UDP/RTP(12 bytes) frames of one flow: the
# bytes that must not change along it (IP total length, UDP length, RTP version/flags, SSRC),
# the first frame's fields, and the sequence number and timestamp read in place.
_RUN_FIXED_BYTES = np.array([16, 17, 38, 39, 42, 50, 51, 52, 53])
_RUN_HEADER_FIRST = struct.Struct("!H20xHxxBBHII")  # from frame byte 16
_RUN_HEADER = np.dtype(
    {"names": ["seq", "ts"], "formats": [">u2", ">u4"], "offsets": [2, 4], "itemsize": 12}
)
_RTP_PAYLOAD_AT = 54  # 14 Ethernet + 20 IPv4 + 8 UDP + 12 RTP


@dataclass(frozen=True, slots=True)
class PipelineStats:
    frames: int
    rtp_packets: int
    sip_messages: int
    calls_started: int
    recordings: int
    active_calls: int
    drops: dict[str, int]


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
    ) -> None:
        self.config = config
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
        )
        self.router = MediaRouter()
        self.recorders: dict[str, CallRecorder] = {}
        self.drops = RateLimitedDrops(logger, interval_s=config.logging.drop_log_interval_s)
        self.counters: Counter[str] = Counter()
        self._framers: dict[tuple[bytes, int, bytes, int], SipStreamFramer] = {}
        self._flows: dict[bytes, _FastFlow] = {}
        self._queued: list[_FastFlow] = []  # flows with frames waiting in the fast lane
        self._spool_sync = SpoolSync()
        self._tickets = 0  # publications submitted
        self._next_commit = 0  # the ticket whose turn it is to commit
        self._turn = threading.Condition()
        self._publisher: BackgroundPublisher[Publication, tuple[Published, str | None]] = (
            BackgroundPublisher()
        )
        self._sip_ports = frozenset(config.capture.sip_ports)
        self._detect_any = config.capture.detect_sip_any_port
        self._interval = config.rtp.flush_interval_ms / 1000.0
        self._next_tick = -math.inf
        self.now = -math.inf
        self.frames = 0
        self.bytes = 0
        self.rtp_packets = 0
        self.sip_messages = 0
        self.calls_started = 0
        self.recordings = 0
        self.sources: tuple[str, ...] = ()

    # -- the hot path -----------------------------------------------------------------------------

    def run(self, frames: Iterable[tuple[float, int, bytes]]) -> None:
        """Feed many frames: the same as ``feed`` for each, with a fast lane for known RTP.

        An Ethernet/IPv4/UDP frame (no IP options, not a fragment) whose addresses and ports
        are a flow the general path has already tied to a call is only queued on that flow
        (one slice as the dictionary key); the flow's queue is placed as a whole run before
        anything that could depend on it: a tick, a general-path packet of the same flow, a
        change of routes, the end of the call, and the end of ``run``.
        """
        flows = self._flows
        queued = self._queued
        feed = self.feed
        now = self.now
        next_tick = self._next_tick
        try:
            for ts, linktype, frame in frames:
                if linktype == 1 and ts < next_tick:
                    flow = flows.get(frame[26:38])
                    if (
                        flow is not None
                        and frame[12:15] == _FAST_ETH_IP4
                        and frame[23] == UDP
                        and not (frame[20] & 0x3F or frame[21])
                    ):
                        if ts > now:
                            now = ts
                        batch = flow.frames
                        if not batch:
                            queued.append(flow)
                        batch.append(frame)
                        flow.arrivals.append(ts)
                        if len(batch) >= _MAX_RUN:
                            self._drain(flow)
                        continue
                self.now = now
                feed(ts, linktype, frame)
                now = self.now
                next_tick = self._next_tick
        finally:
            if now > self.now:
                self.now = now
            self._drain_all()

    def _drain_all(self) -> None:
        queued = self._queued  # the very list ``run`` appends to
        if queued:
            flows = queued[:]
            queued.clear()
            self._drain_flows(flows)

    def _drain(self, flow: _FastFlow) -> None:
        if flow.frames:
            self._drain_flows([flow])

    def _drain_flows(self, flows: list[_FastFlow]) -> None:
        """Account, place and queue for writing every frame the fast lane holds for ``flows``.

        Flows whose queue is a clean run of one stream (equal-size plain RTP frames, one
        SSRC and payload type, audio of an anchored stream) are grouped by frame layout and
        placed together by :func:`place_runs`; every other frame, and every run it turns
        down, goes packet by packet.
        """
        groups: dict[tuple[int, int], list[_Run]] = {}
        single: list[tuple[_FastFlow, list[float], list[bytes]]] = []
        seen: set[int] = set()
        for flow in flows:
            frames = flow.frames
            if not frames or id(flow) in seen:
                continue
            seen.add(id(flow))
            arrivals = flow.arrivals
            flow.frames = []
            flow.arrivals = []
            self.frames += len(frames)
            self.bytes += sum(map(len, frames))
            run = self._run_of(flow, arrivals, frames)
            if run is None:
                single.append((flow, arrivals, frames))
            else:
                groups.setdefault((len(frames[0]), run.end), []).append(run)
        for flow, arrivals, frames in single:
            for ts, frame in zip(arrivals, frames, strict=True):
                self._fast_frame(flow, ts, frame)
        for attempt in range(_RUN_ATTEMPTS):
            retry: dict[tuple[int, int], list[_Run]] = {}
            for (size, end), runs in groups.items():
                try:
                    rejected = self._place_group(size, end, runs)
                except Exception as exc:  # noqa: BLE001 - isolate, then go packet by packet
                    self._internal_error(runs[0].arrivals[-1], exc)
                    rejected = runs
                for run in rejected:
                    # Up to the first packet that does not continue the sequence (loss,
                    # reordering, a duplicate) packet by packet; the rest is tried again.
                    cut = len(run.frames) if attempt == _RUN_ATTEMPTS - 1 else _break_of(run)
                    for ts, frame in zip(
                        run.arrivals[: cut + 1], run.frames[: cut + 1], strict=False
                    ):
                        self._fast_frame(run.flow, ts, frame)
                    if cut + 2 < len(run.frames):
                        rest = _Run(
                            run.flow,
                            run.arrivals[cut + 1 :],
                            run.frames[cut + 1 :],
                            run.ctx,
                            run.pt,
                            run.end,
                            run.decoder,
                        )
                        retry.setdefault((size, end), []).append(rest)
                    else:
                        for ts, frame in zip(
                            run.arrivals[cut + 1 :], run.frames[cut + 1 :], strict=True
                        ):
                            self._fast_frame(run.flow, ts, frame)
            if not retry:
                break
            groups = retry

    def _run_of(self, flow: _FastFlow, arrivals: list[float], frames: list[bytes]) -> _Run | None:
        """What a flow's queue would be as one run, judged on its first frame; None if it
        cannot be one (the rest is checked over the whole group in ``_place_group``)."""
        size = len(frames[0])
        if size <= _RTP_PAYLOAD_AT or len(set(map(len, frames))) != 1:
            return None
        ip_len, udp_len, b0, b1, _seq, _ts, ssrc = _RUN_HEADER_FIRST.unpack_from(frames[0], 16)
        end = 34 + udp_len
        pt = b1 & 0x7F
        if not _plain_rtp(b0, pt, end, 14 + ip_len, size):
            return None  # not plain RTP (RTCP-mux, CSRCs, padding…): the general path decides
        ctx = flow.contexts.get(ssrc)
        if ctx is None:
            return None  # a new stream starts packet by packet
        decoder = flow.recorder.audio_decoder(ctx, pt)
        if decoder is None:
            return None
        return _Run(flow, arrivals, frames, ctx, pt, end, decoder)

    def _place_group(self, size: int, end: int, runs: list[_Run]) -> list[_Run]:
        """Place runs of ``size``-byte frames with payload up to ``end``; the runs turned down."""
        frames = [frame for run in runs for frame in run.frames]
        arrivals = np.array([ts for run in runs for ts in run.arrivals], dtype=np.float64)
        lengths = np.array([len(run.frames) for run in runs], dtype=np.int64)
        starts = np.zeros(len(runs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        data = b"".join(frames)
        rows = np.frombuffer(data, dtype=np.uint8).reshape(len(frames), size)
        sid = np.repeat(np.arange(len(runs)), lengths)
        # IP and UDP lengths, RTP flags and SSRC as in the run's first frame; one payload type
        fixed = rows[:, _RUN_FIXED_BYTES]
        odd = (fixed != fixed[starts][sid]).any(axis=1)
        odd |= (rows[:, 43] & 0x7F) != np.array([run.pt for run in runs], dtype=np.uint8)[sid]
        usable = np.bincount(sid[odd], minlength=len(runs)) == 0
        hdr = np.ndarray((len(frames),), dtype=_RUN_HEADER, buffer=data, offset=42, strides=(size,))
        psize = end - _RTP_PAYLOAD_AT
        placed = place_runs(
            [run.ctx.stream for run in runs],
            starts,
            arrivals,
            hdr["seq"].astype(np.uint16),
            hdr["ts"].astype(np.uint32),
            [run.pt for run in runs],
            [psize] * len(runs),
            usable,
        )
        payload = rows[:, _RTP_PAYLOAD_AT:end].tobytes()
        rejected: list[_Run] = []
        for run, positions, first in zip(runs, placed, starts.tolist(), strict=True):
            if positions is None:
                rejected.append(run)
                continue
            n = len(run.frames)
            self.rtp_packets += n
            self.counters["rtp_placed_in_runs"] += n
            try:
                run.flow.recorder.queue_run(
                    run.ctx,
                    positions,
                    payload[first * psize : (first + n) * psize],
                    psize,
                    run.decoder,
                    run.arrivals[-1],
                )
            except Exception as exc:  # noqa: BLE001 - one call's bug stays in that call
                self._internal_error(run.arrivals[-1], exc)
        return rejected

    def _fast_frame(self, flow: _FastFlow, ts: float, frame: bytes) -> None:
        """One queued frame: straight to its stream if it is plain RTP, else the general path."""
        # the UDP length bounds the payload; the IP length bounds the UDP length
        end = 34 + ((frame[38] << 8) | frame[39])
        ip_end = 14 + ((frame[16] << 8) | frame[17])
        b0 = frame[42] if len(frame) > _RTP_PAYLOAD_AT else 0
        b1 = frame[43] if b0 else 0
        if not _plain_rtp(b0, b1 & 0x7F, end, ip_end, len(frame)):
            self.frames -= 1
            self.bytes -= len(frame)
            self.feed(ts, 1, frame)  # counts the frame again
            return
        seq, rts, ssrc = _RTP_FIXED.unpack_from(frame, 44)
        ctx = flow.contexts.get(ssrc)
        rec = flow.recorder
        try:
            if ctx is None:
                ctx = flow.contexts[ssrc] = rec.stream_for(
                    flow.sender, flow.src, flow.sport, flow.dst, flow.dport, ssrc, ts
                )
            self.rtp_packets += 1
            rec.push(ctx, ts, b1 & 0x7F, seq, rts, frame[_RTP_PAYLOAD_AT:end])
        except Exception as exc:  # noqa: BLE001 - as in feed: isolate one packet
            self._internal_error(ts, exc)

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
            if dg.proto == UDP:
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
            elif dg.proto == TCP:
                self._tcp(ts, dg)
        except ParseError as exc:
            self.drops.drop(exc.reason, ts, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - one packet's bug must not end every call
            self._internal_error(ts, exc)

    def _internal_error(self, ts: float, exc: Exception) -> None:
        """A bug met on one packet: count it, log it (rate-limited) and carry on."""
        self.drops.drop("internal_error", ts, detail=f"{type(exc).__name__}: {exc}"[:300])

    def _rtp(self, ts: float, call_id: str, sender: str, dg: Datagram) -> None:
        payload = dg.payload
        if len(payload) >= 2 and 72 <= (payload[1] & 0x7F) <= 76:
            self.counters["rtcp"] += 1  # RTCP multiplexed on the RTP port (RFC 5761)
            return
        recorder = self.recorders.get(call_id)
        if recorder is None:
            self.counters["rtp_for_ended_call"] += 1
            return
        pt, _marker, seq, rts, ssrc, _cc, body = parse_rtp(payload)
        key = None
        if len(dg.src) == 4:
            key = dg.src + dg.dst + dg.sport.to_bytes(2, "big") + dg.dport.to_bytes(2, "big")
            flow = self._flows.get(key)
            if flow is not None:
                self._drain(flow)  # its queued packets came first
        self.rtp_packets += 1
        recorder.on_rtp(ts, sender, dg.src, dg.sport, dg.dst, dg.dport, pt, seq, rts, ssrc, body)
        if key is not None and len(self._flows) < 4 * self.config.calls.max_active_calls:
            self._flows.setdefault(key, _FastFlow(recorder, sender, dg))

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
        for event in events:
            if isinstance(event, MediaOffered):
                self._media(event)
            elif isinstance(event, CallStarted):
                self._start(event)
            elif isinstance(event, CallAnswered):
                rec = self.recorders.get(event.call.call_id)
                self.log.info(
                    "call_answered",
                    call_uid=rec.call_uid if rec is not None else None,
                    call_id=_short(event.call.call_id),
                    ts=event.ts,
                )
                if rec is not None:
                    self._checkpoint(rec, event.ts)
                    rec.answered(event.ts)
            elif isinstance(event, DtmfSignalled):
                rec = self.recorders.get(event.call.call_id)
                if rec is not None:
                    rec.add_info_dtmf(event.side, event.digit, event.duration_ms, event.ts)
            elif isinstance(event, CallEnded):
                self._end(event)

    def _start(self, event: CallStarted) -> None:
        call = event.call
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
        )
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
        self._checkpoint(rec, event.ts)

    def _checkpoint(self, rec: CallRecorder, ts: float) -> None:
        """Save a call's facts to the spool (durable mode); a failure costs this call only."""
        try:
            rec.checkpoint(ts)
        except (OSError, CallcapError) as exc:
            self.drops.drop("spool_write_failed", ts, call_uid=rec.call_uid, detail=str(exc)[:300])

    def _consent_decided(self, rec: CallRecorder, decision: ConsentDecision) -> None:
        """Log a call's consent decision when it is made (the audit entry follows with the
        call's publication, under the archive lock)."""
        if decision.mode == "one_party":
            return
        self.log.info(
            "consent_decided",
            call_uid=rec.call_uid,
            status=decision.status,
            rule=decision.rule,
            method=decision.evidence.method if decision.evidence is not None else None,
            action=decision.action,
        )

    def _media(self, event: MediaOffered) -> None:
        call_id = event.call.call_id
        rec = self.recorders.get(call_id)
        if rec is None:
            return
        for flow in list(self._flows.values()):
            if flow.recorder is rec:
                self._drain(flow)  # placed under the media description they arrived with
        announced: set[tuple[bytes, int]] = set()
        for md in event.sdp.audio():
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
        self._forget_flows(
            lambda flow: (
                flow.recorder is rec
                or (flow.src, flow.sport) in announced
                or (flow.dst, flow.dport) in announced
            )
        )
        self._checkpoint(rec, event.ts)

    def _forget_flows(self, stale: Callable[[_FastFlow], bool]) -> None:
        """Drop fast-lane flows in place (``run`` holds a reference to this very dict), after
        placing the frames they hold."""
        flows = self._flows
        for key in [key for key, flow in flows.items() if stale(flow)]:
            self._drain(flows.pop(key))

    def _end(self, event: CallEnded) -> None:
        call = event.call
        rec = self.recorders.pop(call.call_id, None)
        if rec is not None:
            self._forget_flows(lambda flow: flow.recorder is rec)
        self.router.forget_call(call.call_id)
        if rec is None:
            return
        end = call.end if call.end is not None else event.ts
        try:
            publication = rec.prepare(end)
        except (OSError, CallcapError) as exc:
            rec.discard()
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
            return  # nothing to publish (a failed call)
        ticket = self._tickets
        self._tickets += 1
        self._publisher.submit(publication, lambda: self._publish(publication, ticket))
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

    def _publish(self, publication: Publication, ticket: int) -> tuple[Published, str | None]:
        """On a publisher thread: seal the files (beside other publications), then, in the
        order the calls ended, put them in place and log them to the audit log under the
        archive lock, so no sweep, erasure or verify ever sees a recording whose publication
        is not logged yet.  Without the lock the audio is still published (losing a call over
        a log line would be worse); the second value is then what went wrong with the log."""
        staging_failed: BaseException | None = None
        try:
            publication.stage()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after our turn
            staging_failed = exc
        with self._commit_turn(ticket), contextlib.ExitStack() as stack:
            if staging_failed is not None:
                raise staging_failed
            audit: AuditWriter | None = None
            problem: str | None = None
            try:
                audit = stack.enter_context(self._audit_for(publication.out_dir).locked())
            except (OSError, CallcapError) as exc:
                problem = str(exc)[:500]
            published = publication.commit()
            if audit is not None:
                problem = self._audit_published(audit, published)
            return published, problem

    @contextlib.contextmanager
    def _commit_turn(self, ticket: int) -> Iterator[None]:
        """Publications commit one at a time in ticket (call-end) order, whatever order
        their staging finished in; a failed one still passes the turn on."""
        turn = self._turn
        with turn:
            while self._next_commit != ticket:
                turn.wait()
        try:
            yield
        finally:
            with turn:
                self._next_commit += 1
                turn.notify_all()

    def _failed(self, call_uid: str, exc: Exception) -> None:
        self.log.error(
            "recording_failed", call_uid=call_uid, error=str(exc)[:500], exc_type=type(exc).__name__
        )

    def _published(
        self, outcomes: list[tuple[Publication, tuple[Published, str | None] | Exception]]
    ) -> None:
        """Log (and hand on) what the publisher finished, in the order calls ended."""
        for publication, result in outcomes:
            if isinstance(result, Exception):
                if not isinstance(result, OSError | CallcapError):
                    self._internal_error(self.now, result)
                self._failed(publication.call_uid, result)
                continue
            outcome, audit_problem = result
            if audit_problem is not None:
                self.log.error("audit_failed", call_uid=outcome.call_uid, error=audit_problem)
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
        self._published(self._publisher.completed(wait=True))

    def _audit_published(self, log: AuditWriter, published: Published) -> str | None:
        """Log what reached the archive, with its hashes, once the sidecar is in place.

        A failed append leaves the recording published and is reported (the error text is
        returned); ``callcap verify`` then reports its files as added.
        """
        if published.sidecar is None:
            return None
        event = RECORDING_PUBLISHED if published.wav is not None else RECORDING_DISCARDED
        files: dict[str, FileRef] = {}
        if published.wav is not None:
            files["wav"] = log.ref(published.wav.path, published.wav.sha256)
        files["sidecar"] = log.ref(published.sidecar, published.sidecar_sha256)
        doc = published.document
        consent = doc["consent"]
        try:
            if consent["mode"] == "all_party":
                evidence = consent["evidence"]
                log.append(
                    CONSENT_DECIDED,
                    {
                        "call_uid": published.call_uid,
                        "rule": consent["rule"],
                        "status": consent["status"],
                        "method": evidence["method"] if evidence is not None else None,
                        "action": consent["action"],
                    },
                )
            for pause in doc.get("pauses") or ():
                # PCI pauses: when the recording was silenced and what asked for it
                log.append(
                    PAUSE,
                    {
                        "call_uid": published.call_uid,
                        "from_s": pause["from_s"],
                        "to_s": pause["to_s"],
                        "by": pause["by"],
                    },
                )
            log.append(
                event,
                {
                    "call_uid": published.call_uid,
                    "end_reason": doc["end_reason"],
                    "consent_status": doc["consent"]["status"],
                    "delete_after": doc["retention"]["delete_after"],
                },
                files,
            )
        except (OSError, CallcapError) as exc:
            return str(exc)[:500]
        return None

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Once per flush interval of capture time: write audio blocks, end idle calls."""
        self._next_tick = now + self._interval
        self._drain_all()
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
        if self.durable and self.recorders:
            self._spool_sync.request(spool_dir(self.out_dir))
        self._handle(tracker.expire(now))
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
        for call_id, rec in list(self.recorders.items()):
            if rec.last_rtp:
                self.tracker.touch(call_id, rec.last_rtp)
        self._handle(self.tracker.close_all(reason, when))
        self.settle()
        self._publisher.shutdown()
        self._spool_sync.close()
        self.drops.flush(when)

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
        self.out_dir = Path(config.recording.out_dir)
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
        )


def _short(value: str | None, limit: int = 200) -> str | None:
    if value is None:
        return None
    text = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"
