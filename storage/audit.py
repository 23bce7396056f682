"""``OUT/audit.jsonl``: the append-only, hash-chained log of what happened to every recording.

One JSON object per line::

    {"seq": 7, "time": "2026-01-02T03:04:05.678Z", "event": "recording_published",
     "fields": {"call_uid": "…"}, "files": {"wav": {"path": "2026/01/02/…wav",
     "sha256": "…"}, "sidecar": {…}}, "prev": "<64 hex>"}

``prev`` is the SHA-256 of the previous line's bytes (without its newline; the first line
has 64 zeros), so editing, inserting or removing any line breaks the chain at the next one,
and ``seq`` counts lines from 1 so a cut-off tail shows up as missing files instead.
``files`` paths are relative to the output directory; for recordings they carry the hashes
that ``callcap verify`` recomputes.  Entries name a call only by ``call_uid``: no number or
URI of a party is written here, so erasing a data subject's recordings leaves nothing of
them in a log that by design can never be edited.

Several processes append (the daemon, ``callcap hold``, ``callcap retention sweep``): each
append holds an exclusive ``flock`` (on the output directory) while it reads the last line
and writes the next, the file is opened ``O_APPEND`` and every line is written with one
``write`` and fsynced before the lock is released.  :meth:`AuditLog.locked` holds the same
lock across a whole read-check-change-log step, which is what stops a sweep deleting a
recording that ``callcap hold add`` is putting on hold at that moment, or one whose
publication is not logged yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callcap.errors import StorageError, storage_error
from callcap.storage.layout import ensure_dir
from callcap.storage.publish import fsync_dir
from callcap.storage.sidecar import iso_utc

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64

RECORDING_PUBLISHED = "recording_published"
RECORDING_DISCARDED = "recording_discarded"
CONSENT_DECIDED = "consent_decided"
PAUSE = "pause"
HOLD_ADDED = "hold_added"
HOLD_REMOVED = "hold_removed"
RECORDING_DELETED = "recording_deleted"
RECORDING_ERASED = "recording_erased"

EVENTS = frozenset(
    {
        RECORDING_PUBLISHED,
        RECORDING_DISCARDED,
        CONSENT_DECIDED,
        PAUSE,
        HOLD_ADDED,
        HOLD_REMOVED,
        RECORDING_DELETED,
        RECORDING_ERASED,
    }
)
#: Events after which a recording's files are gone on purpose.
REMOVALS = frozenset({RECORDING_DELETED, RECORDING_ERASED})

_TAIL_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file of a recording as the log knows it: path relative to the output directory."""

    path: str
    sha256: str


def line_hash(line: bytes) -> str:
    """SHA-256 of one log line without its newline: the next line's ``prev``."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _last_line(fd: int) -> tuple[bytes | None, int]:
    """The file's last complete line and its 1-based number (``None, 0`` when empty).

    Reads backwards from the end, so appending stays O(1) however long the log grows.  A
    torn last line (a crash mid-write, no newline) is returned as it is: the next entry
    chains onto its bytes and ``callcap verify`` reports the torn line.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None, 0
    tail = b""
    pos = size
    while True:
        start = max(0, pos - _TAIL_BLOCK)
        tail = os.pread(fd, pos - start, start) + tail
        pos = start
        body = tail[:-1] if tail.endswith(b"\n") else tail
        cut = body.rfind(b"\n")
        if cut >= 0 or pos == 0:
            line = body[cut + 1 :]
            break
    seq = 0
    with contextlib.suppress(ValueError, TypeError, KeyError):
        seq = int(json.loads(line)["seq"])
    if seq <= 0:  # unparseable last line: count lines the slow way
        seq = _count_lines(fd)
    return line, seq


def _count_lines(fd: int) -> int:
    count = 0
    offset = 0
    last = b"\n"
    while block := os.pread(fd, 1 << 20, offset):
        count += block.count(b"\n")
        offset += len(block)
        last = block[-1:]
    return count + (0 if last == b"\n" else 1)


