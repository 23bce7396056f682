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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from callcap import __version__
from callcap.capture.dialog import Call
from callcap.capture.media import endpoint_text, ip_text, other_side
from callcap.capture.sdp import STATIC_PAYLOAD_TYPES, MediaDescription, RtpMap
from callcap.capture.stream import LEAP, TIMELINE_RATE, RtpStream
from callcap.codecs.dtmf import DtmfDigit, EventTracker
from callcap.codecs.g711 import DECODERS, Payload
from callcap.codecs.inband import InbandDtmfDetector, ToneDigit
from callcap.config.schema import Config, Duration
from callcap.consent import ConsentDecision, ConsentTracker
from callcap.errors import DiskFullError, StorageError
from callcap.policy import call_facts, retention_doc, retention_rule
from callcap.storage.layout import ensure_dir, make_call_uid, recording_stem
from callcap.storage.publish import (
    PublishedFile,
    StagedJson,
    fsync_dir,
    place_file,
    release_stem,
    reserve_stem,
    seal_file,
    stage_json,
)
from callcap.storage.sidecar import SCHEMA_VERSION, clean_text, iso_utc
from callcap.storage.spool import CallFacts, FactsFiles, audio_path, remove_entry
from callcap.storage.wav import WavWriter

Decoder = Callable[[Payload], npt.NDArray[np.int16]]
Queued = tuple[int, npt.NDArray[Any], Decoder | None]
"""Audio waiting to be written: its timeline position, and either its samples (decoder
None) or its codes and their decoder.  G.711 (:data:`~callcap.codecs.g711.CODE_PER_SAMPLE`)
waits as codes, one byte a sample, and is decoded when written: what waits for the jitter
window and the flush interval is most of a call's memory."""

CHANNELS = ("caller", "callee")
MAX_GAPS = 1000
MAX_DTMF = 1000
MAX_WARNINGS = 100
MAX_PAUSES = 1000
#: An in-band key within this many samples (100 ms) of the same key signalled out of band
#: (RFC 4733 or SIP INFO) by the same side is the same key press, listed once.
DUPLICATE_WINDOW = TIMELINE_RATE // 10
#: Keys of a pause/resume sequence follow each other within 5 s.
SEQUENCE_GAP = 5 * TIMELINE_RATE
#: With in-band detection on, the newest 64 ms of decoded audio wait for the next block:
#: a key that completes the pause sequence is recognised up to about 30 ms after its tone
#: ends, and the audio after it must still be in memory to be silenced.
INBAND_HOLD = 64 * TIMELINE_RATE // 1000
#: The tone detector reports a key about 40 ms after its tone ends; a signalled key waits
#: until the audio this long past its start has been analysed.
INBAND_LAG = 150 * TIMELINE_RATE // 1000
#: Samples put together and written at a time (10 s, 320 KB): a long silence is written in
#: bounded blocks.
WRITE_CHUNK = 10 * TIMELINE_RATE
#: A call's facts are saved to the spool at once when anything but the clock, the counters
#: and the gaps changed; every this many flushes when gaps were added since the last save;
CHECKPOINT_FLUSHES = 5
#: and every this many otherwise: a clean call's saved facts then differ from its current
#: ones only in counters and the end time, which recovery stretches to the audio it finds.
QUIET_CHECKPOINT_FLUSHES = 30
#: A key is reported when it ends (RFC 4733 end packet, tone end): consent is declared
#: missing only once the input is complete this long past the deadline, so a key pressed
#: just before it still counts.
KEY_GRACE_S = 1.0

#: An RFC 4733 key that went down inside the consent window is reported when it comes up
#: (its end packet); settling waits for it this long past the deadline at most, so a key
#: whose end packets were lost cannot hold the decision forever.
KEY_HELD_MAX_S = 10.0


#: A span of capture time in which the sensor lost frames: (start, end, reason).
LossSpan = tuple[float, float, str]
#: A gap is the sensor's when it lies within this many samples of a loss span (a span's
#: ends are frame times; a gap starts where the packet before it ended).
LOSS_SLACK = 2 * 160


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
    pending: list[Queued] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Published:
    """What a finished call left on disk (``wav`` is None when no audio was kept)."""

    call_uid: str
    sidecar: Path | None
    wav: PublishedFile | None
    document: dict[str, Any]
    sidecar_sha256: str | None = None
    #: the consent decision has its own audit entry already (logged when it was made)
    consent_audited: bool = False


