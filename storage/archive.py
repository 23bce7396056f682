"""Changing the archive after the fact: legal hold, retention sweep, erasure — each logged.

Where a hold lives: in the sidecar's ``retention.legal_hold``, rewritten atomically, with the
rewrite logged (``hold_added`` / ``hold_removed``) together with the sidecar's new SHA-256.
One place answers "may this be deleted?" for every reader — the sweep here, and any
downstream tool that only sees the sidecar — and ``callcap verify`` stays exact: the newest
audit entry for a sidecar always carries its current hash.  A separate holds file would be
a second truth that a copy of the tree without it silently loses.

Every change happens under the audit log's lock (:meth:`AuditLog.locked`), re-reading the
sidecar inside it, so a hold placed by one process and a sweep running in another cannot
interleave into deleting a held recording.  Deletion removes the sidecar first and the audio
second: a tool watching for sidecars never finds one whose audio is already gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from callcap.errors import StorageError
from callcap.storage.audit import (
    HOLD_ADDED,
    HOLD_REMOVED,
    RECORDING_DELETED,
    RECORDING_ERASED,
    AuditLog,
    AuditWriter,
    FileRef,
)
from callcap.storage.publish import fsync_dir, write_json_atomic
from callcap.storage.sidecar import clean_text

_CALL_UID_RE = re.compile(r"[a-z2-7]{16}")


@dataclass(frozen=True, slots=True)
class Recording:
    """One sidecar of the archive and what it says about keeping its recording."""

    sidecar: Path
    wav: Path | None
    call_uid: str
    delete_after: datetime | None
    legal_hold: bool
    document: dict[str, Any]


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def read_recording(sidecar: Path) -> Recording:
    """Parse a sidecar; :class:`StorageError` when it is not one (never acted upon then)."""
    try:
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StorageError(f"{sidecar}: not a readable sidecar: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("call_uid"), str):
        raise StorageError(f"{sidecar}: not a callcap sidecar (no call_uid)")
    retention = doc.get("retention")
    retention = retention if isinstance(retention, dict) else {}
    audio = doc.get("audio")
    wav = None
    if isinstance(audio, dict) and isinstance(audio.get("file"), str):
        name = audio["file"]
        if "/" not in name and "\\" not in name and name not in ("", ".", ".."):
            wav = sidecar.with_name(name)
    return Recording(
        sidecar=sidecar,
        wav=wav,
        call_uid=doc["call_uid"],
        delete_after=_parse_time(retention.get("delete_after")),
        legal_hold=retention.get("legal_hold") is True,
        document=doc,
    )


def sidecars(out_dir: Path) -> Iterator[Path]:
    """Every sidecar under the output directory, in path order (hidden names skipped)."""
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".json") and not name.startswith("."):
                yield Path(root) / name


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recording, for the command's report."""

    recording: Recording
    action: str  # deleted | erased | kept | held | released | unchanged | error
    why: str

    def line(self, out_dir: Path) -> str:
        rel = self.recording.sidecar.relative_to(out_dir).with_suffix("").as_posix()
        return f"{self.action} {rel} call_uid={self.recording.call_uid}: {self.why}"


