"""The pipeline: frames in, recordings out.  The only place where capture, codecs and storage meet.

``feed`` is the hot path, called once per captured frame, for offline files and live sockets
alike.  Everything time-driven (flushing audio blocks, call inactivity, fragment and TCP state
expiry) runs from ``tick`` once per flush interval of *capture* time, so a pcap replays exactly
as it was captured, whatever the speed of the machine reading it.

A bad frame or message costs one counted, rate-limited ``packet_dropped`` event and nothing
else: errors never cross from one packet, or one call, into another.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from callcap.capture.tcp import TcpReassembler
from callcap.config.schema import Config
from callcap.errors import CallcapError, ParseError
from callcap.logs import RateLimitedDrops
from callcap.recorder import CallRecorder, Published

UDP = 17
TCP = 6

_RTP_FIXED = struct.Struct("!HII")  # sequence, timestamp, SSRC (RFC 3550 §5.1)
_FAST_ETH_IP4 = b"\x08\x00\x45"  # Ethernet type IPv4, then version 4 with a 20-byte header


class _FastFlow:
    """A UDP flow already known to carry one call's RTP: Ethernet/IPv4 frames of it skip the
    general decoders.  Built by the general path on the first packet, dropped whenever
    media routes change, so it can never disagree with the router."""

    __slots__ = ("contexts", "dport", "dst", "recorder", "sender", "sport", "src")

    def __init__(self, recorder: CallRecorder, sender: str, dg: Datagram) -> None:
        self.recorder = recorder
        self.sender = sender
        self.src = dg.src
        self.sport = dg.sport
        self.dst = dg.dst
        self.dport = dg.dport
        self.contexts: dict[int, Any] = {}


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
        are a flow the general path has already tied to a call goes straight to that call's
        stream: one slice as the dictionary key, one header unpack.  Anything else, and any
        frame due to trigger a tick, takes ``feed``.
        """
        flows = self._flows
        feed = self.feed
        unpack_rtp = _RTP_FIXED.unpack_from
        frames_n = 0
        bytes_n = 0
        now = self.now
        for ts, linktype, frame in frames:
            if (
                linktype == 1
                and ts < self._next_tick
                and frame[12:15] == _FAST_ETH_IP4
                and frame[23] == UDP
                and not (frame[20] & 0x3F or frame[21])
            ):
                flow = flows.get(frame[26:38])
                if flow is not None:
                    # the UDP length bounds the payload; the IP length bounds the UDP length
                    end = 34 + ((frame[38] << 8) | frame[39])
                    ip_end = 14 + ((frame[16] << 8) | frame[17])
                    b0 = frame[42] if len(frame) > 54 else 0
                    b1 = frame[43] if b0 else 0
                    if (
                        b0 == 0x80
                        and 54 < end <= ip_end <= len(frame)
                        and not 72 <= (b1 & 0x7F) <= 76
                    ):
                        frames_n += 1
                        bytes_n += len(frame)
                        if ts > now:
                            now = self.now = ts
                        seq, rts, ssrc = unpack_rtp(frame, 44)
                        ctx = flow.contexts.get(ssrc)
                        rec = flow.recorder
                        if ctx is None:
                            ctx = flow.contexts[ssrc] = rec.stream_for(
                                flow.sender, flow.src, flow.sport, flow.dst, flow.dport, ssrc, ts
                            )
                        self.rtp_packets += 1
                        try:
                            rec.push(ctx, ts, b1 & 0x7F, seq, rts, frame[54:end])
                        except Exception as exc:  # noqa: BLE001 - as in feed: isolate one packet
                            self._internal_error(ts, exc)
                        continue
            feed(ts, linktype, frame)
            now = self.now
        self.frames += frames_n
        self.bytes += bytes_n

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
        self.rtp_packets += 1
        recorder.on_rtp(ts, sender, dg.src, dg.sport, dg.dst, dg.dport, pt, seq, rts, ssrc, body)
        if len(dg.src) == 4 and len(self._flows) < 4 * self.config.calls.max_active_calls:
            key = dg.src + dg.dst + dg.sport.to_bytes(2, "big") + dg.dport.to_bytes(2, "big")
            self._flows[key] = _FastFlow(recorder, sender, dg)

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
            call, self.config, self.out_dir, durable=self.durable, sources=self.sources
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

    def _media(self, event: MediaOffered) -> None:
        call_id = event.call.call_id
        rec = self.recorders.get(call_id)
        if rec is None:
            return
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
        """Drop fast-lane flows in place (``run`` holds a reference to this very dict)."""
        flows = self._flows
        for key in [key for key, flow in flows.items() if stale(flow)]:
            del flows[key]

    def _end(self, event: CallEnded) -> None:
        call = event.call
        rec = self.recorders.pop(call.call_id, None)
        self.router.forget_call(call.call_id)
        if rec is not None:
            self._forget_flows(lambda flow: flow.recorder is rec)
        if rec is None:
            return
        end = call.end if call.end is not None else event.ts
        try:
            published = rec.finish(end)
        except (OSError, CallcapError) as exc:
            rec.discard()
            self.log.error(
                "recording_failed",
                call_uid=rec.call_uid,
                error=str(exc)[:500],
                exc_type=type(exc).__name__,
            )
            return
        doc = published.document
        self.log.info(
            "call_ended",
            call_uid=rec.call_uid,
            end_reason=doc["end_reason"],
            duration_s=doc["duration_s"],
        )
        if published.wav is not None:
            self.recordings += 1
            self.log.info(
                "recording_written",
                call_uid=rec.call_uid,
                path=str(published.wav.path),
                sidecar=str(published.sidecar),
                bytes=published.wav.size,
                sha256=published.wav.sha256,
                duration_s=doc["audio"]["duration_s"],
            )
        if self.on_published is not None:
            self.on_published(published)

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Once per flush interval of capture time: write audio blocks, end idle calls."""
        self._next_tick = now + self._interval
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
        self._handle(tracker.expire(now))
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
