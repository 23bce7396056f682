"""One call's recording: RTP streams in, a stereo WAV streamed to the spool, a sidecar out.

Packets are placed on the call timeline by :class:`~callcap.capture.stream.RtpStream` and wait
in a per-channel queue as raw payloads until the flush horizon (capture time minus the jitter
window) passes them; then a whole block is decoded in one vectorised table lookup, scattered
to its sample positions and appended to the WAV.  Memory per call is therefore bounded by the
jitter window plus one flush interval, whatever the call's length, and audio reaches the disk
block by block as the call runs.

Sample ``k`` of both channels is capture time ``origin + k / 8000``: silence fills whatever no
packet covered (loss, late packets, a side that is on hold or not yet talking), and every such
hole caused by loss or lateness is listed in the sidecar's ``gaps``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from callcap import __version__
from callcap.capture.dialog import Call
from callcap.capture.media import endpoint_text, ip_text, other_side
from callcap.capture.sdp import STATIC_PAYLOAD_TYPES, MediaDescription, RtpMap
from callcap.capture.stream import TIMELINE_RATE, RtpStream
from callcap.codecs.dtmf import DtmfDigit, EventTracker
from callcap.codecs.g711 import DECODERS
from callcap.config.schema import Config
from callcap.storage.layout import ensure_dir, make_call_uid, recording_stem, unique_stem
from callcap.storage.publish import PublishedFile, publish_file, write_json_atomic
from callcap.storage.sidecar import SCHEMA_VERSION, clean_text, iso_utc
from callcap.storage.spool import CallFacts, audio_path, facts_path, remove_entry, save_facts
from callcap.storage.wav import WavWriter

Decoder = Callable[[bytes], npt.NDArray[np.int16]]

CHANNELS = ("caller", "callee")
MAX_GAPS = 1000
MAX_DTMF = 1000
MAX_WARNINGS = 100


class PayloadKind:
    AUDIO = "audio"
    EVENT = "event"
    COMFORT_NOISE = "cn"
    UNSUPPORTED = "unsupported"
    ENCRYPTED = "encrypted"


@dataclass(slots=True)
class _StreamContext:
    stream: RtpStream
    kinds: dict[int, tuple[str, str | None, Decoder | None]] = field(default_factory=dict)
    events: EventTracker | None = None
    late: int = 0
    decoded: bool = False
    encrypted: bool = False
    codec: str | None = None
    pending: list[tuple[int, bytes, Decoder]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Published:
    """What a finished call left on disk (``wav`` is None when no audio was kept)."""

    call_uid: str
    sidecar: Path | None
    wav: PublishedFile | None
    document: dict[str, Any]


class CallRecorder:
    """Streams one call's audio to a spool file and publishes WAV + sidecar when it ends."""

    def __init__(
        self,
        call: Call,
        config: Config,
        out_dir: Path,
        *,
        durable: bool = False,
        sources: tuple[str, ...] = (),
    ) -> None:
        self.call = call
        self.config = config
        self.out_dir = out_dir
        self.durable = durable
        self.sources = sources
        self.call_uid = make_call_uid(call.call_id, call.from_.tag, call.start)
        self._pid = os.getpid()
        self.origin: float | None = None
        self.last_rtp = 0.0
        self.written = 0
        self._writer: WavWriter | None = None
        self._part: Path | None = None
        self._pending: tuple[list[tuple[int, bytes, Decoder]], list[tuple[int, bytes, Decoder]]] = (
            [],
            [],
        )
        self._carry: npt.NDArray[np.int16] | None = None
        self._jitter = config.rtp.jitter_window_ms * TIMELINE_RATE // 1000
        self.streams: dict[tuple[bytes, int, bytes, int, int], _StreamContext] = {}
        self.media: dict[str, MediaDescription] = {}
        self.encrypted_sides: set[str] = set()
        self.gaps: list[tuple[str, int, int]] = []
        self.gaps_omitted = 0
        self.dtmf: list[dict[str, Any]] = []
        self.warnings: list[dict[str, str]] = []
        self._warned: set[str] = set()

    # -- signalling input ---------------------------------------------------------------------

    def set_media(self, side: str, media: MediaDescription) -> None:
        """The latest SDP media line a side announced (its receive address and payload map)."""
        self.media[side] = media
        if media.encrypted:
            self.encrypted_sides.add(side)
            self.warn(
                "encrypted_media", f"{side} announced {media.proto}: SRTP audio is not decodable"
            )

    def add_info_dtmf(self, side: str, digit: str, duration_ms: int | None, ts: float) -> None:
        at = None if self.origin is None else round(ts - self.origin, 3)
        self._add_dtmf(digit, side, "sip_info", at, duration_ms)

    def warn(self, code: str, detail: str) -> None:
        key = f"{code}\x00{detail}"
        if key in self._warned or len(self.warnings) >= MAX_WARNINGS:
            return
        self._warned.add(key)
        self.warnings.append({"code": code, "detail": clean_text(detail, 512) or ""})

    # -- media input (hot path) -------------------------------------------------------------

    def on_rtp(
        self,
        arrival: float,
        sender: str,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        pt: int,
        seq: int,
        ts: int,
        ssrc: int,
        payload: bytes,
    ) -> None:
        """One RTP packet of this call (the general entry; the pipeline's fast path caches
        :meth:`stream_for` per flow and calls :meth:`push` directly)."""
        self.push(
            self.stream_for(sender, src, sport, dst, dport, ssrc, arrival),
            arrival,
            pt,
            seq,
            ts,
            payload,
        )

    def stream_for(
        self, sender: str, src: bytes, sport: int, dst: bytes, dport: int, ssrc: int, arrival: float
    ) -> _StreamContext:
        key = (src, sport, dst, dport, ssrc)
        ctx = self.streams.get(key)
        if ctx is None:
            ctx = self._new_stream(key, sender, arrival)
        return ctx

    def push(
        self, ctx: _StreamContext, arrival: float, pt: int, seq: int, ts: int, payload: bytes
    ) -> None:
        kind = ctx.kinds.get(pt)
        if kind is None:
            kind = ctx.kinds[pt] = self._classify(ctx.stream.side, pt, ctx)
        self.last_rtp = arrival
        what = kind[0]
        stream = ctx.stream
        if what is PayloadKind.AUDIO:
            pos = stream.push(arrival, seq, ts, pt, len(payload))
            if pos is None:
                return
            if pos < self.written:
                ctx.late += 1
                self._gap(stream.side, pos, pos + len(payload))
                return
            ctx.pending.append((pos, payload, kind[2]))  # type: ignore[arg-type]
        elif what is PayloadKind.EVENT:
            if stream.push(arrival, seq, ts, pt, 0, timing=False) is None:
                return
            assert ctx.events is not None
            for digit in ctx.events.feed(ts, payload):
                self._event_digit(ctx, digit)
        else:
            # Comfort noise stands for silence (RFC 3389); unsupported and encrypted payloads
            # are counted but never decoded into noise.
            stream.push(arrival, seq, ts, pt, 0)

    # -- time -----------------------------------------------------------------------------------

    def flush(self, now: float) -> None:
        """Write every sample older than the jitter window to the spool file."""
        if self.origin is None:
            return
        for ctx in self.streams.values():
            ctx.stream.end_window()
            self._collect_gaps(ctx)
        horizon = int((now - self.origin) * TIMELINE_RATE) - self._jitter
        wrote = horizon > self.written
        if wrote:
            self._write_until(horizon)
        # Facts first, then the header that commits the audio: a crash between the two
        # leaves facts that end after the committed audio, never before it.
        self.checkpoint(now)
        if wrote and self.durable and self._writer is not None:
            self._writer.flush()

    def checkpoint(self, now: float) -> None:
        """Durable mode: save the call's facts beside its spool audio (crash recovery).

        Called when the call starts, answers or changes media and at every flush (before the
        WAV header is committed), so the facts on disk always cover at least the audio the
        spool file's header promises.  The recovered sidecar ends at ``now``, with
        ``end_reason: "recovered"``.
        """
        if not self.durable:
            return
        doc = self._sidecar(None, "WAV", self.written, "", end=now, end_reason="recovered")
        facts = CallFacts(self.call_uid, self.call.start, now, doc)
        save_facts(
            facts_path(self.out_dir, self.call_uid, self._pid),
            facts,
            file_mode=self.config.recording.file_mode,
            dir_mode=self.config.recording.dir_mode,
        )

    def finish(self, end: float) -> Published:
        """Drain everything, close the spool file and publish (or discard) the recording."""
        call = self.call
        for ctx in self.streams.values():
            ctx.stream.finish()
            self._collect_gaps(ctx)
            if ctx.events is not None:
                for digit in ctx.events.flush():
                    self._event_digit(ctx, digit)
        if self.origin is not None:
            last = max(
                (pos + len(payload) for pending in self._pending for pos, payload, _ in pending),
                default=0,
            )
            horizon = max(round((end - self.origin) * TIMELINE_RATE), last, self.written)
            if self._carry is not None:
                horizon = max(horizon, self.written + len(self._carry))
            self._write_until(horizon)
        keep_audio = call.answer is not None
        wav: PublishedFile | None = None
        stem = recording_stem(self.out_dir, call.start, self.call_uid)
        stem = unique_stem(stem)
        if keep_audio:
            part = self._ensure_writer() if self._writer is None else self._part
            assert part is not None
            assert self._writer is not None
            self._writer.close()
            audio_format = self._writer.format
            frames = self._writer.frames
            wav = publish_file(
                part,
                stem.with_suffix(".wav"),
                file_mode=self.config.recording.file_mode,
                dir_mode=self.config.recording.dir_mode,
            )
            if self.origin is None:
                self.warn("no_media", "the call was answered but no RTP of it was captured")
        else:
            self.discard()
            audio_format, frames = "WAV", 0
        doc = self._sidecar(wav, audio_format, frames, stem.with_suffix(".wav").name)
        sidecar: Path | None = None
        if keep_audio or self.config.recording.record_failed_calls:
            published = write_json_atomic(
                stem.with_suffix(".json"),
                doc,
                file_mode=self.config.recording.file_mode,
                dir_mode=self.config.recording.dir_mode,
            )
            sidecar = published.path
        if self.durable:
            remove_entry(self.out_dir, self.call_uid, self._pid)
        return Published(self.call_uid, sidecar, wav, doc)

    def discard(self) -> None:
        """Drop the spool file (failed call, or audio that must not be kept)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._part is not None:
            with contextlib.suppress(FileNotFoundError):
                self._part.unlink()
            self._part = None
        if self.durable:
            remove_entry(self.out_dir, self.call_uid, self._pid)

    # -- internals ------------------------------------------------------------------------------

    def _new_stream(
        self, key: tuple[bytes, int, bytes, int, int], sender: str, arrival: float
    ) -> _StreamContext:
        if self.origin is None:
            self.origin = arrival
            self._ensure_writer()
        src, sport, dst, dport, ssrc = key
        stream = RtpStream(
            src=(ip_text(src), sport),
            dst=(ip_text(dst), dport),
            ssrc=ssrc,
            side=sender,
            origin=self.origin,
        )
        ctx = _StreamContext(stream, pending=self._pending[0 if sender == "caller" else 1])
        self.streams[key] = ctx
        return ctx

    def _classify(
        self, sender: str, pt: int, ctx: _StreamContext
    ) -> tuple[str, str | None, Decoder | None]:
        """What a payload type means here: the receiver's SDP first (RFC 3264 §5.1)."""
        rtpmap: RtpMap | None = None
        for side in (other_side(sender), sender):
            md = self.media.get(side)
            if md is not None:
                rtpmap = md.codec(pt)
                if rtpmap is not None:
                    break
        if rtpmap is None:
            rtpmap = STATIC_PAYLOAD_TYPES.get(pt)
        name = rtpmap.encoding.upper() if rtpmap is not None else f"PT{pt}"
        if rtpmap is not None and rtpmap.clock_rate and name != "TELEPHONE-EVENT":
            ctx.stream.set_clock_rate(rtpmap.clock_rate)
        if self.encrypted_sides:
            ctx.encrypted = True
            if ctx.codec is None:
                ctx.codec = name
            return (PayloadKind.ENCRYPTED, name, None)
        if name == "TELEPHONE-EVENT":
            if ctx.events is None:
                ctx.events = EventTracker()
            return (PayloadKind.EVENT, name, None)
        if name == "CN":
            return (PayloadKind.COMFORT_NOISE, name, None)
        decoder = DECODERS.get(name)
        if decoder is not None and (rtpmap is None or rtpmap.clock_rate in (0, TIMELINE_RATE)):
            ctx.decoded = True
            ctx.codec = ctx.codec or name
            return (PayloadKind.AUDIO, name, decoder)
        ctx.codec = ctx.codec or name
        self.warn(
            "unsupported_codec",
            f"{name} (payload type {pt}) from the {sender} is not decoded: "
            "that channel holds silence for this stream",
        )
        return (PayloadKind.UNSUPPORTED, name, None)

    def _event_digit(self, ctx: _StreamContext, digit: DtmfDigit) -> None:
        pos = ctx.stream.position(digit.start_ts)
        at = None if pos is None else round(pos / TIMELINE_RATE, 3)
        duration = round(digit.duration * 1000 / (ctx.stream.clock_rate or TIMELINE_RATE))
        self._add_dtmf(digit.digit, ctx.stream.side, "rfc4733", at, duration)

    def _add_dtmf(
        self, digit: str, side: str, source: str, at: float | None, duration_ms: int | None
    ) -> None:
        if len(self.dtmf) >= MAX_DTMF:
            self.warn("dtmf_omitted", f"more than {MAX_DTMF} DTMF digits; the rest are not listed")
            return
        self.dtmf.append(
            {"digit": digit, "side": side, "source": source, "at_s": at, "duration_ms": duration_ms}
        )

    def _gap(self, side: str, start: int, end: int) -> None:
        if end <= start:
            return
        if len(self.gaps) >= MAX_GAPS:
            self.gaps_omitted += 1
            return
        self.gaps.append((side, max(0, start), end))

    def _collect_gaps(self, ctx: _StreamContext) -> None:
        closed = ctx.stream.closed_gaps
        if closed:
            if ctx.decoded:
                for gap in closed:
                    self._gap(ctx.stream.side, gap.from_pos, gap.to_pos)
            closed.clear()

    def _ensure_writer(self) -> Path:
        if self._writer is None:
            self._part = audio_path(self.out_dir, self.call_uid, self._pid)
            ensure_dir(self._part.parent, self.config.recording.dir_mode)
            self._writer = WavWriter(self._part, sample_rate=TIMELINE_RATE, channels=2)
        assert self._part is not None
        return self._part

    def _write_until(self, horizon: int) -> None:
        """Decode and write samples ``[written, horizon)``; later samples stay queued."""
        start = self.written
        n = horizon - start
        if n <= 0:
            return
        carry = self._carry
        length = max(n, 0 if carry is None else len(carry))
        placed: list[tuple[int, list[_Placed]]] = []
        for ch in (0, 1):
            pending = self._pending[ch]
            if not pending:
                continue
            taken = [item for item in pending if item[0] < horizon]
            if not taken:
                continue
            pending[:] = [item for item in pending if item[0] >= horizon]
            groups = _decode_groups(taken, start)
            for _decoder, index, _samples in groups:
                if isinstance(index, slice):
                    length = max(length, index.stop)
                elif len(index):
                    length = max(length, int(index.max()) + 1)
            placed.append((ch, groups))
        block = np.zeros((length, 2), dtype=np.int16)
        if carry is not None:
            block[: len(carry)] = carry
        for ch, groups in placed:
            for _decoder, index, samples in groups:
                block[index, ch] = samples
        writer = self._writer
        assert writer is not None
        writer.write(block[:n])
        self._carry = block[n:].copy() if length > n else None
        self.written = horizon

    def _sidecar(
        self,
        wav: PublishedFile | None,
        audio_format: str,
        frames: int,
        file_name: str,
        *,
        end: float | None = None,
        end_reason: str | None = None,
    ) -> dict[str, Any]:
        """The sidecar document; with ``end`` given (a spool checkpoint) the ``audio`` object
        is filled as far as it is known before the file is published."""
        call = self.call
        checkpoint = end is not None
        if end is None:
            end = call.end if call.end is not None else call.last_activity
        cfg = self.config
        consent_mode = cfg.consent.default.mode
        keep = cfg.retention.default.keep
        audio: dict[str, Any] | None = None
        if wav is not None or checkpoint:
            audio = {
                "file": file_name,
                "format": audio_format,
                "encoding": "PCM_16",
                "sample_rate": TIMELINE_RATE,
                "channels": list(CHANNELS),
                "frames": frames,
                "duration_s": round(frames / TIMELINE_RATE, 3),
                "start": iso_utc(
                    self.origin if self.origin is not None else (call.answer or call.start)
                ),
                "sha256": wav.sha256 if wav is not None else "",
                "bytes": wav.size if wav is not None else 0,
            }
        streams = [
            self._stream_doc(ctx)
            for ctx in sorted(self.streams.values(), key=lambda c: c.stream.first_arrival)
            if ctx.stream.stats.packets
        ]
        gaps = [
            {
                "side": side,
                "from_s": round(a / TIMELINE_RATE, 3),
                "to_s": round(b / TIMELINE_RATE, 3),
            }
            for side, a, b in _merge_gaps(self.gaps)
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "call_uid": self.call_uid,
            "call_id": clean_text(call.call_id, 512),
            "from": _party(call.from_),
            "to": _party(call.to),
            "caller_ip": call.caller_ip,
            "callee_ip": call.callee_ip,
            "start": iso_utc(call.start),
            "answer": iso_utc(call.answer) if call.answer is not None else None,
            "end": iso_utc(end),
            "duration_s": round(max(0.0, end - call.start), 3),
            "talk_s": round(max(0.0, end - call.answer), 3) if call.answer is not None else None,
            "end_reason": end_reason or call.end_reason or "capture_end",
            "final_status": call.final_status,
            "transport": call.transport,
            "user_agents": [
                {"side": side, "value": clean_text(value, 256)} for side, value in call.user_agents
            ],
            "audio": audio,
            "streams": streams,
            "gaps": gaps,
            "gaps_omitted": self.gaps_omitted,
            "dtmf": self.dtmf,
            "consent": {
                "mode": consent_mode,
                "rule": None,
                "status": "not_required" if consent_mode == "one_party" else "missing",
                "evidence": None,
                "action": "kept" if consent_mode == "one_party" else "flagged",
            },
            "retention": {
                "rule": None,
                "keep": keep.text,
                "delete_after": iso_utc(end + keep.seconds),
                "legal_hold": False,
            },
            "warnings": list(self.warnings),
            "recorder": {"name": "callcap", "version": __version__},
        }

    def _stream_doc(self, ctx: _StreamContext) -> dict[str, Any]:
        s = ctx.stream
        st = s.stats
        media_pts = {
            pt: n
            for pt, n in st.payload_types.items()
            if pt in ctx.kinds
            and ctx.kinds[pt][0] not in (PayloadKind.EVENT, PayloadKind.COMFORT_NOISE)
        } or st.payload_types
        main_pt = max(media_pts.items(), key=lambda kv: kv[1])[0] if media_pts else 0
        src_ip, sport = s.src
        dst_ip, dport = s.dst
        return {
            "side": s.side,
            "src": endpoint_text(src_ip, sport),
            "dst": endpoint_text(dst_ip, dport),
            "ssrc": f"0x{s.ssrc:08X}",
            "payload_type": main_pt,
            "payload_types": {str(pt): n for pt, n in sorted(st.payload_types.items())},
            "codec": ctx.codec,
            "decoded": ctx.decoded and not ctx.encrypted,
            "encrypted": ctx.encrypted,
            "packets": st.packets,
            "lost": s.lost,
            "duplicates": st.duplicates,
            "reordered": st.reordered,
            "late": ctx.late,
            "jitter_ms": round(s.jitter_ms, 3),
            "jitter_mean_ms": round(s.jitter_mean_ms, 3),
            "first": iso_utc(s.first_arrival),
            "last": iso_utc(s.last_arrival),
        }