class Archive:
    """The recordings under one output directory, changed only through the audit log."""

    def __init__(self, out_dir: Path, *, file_mode: int = 0o640, dir_mode: int = 0o750) -> None:
        self.out_dir = out_dir
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.audit = AuditLog(out_dir, file_mode=file_mode, dir_mode=dir_mode)

    # -- legal hold ---------------------------------------------------------------------------

    def set_hold(self, call_uid: str, held: bool, reason: str) -> list[Outcome]:
        """Place or lift a legal hold on every recording of ``call_uid``."""
        if _CALL_UID_RE.fullmatch(call_uid) is None:
            raise StorageError(f"not a call_uid (16 characters a-z, 2-7): {call_uid[:40]!r}")
        outcomes: list[Outcome] = []
        for path in sidecars(self.out_dir):
            if call_uid not in path.name:
                continue
            with self.audit.locked() as log:
                rec = read_recording(path)
                if rec.call_uid != call_uid:
                    continue
                outcomes.append(self._hold_one(log, rec, held, reason))
        return outcomes

    def _hold_one(self, log: AuditWriter, rec: Recording, held: bool, reason: str) -> Outcome:
        if rec.legal_hold == held:
            state = "on hold" if held else "not on hold"
            return Outcome(rec, "unchanged", f"already {state}")
        doc = dict(rec.document)
        retention = dict(doc.get("retention") or {})
        retention["legal_hold"] = held
        doc["retention"] = retention
        written = write_json_atomic(
            rec.sidecar, doc, file_mode=self.file_mode, dir_mode=self.dir_mode
        )
        text = clean_text(reason, 512) or ""
        log.append(
            HOLD_ADDED if held else HOLD_REMOVED,
            {"call_uid": rec.call_uid, "reason": text},
            {"sidecar": log.ref(rec.sidecar, written.sha256)},
        )
        return Outcome(rec, "held" if held else "released", text)

    # -- retention ----------------------------------------------------------------------------

    def sweep(self, now: datetime, *, dry_run: bool = False) -> list[Outcome]:
        """Delete every recording past its ``delete_after`` that is not on legal hold.

        A sidecar that cannot be read is reported and left alone: nothing is deleted on a
        guess.  ``dry_run`` reports what would happen and changes nothing.
        """
        outcomes: list[Outcome] = []
        for first in self._readable(outcomes):
            if first.delete_after is None or first.delete_after > now:
                continue
            if dry_run:
                action = "kept" if first.legal_hold else "would-delete"
                outcomes.append(Outcome(first, action, _expiry(first, now)))
                continue
            with self.audit.locked() as log:
                rec = _reread(first, outcomes)  # under the lock: a hold may have landed
                if rec is None or rec.delete_after is None or rec.delete_after > now:
                    continue
                if rec.legal_hold:
                    outcomes.append(Outcome(rec, "kept", _expiry(rec, now)))
                    continue
                problem = self._remove(log, rec, RECORDING_DELETED, {"delete_after": _iso(rec)})
                if problem is None:
                    outcomes.append(Outcome(rec, "deleted", _expiry(rec, now)))
                else:
                    outcomes.append(Outcome(rec, "error", problem))
        return outcomes

    # -- erasure ------------------------------------------------------------------------------

    def erase(self, party: str, *, dry_run: bool = False) -> list[Outcome]:
        """Remove every recording with ``party`` as caller or callee, except those on hold."""
        outcomes: list[Outcome] = []
        for first in self._readable(outcomes):
            if not party_matches(first.document, party):
                continue
            if first.legal_hold:
                outcomes.append(Outcome(first, "kept", "on legal hold"))
                continue
            if dry_run:
                outcomes.append(Outcome(first, "would-erase", "party matches"))
                continue
            with self.audit.locked() as log:
                rec = _reread(first, outcomes)
                if rec is None:
                    continue
                if rec.legal_hold:
                    outcomes.append(Outcome(rec, "kept", "on legal hold"))
                    continue
                # The party itself is not logged: the log outlives the erasure.
                problem = self._remove(log, rec, RECORDING_ERASED, {"reason": "right_to_erasure"})
                if problem is None:
                    outcomes.append(Outcome(rec, "erased", "party matches"))
                else:
                    outcomes.append(Outcome(rec, "error", problem))
        return outcomes

    # -- internals ----------------------------------------------------------------------------

    def _readable(self, outcomes: list[Outcome]) -> Iterator[Recording]:
        """Every readable recording; an unreadable sidecar becomes an ``error`` outcome."""
        for path in sidecars(self.out_dir):
            try:
                yield read_recording(path)
            except StorageError as exc:
                outcomes.append(_unreadable(path, exc))

    def _remove(
        self, log: AuditWriter, rec: Recording, event: str, fields: dict[str, Any]
    ) -> str | None:
        """Sidecar first, then audio, each removal made durable; then the audit entry.

        Returns ``None`` when both are gone, else what went wrong.  The entry lists exactly
        the files that were removed: when the sidecar could not be, nothing is logged; when
        only the audio could not be, the sidecar's removal is logged and the audio stays
        logged as published, so ``callcap verify`` remains exact either way.
        """
        files: dict[str, FileRef] = {"sidecar": log.ref(rec.sidecar)}
        wav = rec.wav if rec.wav is not None and rec.wav.exists() else None
        wav_ref = log.ref(wav) if wav is not None else None
        try:
            rec.sidecar.unlink()
            fsync_dir(rec.sidecar.parent)
        except OSError as exc:
            return f"cannot delete {rec.sidecar.name}: {exc.strerror or exc}"
        problem = None
        if wav is not None and wav_ref is not None:
            try:
                with contextlib.suppress(FileNotFoundError):
                    wav.unlink()
                fsync_dir(wav.parent)
                files["wav"] = wav_ref
            except OSError as exc:
                problem = f"sidecar deleted, but not {wav.name}: {exc.strerror or exc}"
        log.append(event, {"call_uid": rec.call_uid, **fields}, files)
        return problem


def party_matches(doc: dict[str, Any], party: str) -> bool:
    """Whether ``party`` is the From or To of a sidecar: its user part or its URI.

    Exact comparison, never a pattern: erasure deletes, so ``*`` erases nothing rather than
    everything.  A URI matches with or without its parameters and angle brackets
    (``sip:+4930123@pbx``, ``<sip:+4930123@pbx;user=phone>``).
    """
    wanted = party.strip().removeprefix("<").removesuffix(">").strip()
    if not wanted:
        return False
    for key in ("from", "to"):
        side = doc.get(key)
        if not isinstance(side, dict):
            continue
        user, uri = side.get("user"), side.get("uri")
        if isinstance(user, str) and user == wanted:
            return True
        if isinstance(uri, str) and wanted in (uri, uri.split(";", 1)[0]):
            return True
    return False


def _iso(rec: Recording) -> str | None:
    retention = rec.document.get("retention")
    value = retention.get("delete_after") if isinstance(retention, dict) else None
    return value if isinstance(value, str) else None


def _expiry(rec: Recording, now: datetime) -> str:
    hold = "; on legal hold" if rec.legal_hold else ""
    return f"delete_after {_iso(rec)} <= {now.isoformat()}{hold}"


def _reread(rec: Recording, outcomes: list[Outcome]) -> Recording | None:
    """The recording as it is now (another process may have changed or removed it)."""
    if not rec.sidecar.exists():
        return None
    try:
        return read_recording(rec.sidecar)
    except StorageError as exc:
        outcomes.append(_unreadable(rec.sidecar, exc))
        return None


def _unreadable(path: Path, exc: StorageError) -> Outcome:
    rec = Recording(path, None, "?", None, legal_hold=False, document={})
    return Outcome(rec, "error", str(exc))


__all__ = ["Archive", "Outcome", "Recording", "party_matches", "read_recording", "sidecars"]