@dataclass(slots=True)
class Publication:
    """A finished call's files, ready to be published: the spool WAV of ``writer`` (None
    when no audio is kept) is closed and goes to ``stem.wav``, then ``doc`` to ``stem.json``."""

    call_uid: str
    out_dir: Path
    writer: WavWriter | None
    stem: Path
    doc: dict[str, Any]
    write_sidecar: bool
    file_mode: int
    dir_mode: int
    #: (output dir, writer pid) of a durable recorder's spool entry, forgotten once published
    spool_entry: tuple[Path, int] | None = None
    consent_audited: bool = False
    _wav: PublishedFile | None = None
    _sidecar: StagedJson | None = None

    def publish(self) -> Published:
        """Audio first, sidecar last (with the audio's hash); thread-safe, runs once."""
        self.stage()
        return self.commit()

    def stage(self) -> None:
        """The slow half, safe to run beside other publications: close and seal the audio
        (fsync, hash) and write the sidecar beside its final name.  Nothing is visible in
        the archive yet."""
        try:
            if self.writer is not None:
                self.writer.close()  # libsndfile's close fsyncs: off the packet path
                self.doc["audio"]["format"] = self.writer.format
                size, digest = seal_file(self.writer.path, file_mode=self.file_mode)
                self.doc["audio"]["sha256"] = digest
                self.doc["audio"]["bytes"] = size
                self._wav = PublishedFile(self.stem.with_suffix(".wav"), size, digest)
            if self.write_sidecar:
                self._sidecar = stage_json(
                    self.stem.with_suffix(".json"),
                    self.doc,
                    file_mode=self.file_mode,
                    dir_mode=self.dir_mode,
                )
        except BaseException:
            release_stem(self.stem)
            raise

    def commit(self) -> Published:
        """The quick half (the caller may hold the archive lock): the audio, then the
        sidecar, renamed into place, and their directory made durable."""
        self.place()
        if self._wav is not None or self._sidecar is not None:
            try:
                fsync_dir(self.stem.parent)
            except OSError as exc:
                release_stem(self.stem)
                raise StorageError(f"cannot publish {self.stem}: {exc}") from exc
        return self.finish()

    def place(self) -> None:
        """:meth:`commit` up to the directory fsync, which the caller does (once for many
        publications: see the pipeline's group commit), then calls :meth:`finish`."""
        try:
            if self._wav is not None and self.writer is not None:
                place_file(self.writer.path, self._wav.path, dir_mode=self.dir_mode)
            if self._sidecar is not None:
                self._sidecar.commit()
        except BaseException:
            if self._sidecar is not None:
                self._sidecar.discard()
            release_stem(self.stem)
            raise

    def finish(self) -> Published:
        """After the directory fsync: forget the spool entry; what was published."""
        try:
            if self.spool_entry is not None:
                remove_entry(self.spool_entry[0], self.call_uid, self.spool_entry[1])
            sidecar = self._sidecar
            return Published(
                self.call_uid,
                sidecar.final if sidecar is not None else None,
                self._wav,
                self.doc,
                sidecar.sha256 if sidecar is not None else None,
                self.consent_audited,
            )
        finally:
            release_stem(self.stem)


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
        on_consent: Callable[[CallRecorder, ConsentDecision], None] | None = None,
        losses: Sequence[LossSpan] = (),
        on_storage_error: Callable[[CallRecorder, StorageError], None] | None = None,
    ) -> None:
        self.call = call
        #: Capture-time spans in which the sensor itself lost frames (the pipeline's list,
        #: appended to as the capture reports them): gaps inside them are the sensor's.
        self.losses = losses
        self.config = config
        self.out_dir = out_dir
        self.durable = durable
        self.sources = sources
        self.call_uid = make_call_uid(call.call_id, call.from_.tag, call.start)
        self._pid = os.getpid()
        self._facts: FactsFiles | None = None  # the spool checkpoints (durable mode)
        self._facts_seq = 0
        self._flushes = 0
        self._checkpoint_flush = 0  # the flush count and the gaps at the last checkpoint
        self._checkpoint_gaps = 0
        self._checkpointed: tuple[object, ...] = ()
        self._rule_facts = call_facts(call)  # what consent and retention rules match on
        self._retention: dict[str, tuple[str | None, Duration]] = {}  # status → rule, keep
        self.origin: float | None = None
        self.last_rtp = 0.0
        self.written = 0
        self._writer: WavWriter | None = None
        self._part: Path | None = None
        #: Audio waiting to be written, per channel (:data:`Queued`).
        self._pending: tuple[list[Queued], list[Queued]] = ([], [])
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
        #: PCI pauses as [from, to (None while open), by] in timeline samples.
        self.pauses: list[list[Any]] = []
        self._keys: list[tuple[str, int]] = []
        self._recent: list[tuple[str, str, bool, int]] = []
        self._inband: list[InbandDtmfDetector] | None = None
        self._inband_origin = [0, 0]
        self._fed = 0
        self._deferred: list[tuple[int, str, str, str, int | None]] = []
        #: Latest capture time seen (a key without a timeline position is taken at it).
        self._clock = call.start
        self.consent = ConsentTracker(config.consent, self._rule_facts)
        self.on_consent = on_consent
        #: the listener logged the consent decision in the audit log when it was made
        self.consent_audited = False
        #: Consent refused or missing with discard: no audio or key is kept any more.
        self.discarded = False
        #: Tone detection runs only for the consent window (``dtmf.inband`` is off).
        self._inband_for_consent = False
        #: Why no more audio is written (``disk_full``, ``disk_low``, ``audio_write_failed``):
        #: the recording ends where its audio ends (:meth:`stop_audio`).
        self.audio_stopped: str | None = None
        self.on_storage_error = on_storage_error
        if config.dtmf.inband or self.consent.listens_inband:
            self._inband = [InbandDtmfDetector(), InbandDtmfDetector()]
            self._inband_for_consent = not config.dtmf.inband

    # -- consent ----------------------------------------------------------------------------------

    def answered(self, ts: float) -> None:
        """The call was answered: its consent window opens."""
        self._consent(self.consent.answered(ts))

    def consent_header(self, headers: tuple[tuple[str, str], ...], side: str, ts: float) -> None:
        """An in-dialog request's headers, for ``sip_header`` consent evidence."""
        self._clock = max(self._clock, ts)
        self._consent(self.consent.header(headers, side, ts))

    def _audio_dropped(self) -> bool:
        """``discarded``, read afresh: a key found during a step may have set it."""
        return self.discarded

    def _consent(self, decision: ConsentDecision | None) -> None:
        """Act on a consent decision once: discard everything held, and tell the listener."""
        if decision is None:
            return
        try:
            if not decision.keeps_audio:
                self.discarded = True
                for pending in self._pending:
                    pending.clear()
                self._carry = None
                self._deferred.clear()
                self.dtmf.clear()
                self._recent.clear()
                self._inband = None
                self.discard()
        finally:
            if self.on_consent is not None:
                self.on_consent(self, decision)

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
        self._clock = max(self._clock, ts)
        pos = self.position(ts)
        self._signalled(digit, side, "sip_info", pos, duration_ms)

    # -- PCI pause --------------------------------------------------------------------------------

    def position(self, ts: float) -> int | None:
        """Timeline sample of capture time ``ts`` (None before the call's first RTP)."""
        if self.origin is None:
            return None
        return max(0, round((ts - self.origin) * TIMELINE_RATE))

    @property
    def paused(self) -> bool:
        return bool(self.pauses) and self.pauses[-1][1] is None

    def pause(self, by: str, pos: int | None) -> bool:
        """Silence both channels from timeline sample ``pos`` on; False if already paused.

        Audio already on disk cannot be taken back, so a pause never starts before the
        first unwritten sample.
        """
        if self.paused:
            return False
        if len(self.pauses) >= MAX_PAUSES:
            self.warn("pauses_omitted", f"more than {MAX_PAUSES} pauses; pausing no more")
            return False
        self.pauses.append([max(pos or 0, self.written), None, by])
        return True

    def resume(self, by: str, pos: int | None) -> bool:
        """End the open pause at timeline sample ``pos``; False if not paused."""
        if not self.paused:
            return False
        span = self.pauses[-1]
        span[1] = max(pos if pos is not None else self.written, span[0])
        return True

    def paused_at(self, pos: int | None) -> bool:
        if pos is None:
            return self.paused
        return any(a <= pos and (b is None or pos < b) for a, b, _ in self.pauses)

    def _silenced(self, block: npt.NDArray[np.int16], start: int) -> npt.NDArray[np.int16]:
        """``block`` (samples from ``start``) with every paused span zeroed, as a copy."""
        end = start + len(block)
        spans = [
            (max(a, start), min(end if b is None else b, end))
            for a, b, _ in self.pauses
            if a < end and (b is None or b > start)
        ]
        if not spans:
            return block
        out = block.copy()
        for a, b in spans:
            out[a - start : b - start] = 0
        return out

    def stop_audio(self, code: str, detail: str) -> None:
        """Write no more audio for this call (the disk is full or low, or its spool file
        failed): the audio written so far is kept and published as a partial recording, and
        a warning says why and what span it covers.  Signalling, keys and stream statistics
        are still followed to the call's end."""
        if self.audio_stopped is not None:
            return
        self.audio_stopped = code
        for pending in self._pending:
            pending.clear()
        self._carry = None
        if self._writer is None:
            self.warn(code, f"{detail}: no audio of this call was recorded")
        else:
            covered = self.written / TIMELINE_RATE
            self.warn(code, f"{detail}: the audio covers 0.000-{covered:.3f} s and ends there")

    def _write_failed(self, exc: StorageError) -> None:
        """The spool file could not be created or written: stop here, tell the pipeline."""
        if isinstance(exc, DiskFullError):
            self.stop_audio("disk_full", "the output filesystem is full")
        else:
            self.stop_audio("audio_write_failed", f"writing the audio failed ({exc})")
        if self.on_storage_error is not None:
            self.on_storage_error(self, exc)

    def warn(self, code: str, detail: str) -> None:
        key = f"{code}\x00{detail}"
        if key in self._warned or len(self.warnings) >= MAX_WARNINGS:
            return
        self._warned.add(key)
        self.warnings.append({"code": code, "detail": clean_text(detail, 512) or ""})

    # -- media input (hot path) -------------------------------------------------------------

    def stream_for(
        self, sender: str, src: bytes, sport: int, dst: bytes, dport: int, ssrc: int, arrival: float
    ) -> _StreamContext:
        """The stream of one RTP source (addresses and SSRC), made on its first packet.

        Packets then go to :meth:`push` one by one (the general path) or to :meth:`queue_run`
        as placed runs (the pipeline's fast lane, which keeps these contexts per flow)."""
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
            decoder = kind[2]
            assert decoder is not None
            ctx.pending.append((pos, decoder(payload), None))
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

    def audio_decoder(self, ctx: _StreamContext, pt: int) -> Decoder | None:
        """The decoder of payload type ``pt`` on this stream, if it is decoded audio."""
        kind = ctx.kinds.get(pt)
        if kind is None:
            kind = ctx.kinds[pt] = self._classify(ctx.stream.side, pt, ctx)
        return kind[2] if kind[0] is PayloadKind.AUDIO else None

    def queue_run(
        self,
        ctx: _StreamContext,
        positions: npt.NDArray[np.int64],
        samples: npt.NDArray[Any],
        size: int,
        last_arrival: float,
        contiguous: bool | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        """Queue a run of audio packets already placed on the timeline (see
        :func:`~callcap.capture.stream.place_runs`): ``size`` samples each, back to back in
        ``samples``: decoded, or codes that ``decoder`` (one of
        :data:`~callcap.codecs.g711.CODE_PER_SAMPLE`) decodes when they are written.
        Back-to-back positions (no loss, no clock slip) make one queue item; ``contiguous``
        says whether they are when the caller already knows."""
        self.last_rtp = last_arrival
        written = self.written
        first = int(positions[0])
        if contiguous is None:
            contiguous = len(positions) == 1 or bool((positions[1:] - positions[:-1] == size).all())
        if first >= written and contiguous:
            ctx.pending.append((first, samples, decoder))
            return
        for i, pos in enumerate(positions.tolist()):
            if pos < written:
                ctx.late += 1
                self._gap(ctx.stream.side, pos, pos + size)
            else:
                ctx.pending.append((pos, samples[i * size : (i + 1) * size], decoder))

    # -- time -----------------------------------------------------------------------------------

    def flush(self, now: float) -> None:
        """Write every sample older than the jitter window to the spool file."""
        self._clock = max(self._clock, now)
        if self.discarded:
            for pending in self._pending:
                pending.clear()
            # No audio, but the call goes on: its facts (the end recovery would give it)
            # are saved as rarely as a quiet call's.
            self._flushes += 1
            if self._flushes - self._checkpoint_flush >= QUIET_CHECKPOINT_FLUSHES:
                self.checkpoint(now)
            return
        if self.audio_stopped is not None:
            for pending in self._pending:
                pending.clear()  # what arrives after the stop is never written
        if self.origin is None:
            self._settle_consent(now)
            return
        for ctx in self.streams.values():
            ctx.stream.end_window()
            self._collect_gaps(ctx)
        horizon = int((now - self.origin) * TIMELINE_RATE) - self._jitter
        wrote = horizon > self.written and self.audio_stopped is None
        if wrote:
            self._write_until(horizon)
        # Facts first, then the header that commits the audio.  The facts are saved when
        # what they say changed (a key, a pause, a warning, a stream, consent), every
        # CHECKPOINT_FLUSHES flushes while gaps are added, and every QUIET_CHECKPOINT_FLUSHES
        # otherwise: between those only the clock, the counters and the gaps move, and
        # recovery stretches the facts' end to the audio it finds.
        self._flushes += 1
        since = self._flushes - self._checkpoint_flush
        if self._facts_signature() != self._checkpointed or since >= (
            CHECKPOINT_FLUSHES
            if len(self.gaps) + self.gaps_omitted != self._checkpoint_gaps
            else QUIET_CHECKPOINT_FLUSHES
        ):
            self.checkpoint(now)
        if wrote and self.durable and self._writer is not None:
            self._writer.flush(sync=False)  # the pipeline syncs the spool as a whole
        self._settle_consent(now)

    def checkpoint(self, now: float) -> None:
        """Durable mode: save the call's facts beside its spool audio (crash recovery).

        Called when the call starts, answers or changes media and at every flush (before the
        WAV header is committed), so after a crash of the process the facts always cover at
        least the audio the spool file's header promises.  Neither is fsynced here: the
        pipeline syncs the spool's filesystem once per flush interval
        (:class:`~callcap.storage.spool.SpoolSync`), which covers a power cut up to the last
        sync.  The recovered sidecar ends at ``now``, with ``end_reason: "recovered"``.

        Nothing is saved for a call not answered yet that has no audio (no early media):
        recovery would forget it anyway, and most of a call's set-up (INVITE, offer,
        answer) then costs no checkpoint — nor any file, for a call that never connects.
        """
        if not self.durable or (self.call.answer is None and self._writer is None):
            return
        self._checkpointed = self._facts_signature()
        self._checkpoint_flush = self._flushes
        self._checkpoint_gaps = len(self.gaps) + self.gaps_omitted
        # (after a discard the facts still go on: recovery then publishes the sidecar alone)
        doc = self._sidecar(True, "WAV", self.written, "", end=now, end_reason="recovered")
        self._facts_seq += 1
        facts = CallFacts(self.call_uid, self.call.start, now, doc, self._facts_seq)
        if self._facts is None:
            self._facts = FactsFiles(
                self.out_dir,
                self.call_uid,
                self._pid,
                file_mode=self.config.recording.file_mode,
                dir_mode=self.config.recording.dir_mode,
            )
        self._facts.save(facts)

    def _retention_fields(self, status: str, end: float) -> dict[str, Any]:
        """The sidecar's ``retention`` (the rule matched once per consent status)."""
        known = self._retention.get(status)
        if known is None:
            known = self._retention[status] = retention_rule(
                self.config.retention, self._rule_facts, status
            )
        return retention_doc(*known, end)

    def _facts_signature(self) -> tuple[object, ...]:
        """What changes in the facts other than by the clock: compared at each flush.

        Gaps are not in it: they come back with the periodic checkpoint.  A lossy call (or
        a sensor that overran) would otherwise be checkpointed at every flush, with a
        sidecar that grows with its gaps — the cost rising with the loss, just when the
        recorder is short of time.  Recovery loses at most the gaps of the last few
        seconds from the list; the audio shows them as silence either way.
        """
        decision = self.consent.decision
        return (
            len(self.dtmf),
            len(self.warnings),
            len(self.pauses),
            self.paused,
            len(self.streams),
            None if decision is None else decision.status,
            self.discarded,
        )

    def _settle_consent(self, now: float) -> None:
        """Declare consent missing once every key up to the deadline has been seen, and stop
        the tone detector that ran only for the consent window."""
        if self.consent.decision is None:
            lag = self._jitter + (INBAND_LAG if self._inband is not None else 0)
            complete = now - lag / TIMELINE_RATE - KEY_GRACE_S
            deadline = self.consent.deadline
            held = self._key_down_since()
            if (
                held is not None
                and deadline is not None
                and held <= deadline
                and now < deadline + KEY_HELD_MAX_S
            ):
                complete = min(complete, held)  # a key pressed in time, still held down
            self._consent(self.consent.settle(complete))
        if self._inband_for_consent and self.consent.decision is not None:
            self._inband_for_consent = False
            if self._inband is not None:
                self._release_deferred(final=True)
                self._inband = None

    def _key_down_since(self) -> float | None:
        """Capture time at which the earliest RFC 4733 key still held down went down."""
        if self.origin is None:
            return None
        earliest = None
        for ctx in self.streams.values():
            since = None if ctx.events is None else ctx.events.open_since
            pos = None if since is None else ctx.stream.position(since)
            if pos is not None:
                at = self.origin + pos / TIMELINE_RATE
                earliest = at if earliest is None else min(earliest, at)
        return earliest

    def finish(self, end: float) -> Published:
        """Drain everything, close the spool file and publish (or discard) the recording."""
        return self.prepare(end).publish()

    def prepare(self, end: float) -> Publication:
        """Drain everything and close the spool file: what is left to do is disk work only
        (:meth:`Publication.publish`), which may run on another thread."""
        call = self.call
        self._close_facts()  # no checkpoint after this: the publication forgets the entry
        for ctx in self.streams.values():
            ctx.stream.finish()
            self._collect_gaps(ctx)
            if ctx.events is not None:
                for digit in ctx.events.flush():
                    self._event_digit(ctx, digit)
        for ctx in self.streams.values():
            leaps = ctx.stream.stats.ts_leaps
            if leaps:
                self.warn(
                    "rtp_timestamp_leap",
                    f"{ctx.stream.side} stream 0x{ctx.stream.ssrc:08X}: {leaps} packet(s) whose "
                    "RTP timestamp was far from their arrival and from the packets around "
                    "them, placed by their sequence number",
                )
        if self.origin is not None and not self.discarded:
            # Nothing is placed much past the newest packet's arrival (the stream believes
            # no lone timestamp far ahead of it): a queued item beyond that is not written.
            newest = max(end, self.last_rtp) - self.origin
            limit = round(newest * TIMELINE_RATE) + 2 * LEAP
            for pending in self._pending:
                pending[:] = [item for item in pending if item[0] <= limit]
            last = max(
                (pos + len(data) for pending in self._pending for pos, data, _d in pending),
                default=0,
            )
            horizon = max(round((end - self.origin) * TIMELINE_RATE), last, self.written)
            if self._carry is not None:
                horizon = max(horizon, self.written + len(self._carry))
            self._write_until(horizon, final=True)
        if self._inband is not None:
            # a tone still sounding when the audio ended, and signalled keys still waiting
            for ch, detector in enumerate(self._inband):
                for tone in detector.flush():
                    self._add_inband(ch, tone)
            self._release_deferred(final=True)
        if self.paused:
            self.pauses[-1][1] = max(self.written, self.pauses[-1][0])
        if self.consent.decision is None:
            self._consent(self.consent.finish())
        answered = call.answer is not None
        keep_audio = answered and not self.discarded
        write_sidecar = answered or self.config.recording.record_failed_calls
        writer: WavWriter | None = None
        audio_format, frames = "WAV", 0
        if keep_audio and self._writer is None:
            if self.audio_stopped is None:
                try:
                    self._ensure_writer()
                except StorageError as exc:
                    self._write_failed(exc)
            keep_audio = self._writer is not None  # stopped before any audio: sidecar only
        if keep_audio:
            writer = self._writer
            assert writer is not None
            audio_format = writer.format
            frames = writer.frames
            if self.origin is None:
                self.warn("no_media", "the call was answered but no RTP of it was captured")
            self._writer = None  # the publication owns it now
            self._part = None
        else:
            self.discard()
        stem = recording_stem(self.out_dir, call.start, self.call_uid)
        if keep_audio or write_sidecar:
            stem = reserve_stem(stem)
        doc = self._sidecar(keep_audio, audio_format, frames, stem.with_suffix(".wav").name)
        return Publication(
            self.call_uid,
            self.out_dir,
            writer,
            stem,
            doc,
            write_sidecar=write_sidecar,
            file_mode=self.config.recording.file_mode,
            dir_mode=self.config.recording.dir_mode,
            spool_entry=(self.out_dir, self._pid) if self.durable else None,
            consent_audited=self.consent_audited,
        )

    def discard(self) -> None:
        """Drop the spool file (failed call, or audio that must not be kept); the file goes
        even when closing it fails."""
        writer, self._writer = self._writer, None
        part, self._part = self._part, None
        self._close_facts()  # a checkpoint after this (consent discarded) makes them anew
        try:
            if writer is not None:
                writer.close()
        finally:
            if part is not None:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            if self.durable:
                remove_entry(self.out_dir, self.call_uid, self._pid)

    # -- internals ------------------------------------------------------------------------------

    def _close_facts(self) -> None:
        facts, self._facts = self._facts, None
        if facts is not None:
            facts.close()

    def _new_stream(
        self, key: tuple[bytes, int, bytes, int, int], sender: str, arrival: float
    ) -> _StreamContext:
        if self.origin is None:
            self.origin = arrival
            if not self.discarded and self.audio_stopped is None:
                try:
                    self._ensure_writer()
                except StorageError as exc:
                    self._write_failed(exc)
        src, sport, dst, dport, ssrc = key
        stream = RtpStream(
            src=(ip_text(src), sport),
            dst=(ip_text(dst), dport),
            ssrc=ssrc,
            side=sender,
            origin=self.origin,
            # inside a talk spurt the sender's clock may run up to half the jitter window
            # off ours before the anchor follows: its packets are then never late for it
            drift_limit=self._jitter // 2,
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
        duration = round(digit.duration * 1000 / (ctx.stream.clock_rate or TIMELINE_RATE))
        self._signalled(digit.digit, ctx.stream.side, "rfc4733", pos, duration)

    def _signalled(
        self, digit: str, side: str, source: str, pos: int | None, duration_ms: int | None
    ) -> None:
        """A key signalled out of band arrives before the audio around it is analysed (up
        to a flush interval later); it waits until then, so that keys are taken in the
        order they were pressed whatever carried them: a pause keyed in-band covers the
        RFC 4733 keys that follow it."""
        if self._inband is not None and pos is not None and pos + INBAND_LAG > self._fed:
            self._deferred.append((pos, digit, side, source, duration_ms))
            return
        self._add_dtmf(digit, side, source, pos, duration_ms)

    def _release_deferred(self, final: bool) -> None:
        if not self._deferred:
            return
        self._deferred.sort(key=lambda d: d[0])
        ready = [d for d in self._deferred if final or d[0] + INBAND_LAG <= self._fed]
        self._deferred = self._deferred[len(ready) :]
        for pos, digit, side, source, duration_ms in ready:
            self._add_dtmf(digit, side, source, pos, duration_ms)

    def _add_dtmf(
        self, digit: str, side: str, source: str, pos: int | None, duration_ms: int | None
    ) -> None:
        """One key press from any source: deduplicated, matched against the pause/resume
        sequences, and listed unless it was pressed while paused."""
        inband = source == "inband"
        if pos is not None:
            for r_digit, r_side, r_inband, r_pos in self._recent:
                if (
                    r_digit == digit
                    and r_side == side
                    and r_inband != inband
                    and abs(r_pos - pos) <= DUPLICATE_WINDOW
                ):
                    if not inband:
                        # the signalled copy wins: replace the tone heard earlier
                        self.dtmf[:] = [
                            d
                            for d in self.dtmf
                            if not (
                                d["source"] == "inband"
                                and d["digit"] == digit
                                and d["side"] == side
                                and d["at_s"] == round(r_pos / TIMELINE_RATE, 3)
                            )
                        ]
                        self._recent.append((digit, side, inband, pos))
                        self._store_dtmf(digit, side, source, pos, duration_ms)
                    return
            self._recent.append((digit, side, inband, pos))
            del self._recent[:-32]
        self._store_dtmf(digit, side, source, pos, duration_ms)
        if side == self.config.pci.agent_side:
            end = None if pos is None else pos + round((duration_ms or 0) * TIMELINE_RATE / 1000)
            self._sequence(digit, end)

    def _store_dtmf(
        self, digit: str, side: str, source: str, pos: int | None, duration_ms: int | None
    ) -> bool:
        if self.paused_at(pos):
            return False  # PCI: keys pressed while paused are never stored
        if self.consent.decision is None:
            when = (
                self._clock
                if pos is None or self.origin is None
                else self.origin + pos / TIMELINE_RATE
            )
            self._consent(self.consent.key(digit, side, source == "inband", when))
        if self.discarded:
            return False
        if len(self.dtmf) >= MAX_DTMF:
            self.warn("dtmf_omitted", f"more than {MAX_DTMF} DTMF digits; the rest are not listed")
            return False
        at = None if pos is None else round(pos / TIMELINE_RATE, 3)
        self.dtmf.append(
            {"digit": digit, "side": side, "source": source, "at_s": at, "duration_ms": duration_ms}
        )
        return True

    def _sequence(self, digit: str, end: int | None) -> None:
        """The agent's keys: the pause sequence pauses after its last key, the resume
        sequence resumes after its last key."""
        keys = self._keys
        if end is None:
            end = self.written
        if keys and end - keys[-1][1] > SEQUENCE_GAP:
            keys.clear()
        keys.append((digit, end))
        del keys[:-8]
        typed = "".join(k for k, _ in keys)
        pci = self.config.pci
        if not self.paused and typed.endswith(pci.pause_dtmf):
            keys.clear()
            self.pause("dtmf", end)
        elif self.paused and typed.endswith(pci.resume_dtmf):
            keys.clear()
            self.resume("dtmf", end)

    def _gap(self, side: str, start: int, end: int) -> None:
        """Note missing audio at timeline samples ``start..end``, clipped to the timeline.

        A packet can be placed before sample 0 (a late or reordered packet of a stream
        whose anchor moved down since, as when the sender's timestamps jumped): the
        recording never covered that time, so nothing of it is missing from the audio.
        Such a packet is still counted ``late`` (by :meth:`push` or :meth:`queue_run`) but
        leaves no gap here."""
        start = max(0, start)
        if end <= start:
            return
        if len(self.gaps) >= MAX_GAPS:
            self.gaps_omitted += 1
            return
        self.gaps.append((side, start, end))

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

    def _write_until(self, horizon: int, *, final: bool = False) -> None:
        """Decode and write samples ``[written, horizon)``; later samples stay queued.

        At most :data:`WRITE_CHUNK` samples are put together at a time: a long silence (a
        call on hold without media, a stream that stopped) costs a few bounded blocks, never
        an allocation in proportion to it.
        """
        while self.written < horizon and not self.discarded and self.audio_stopped is None:
            end = min(horizon, self.written + WRITE_CHUNK)
            before = self.written
            self._write_chunk(end, final=final and end == horizon)
            if self.written == before:
                return  # held back (in-band detection) or dropped: the next call goes on

    def _write_chunk(self, horizon: int, *, final: bool = False) -> None:
        """:meth:`_write_until` for one bounded stretch.

        Paused spans are zeroed in what is analysed and written, never in memory before
        that: a pause is exact to the sample wherever it falls in a block.
        """
        start = self.written
        n = horizon - start
        if n <= 0 or self.discarded or self.audio_stopped is not None:
            return
        carry = self._carry
        # what is taken ends by the horizon (_cut): the block is this stretch, or the carry
        length = max(n, 0 if carry is None else len(carry))
        placed: list[tuple[int, npt.NDArray[np.int64] | slice, npt.NDArray[np.int16]]] = []
        for ch in (0, 1):
            pending = self._pending[ch]
            if not pending:
                continue
            taken, rest = _cut(pending, horizon)
            if not taken:
                continue
            pending[:] = rest
            index, samples = _placement(taken, start)
            placed.append((ch, index, samples))
        block = np.zeros((length, 2), dtype=np.int16)
        if carry is not None:
            block[: len(carry)] = carry
        for ch, index, samples in placed:
            block[index, ch] = samples
        if self._inband is not None:
            self._detect_inband(block, start, n, final=final)
            self._release_deferred(final)
            if self._audio_dropped():
                return  # a key in this very block refused consent: nothing is written
        w = n if final or self._inband is None else max(0, n - INBAND_HOLD)
        writer = self._writer
        assert writer is not None
        before = writer.frames
        try:
            writer.write(self._silenced(block[:w], start))
        except StorageError as exc:
            self.written = start + (writer.frames - before)  # the frames that did land
            self._carry = None
            self._write_failed(exc)
            return
        self._carry = block[w:].copy() if length > w else None
        self.written = start + w

    def _detect_inband(
        self, block: npt.NDArray[np.int16], start: int, n: int, *, final: bool
    ) -> None:
        """Feed the not yet analysed part of the block to each channel's tone detector.

        The agent's channel goes first: its keys may open a pause inside this block, and
        then the other channel is analysed with that pause already silenced.  The agent's
        detector, which has heard past the pause's start, is replaced by a fresh one that
        hears only the silence: nothing said or keyed while paused is ever analysed.
        """
        assert self._inband is not None
        agent = CHANNELS.index(self.config.pci.agent_side)
        begin = max(self._fed, start)
        end = start + n
        if end <= begin:
            return
        for ch in (agent, 1 - agent):
            opened = len(self.pauses)
            audio = self._silenced(np.ascontiguousarray(block[begin - start : n, ch]), begin)
            found = self._inband[ch].feed(audio)
            if final:
                found += self._inband[ch].flush()
            for digit in found:
                self._add_inband(ch, digit)
            if self._audio_dropped():
                return  # consent refused by a tone: nothing more is analysed
            if len(self.pauses) > opened and self.paused:
                origin = max(int(self.pauses[-1][0]), begin)
                self._inband[ch] = InbandDtmfDetector()
                self._inband_origin[ch] = origin
                self._inband[ch].feed(np.zeros(max(0, end - origin), dtype=np.int16))
        self._fed = end

    def _add_inband(self, ch: int, digit: ToneDigit) -> None:
        self._add_dtmf(
            digit.digit,
            CHANNELS[ch],
            "inband",
            self._inband_origin[ch] + digit.start,
            round(digit.duration * 1000 / TIMELINE_RATE),
        )

    def _sidecar(
        self,
        keep_audio: bool,
        audio_format: str,
        frames: int,
        file_name: str,
        *,
        end: float | None = None,
        end_reason: str | None = None,
    ) -> dict[str, Any]:
        """The sidecar document.  The audio's ``sha256`` and ``bytes`` are filled in when the
        WAV is published; with ``end`` given (a spool checkpoint) the ``audio`` object is
        filled as far as it is known before then."""
        call = self.call
        checkpoint = end is not None
        if end is None:
            end = call.end if call.end is not None else call.last_activity
        consent = self.consent.outlook() if checkpoint else self.consent.finish()
        audio: dict[str, Any] | None = None
        if keep_audio or checkpoint:
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
                "sha256": None,
                "bytes": None,
            }
        described = [
            (ctx, self._stream_doc(ctx))
            for ctx in sorted(self.streams.values(), key=lambda c: c.stream.first_arrival)
            if ctx.stream.stats.packets
        ]
        losses = self._loss_spans()
        merged = _merge_gaps(self.gaps, self.written)
        gaps = [
            {
                "side": side,
                "from_s": round(a / TIMELINE_RATE, 3),
                "to_s": round(b / TIMELINE_RATE, 3),
                "capture_loss": _overlaps(losses, a, b),
            }
            for side, a, b in merged
        ]
        streams = [
            {**doc, "capture_loss": self._stream_lost_in_capture(ctx, merged, losses)}
            for ctx, doc in described
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
            "capture_loss": [
                {
                    "from_s": round(a / TIMELINE_RATE, 3),
                    "to_s": round(b / TIMELINE_RATE, 3),
                    "reason": reason,
                }
                for a, b, reason in losses
            ],
            "dtmf": self.dtmf,
            "pauses": [
                {
                    "from_s": round(a / TIMELINE_RATE, 6),
                    "to_s": round((b if b is not None else self.written) / TIMELINE_RATE, 6),
                    "by": by,
                }
                for a, b, by in self.pauses
            ],
            "consent": consent.sidecar(),
            "retention": self._retention_fields(consent.status, end),
            "warnings": list(self.warnings),
            "recorder": {"name": "callcap", "version": __version__},
        }

    def _loss_spans(self) -> list[tuple[int, int, str]]:
        """The sensor's loss spans that touch this call's timeline, in timeline samples
        (clipped to it; the recording's own span when it has no audio yet)."""
        if not self.losses or self.origin is None:
            return []
        origin = self.origin
        last = max(self.written, round((self._clock - origin) * TIMELINE_RATE))
        spans = []
        for start, end, reason in self.losses:
            a = max(0, round((start - origin) * TIMELINE_RATE))
            b = min(last, round((end - origin) * TIMELINE_RATE))
            if b >= a and end >= origin:
                spans.append((a, b, reason))
        return spans

    @staticmethod
    def _stream_lost_in_capture(
        ctx: _StreamContext,
        gaps: list[tuple[str, int, int]],
        losses: list[tuple[int, int, str]],
    ) -> bool:
        """Did the sensor lose packets of this stream: a gap on its side, while it was
        sending, inside a loss span?"""
        if not losses:
            return False
        s = ctx.stream
        first = round((s.first_arrival - s.origin) * TIMELINE_RATE)
        last = round((s.last_arrival - s.origin) * TIMELINE_RATE)
        return any(
            side == s.side and b >= first and a <= last and _overlaps(losses, a, b)
            for side, a, b in gaps
        )

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


_Placed = tuple["npt.NDArray[np.int64] | slice", "npt.NDArray[np.int16]"]


def _cut(items: list[Queued], horizon: int) -> tuple[list[Queued], list[Queued]]:
    """Queued items split at timeline sample ``horizon``: what lies before it (to write now)
    and what lies after (to stay queued, in order — later items still win an overlap).  An
    item across the horizon is cut in two, so its tail waits as it came (G.711 as codes)
    rather than in the next write's carried-over samples."""
    taken: list[Queued] = []
    rest: list[Queued] = []
    for item in items:
        pos, data, decoder = item
        if pos >= horizon:
            rest.append(item)
        elif pos + len(data) <= horizon:
            taken.append(item)
        else:
            cut = horizon - pos
            taken.append((pos, data[:cut], decoder))
            rest.append((horizon, data[cut:], decoder))
    return taken, rest


def _decoded(items: list[Queued]) -> npt.NDArray[np.int16]:
    """The samples of queued items, one after the other: codes of one decoder (the usual
    case) put together and decoded at once."""
    decoder = items[0][2]
    if all(item[2] is decoder for item in items):
        data = items[0][1] if len(items) == 1 else np.concatenate([item[1] for item in items])
        return data if decoder is None else decoder(data)
    return np.concatenate(
        [data if decoder is None else decoder(data) for _p, data, decoder in items]
    )


def _placement(items: list[Queued], start: int) -> _Placed:
    """Where queued samples go in the block that starts at timeline sample ``start``:
    (sample indices, samples) — a slice when they are back to back, the usual case.

    Samples that would land before ``start`` (a packet straddling the last flush) are
    dropped.  Where stretches overlap (a duplicate that slipped through), the later wins.
    """
    if len(items) == 1 and items[0][0] >= start:
        pos = items[0][0]
        samples = _decoded(items)
        return slice(pos - start, pos - start + len(samples)), samples
    positions = [item[0] for item in items]
    lengths = [len(item[1]) for item in items]
    samples = _decoded(items)
    first = positions[0] - start
    if first >= 0 and all(
        nxt == pos + size for pos, size, nxt in zip(positions, lengths, positions[1:], strict=False)
    ):
        return slice(first, first + len(samples)), samples
    rel = np.array(positions, dtype=np.int64) - start
    sizes = np.array(lengths, dtype=np.int64)
    index = np.repeat(rel - (np.cumsum(sizes) - sizes), sizes) + np.arange(
        len(samples), dtype=np.int64
    )
    if rel.min() < 0:
        keep = index >= 0
        index = index[keep]
        samples = samples[keep]
    return index, samples


def _overlaps(spans: list[tuple[int, int, str]], a: int, b: int) -> bool:
    return any(a <= end + LOSS_SLACK and b >= start - LOSS_SLACK for start, end, _r in spans)


def _merge_gaps(gaps: list[tuple[str, int, int]], length: int) -> list[tuple[str, int, int]]:
    """Each side's gaps merged where they touch, clipped to the ``length`` samples written.

    A gap marks a stretch of the audio: a late packet straddling the last sample written (at
    a checkpoint, or the call's end) reaches past it, and that part is not in the audio."""
    merged: list[tuple[str, int, int]] = []
    for side in CHANNELS:
        spans = sorted((a, min(b, length)) for s, a, b in gaps if s == side and a < length)
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


__all__ = ["CHANNELS", "CallRecorder", "Publication", "Published"]