_Placed = tuple[Decoder, "npt.NDArray[np.int64] | slice", "npt.NDArray[np.int16]"]


def _decode_groups(items: list[tuple[int, bytes, Decoder]], start: int) -> list[_Placed]:
    """Decode queued payloads in one table lookup per codec → (sample indices, samples).

    Indices are relative to ``start`` (the first unwritten sample); samples that would land
    before it (a packet straddling the last flush) are dropped.  Equal-length payloads — the
    usual 20 ms packets — take a reshape instead of a repeat.
    """
    positions, payloads, decoders = zip(*items, strict=True)
    first = decoders[0]
    if decoders.count(first) == len(decoders):
        grouped = [(first, positions, payloads)]
    else:
        by_decoder: dict[Decoder, tuple[list[int], list[bytes]]] = {}
        for pos, payload, decoder in items:
            entry = by_decoder.setdefault(decoder, ([], []))
            entry[0].append(pos)
            entry[1].append(payload)
        grouped = [(d, tuple(p), tuple(b)) for d, (p, b) in by_decoder.items()]
    out: list[_Placed] = []
    for decoder, pos_t, pay_t in grouped:
        data = b"".join(pay_t)
        samples = decoder(data)
        size = len(pay_t[0])
        first_pos, last_pos = pos_t[0] - start, pos_t[-1] - start
        uniform = size and len(data) == size * len(pay_t)
        if uniform and first_pos >= 0 and last_pos - first_pos == size * (len(pay_t) - 1):
            rel = np.array(pos_t, dtype=np.int64)
            if len(rel) < 2 or bool((rel[1:] - rel[:-1] == size).all()):
                # back-to-back packets in order (the usual case): one slice, no index array
                out.append((decoder, slice(first_pos, first_pos + len(data)), samples))
                continue
        rel = np.array(pos_t, dtype=np.int64) - start
        if uniform:
            index = (rel[:, None] + np.arange(size, dtype=np.int64)).ravel()
        else:
            lens = np.fromiter(map(len, pay_t), dtype=np.int64, count=len(pay_t))
            index = np.repeat(rel - (np.cumsum(lens) - lens), lens) + np.arange(
                len(data), dtype=np.int64
            )
        if rel.min() < 0:
            keep = index >= 0
            index = index[keep]
            samples = samples[keep]
        out.append((decoder, index, samples))
    return out


def _merge_gaps(gaps: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    merged: list[tuple[str, int, int]] = []
    for side in CHANNELS:
        spans = sorted((a, b) for s, a, b in gaps if s == side)
        for a, b in spans:
            if merged and merged[-1][0] == side and a <= merged[-1][2]:
                merged[-1] = (side, merged[-1][1], max(b, merged[-1][2]))
            else:
                merged.append((side, a, b))
    return sorted(merged, key=lambda g: (g[1], g[0]))


def _party(addr: Any) -> dict[str, str | None]:
    return {
        "uri": clean_text(addr.uri, 512) or "",
        "user": clean_text(addr.user, 256),
        "display_name": clean_text(addr.display_name, 256),
        "tag": clean_text(addr.tag, 256),
    }


__all__ = ["CHANNELS", "CallRecorder", "Published"]