class AuditWriter:
    """Appends while :meth:`AuditLog.locked` holds the lock (one process at a time).

    The log file is opened on the first append, so taking the lock to publish a call that
    leaves no files behind does not create an empty log.
    """

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self.relative_to = log.out_dir
        self._fd: int | None = None
        self._prev = GENESIS
        self._seq = 0
        self._torn = False

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        path = self._log.path
        created = not path.exists()
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self._log.file_mode
            )
            if created:
                fsync_dir(self._log.out_dir)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
        self._fd = fd
        line, self._seq = _last_line(fd)
        if line is not None:
            self._prev = line_hash(line)
            size = os.lseek(fd, 0, os.SEEK_END)
            self._torn = os.pread(fd, 1, size - 1) != b"\n"
        return fd

    def sync(self) -> None:
        """Make the entries appended with ``sync=False`` durable."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot sync the audit log: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def ref(self, path: Path, sha256: str | None = None) -> FileRef:
        """A :class:`FileRef` for ``path`` (hashing it unless the hash is known)."""
        rel = path.relative_to(self.relative_to).as_posix()
        return FileRef(rel, sha256 if sha256 is not None else file_sha256(path))

    def append(
        self,
        event: str,
        fields: Mapping[str, Any],
        files: Mapping[str, FileRef] | None = None,
        *,
        now: float | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """Append one entry; with ``sync=False`` it is durable only after :meth:`sync`
        (a batch of entries then costs one fsync)."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        fd = self._open()
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": iso_utc(time.time() if now is None else now),
            "event": event,
            "fields": dict(fields),
        }
        if files:
            entry["files"] = {
                role: {"path": ref.path, "sha256": ref.sha256} for role, ref in files.items()
            }
        entry["prev"] = self._prev
        try:
            line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise StorageError(f"cannot serialise audit entry {event}: {exc}") from exc
        data = (b"\n" if self._torn else b"") + line + b"\n"
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except OSError as exc:
            # A line cut short (the disk filled mid-write) is taken back, so the chain stays
            # whole for the next append; if even that fails the next append starts a new line.
            try:
                os.ftruncate(fd, size)
            except OSError:
                self._torn = True
            message = f"cannot append to the audit log: {exc.strerror or exc}"
            raise storage_error(message, exc.errno) from exc
        self._torn = False
        self._prev = line_hash(line)
        self._seq += 1
        return entry


#: Descriptors of archive locks this process holds or waits for.  A process forked
#: meanwhile (the daemon starting or restarting a worker while a thread of it recovers or
#: sweeps) gets copies of them, and an ``flock`` lasts as long as any copy is open: so the
#: child closes its copies at once, or the lock would never be released.
_LOCK_FDS: set[int] = set()
_LOCK_FDS_GUARD = threading.Lock()  # no fork between opening a descriptor and listing it


def _close_lock_copies() -> None:
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _LOCK_FDS_GUARD.release()


os.register_at_fork(
    before=_LOCK_FDS_GUARD.acquire,
    after_in_parent=_LOCK_FDS_GUARD.release,
    after_in_child=_close_lock_copies,
)


class AuditLog:
    """The audit log of one output directory; append with ``with log.locked() as w:``."""

    def __init__(self, out_dir: Path, *, file_mode: int = 0o640, dir_mode: int = 0o750) -> None:
        self.out_dir = out_dir
        self.path = out_dir / AUDIT_FILE
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    @contextlib.contextmanager
    def locked(self) -> Iterator[AuditWriter]:
        """Hold the archive's exclusive lock: it may be changed and logged meanwhile.

        The lock is an ``flock`` on the output directory itself, which every process that
        changes the archive opens, so no lock file has to exist beside the recordings.
        """
        try:
            ensure_dir(self.out_dir, self.dir_mode)
            with _LOCK_FDS_GUARD:
                dir_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                _LOCK_FDS.add(dir_fd)
        except OSError as exc:
            raise StorageError(f"cannot open {self.out_dir}: {exc.strerror or exc}") from exc
        writer = AuditWriter(self)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            yield writer
        finally:
            writer.close()
            with _LOCK_FDS_GUARD:
                _LOCK_FDS.discard(dir_fd)
                os.close(dir_fd)  # closing releases the flock


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line as read back: its number, bytes, and the entry or why it is not one."""

    number: int
    raw: bytes
    entry: dict[str, Any] | None
    problem: str | None


def read_log(path: Path) -> Iterator[LogLine]:
    """Every line of an audit log, parsed; a missing log reads as empty."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n")
            try:
                entry = json.loads(line)
            except (UnicodeDecodeError, ValueError) as exc:
                yield LogLine(number, line, None, f"not a JSON object ({exc})")
                continue
            if not isinstance(entry, dict):
                yield LogLine(number, line, None, "not a JSON object")
                continue
            yield LogLine(number, line, entry, None)


__all__ = [
    "AUDIT_FILE",
    "EVENTS",
    "GENESIS",
    "AuditLog",
    "AuditWriter",
    "FileRef",
    "LogLine",
    "file_sha256",
    "line_hash",
    "read_log",
]
