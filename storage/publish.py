"""Files appear whole or not at all: write aside, fsync, rename, fsync the directory.

A downstream tool (speech analytics, QA, search) watching the output tree must never read a
half-written recording.  Audio is renamed into place first and the sidecar last, so a
``.json`` always has its complete ``.wav`` beside it; the sidecar carries the WAV's SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from callcap.errors import StorageError, storage_error
from callcap.storage.layout import ensure_dir

_BLOCK = 1 << 20

K = TypeVar("K")
T = TypeVar("T")

_reserved: set[Path] = set()
_reserved_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class PublishedFile:
    path: Path
    size: int
    sha256: str


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new, renamed or removed name) survive a power cut."""
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def _hash(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def seal_file(part: Path, *, file_mode: int = 0o640) -> tuple[int, str]:
    """Make ``part`` durable and give it its final mode; its size and SHA-256.

    The slow half of publishing (an fsync and a read of the whole file), which needs no
    lock: the part is still in the spool, where no reader looks.
    """
    try:
        _fsync_path(part)
        size, digest = _hash(part)
        os.chmod(part, file_mode)
    except OSError as exc:
        raise StorageError(f"cannot publish {part}: {exc.strerror or exc}") from exc
    return size, digest


def place_file(part: Path, final: Path, *, dir_mode: int = 0o750) -> None:
    """Rename a sealed ``part`` to ``final`` (which must not exist); the caller fsyncs the
    directory (:func:`fsync_dir`) once the names it places there are all in."""
    try:
        ensure_dir(final.parent, dir_mode)
        if final.exists():
            raise StorageError(f"{final} already exists; refusing to overwrite a published file")
        os.replace(part, final)
    except OSError as exc:
        raise StorageError(f"cannot publish {final}: {exc.strerror or exc}") from exc


def publish_file(
    part: Path, final: Path, *, file_mode: int = 0o640, dir_mode: int = 0o750
) -> PublishedFile:
    """Make ``part`` durable, hash it, and rename it to ``final`` (which must not exist).

    The order is what makes a crash harmless: until ``os.replace`` the final name does not
    exist and the part stays in the spool; after it, the content is already on disk, and the
    directory fsync makes the new name itself survive a power cut.  The existence check is
    not atomic with the rename; unique names are the caller's job (the recorder adds a
    suffix), this only stops a silent overwrite of a published recording.
    """
    size, digest = seal_file(part, file_mode=file_mode)
    place_file(part, final, dir_mode=dir_mode)
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        raise StorageError(f"cannot publish {final}: {exc.strerror or exc}") from exc
    return PublishedFile(final, size, digest)


@dataclass(frozen=True, slots=True)
class StagedJson:
    """A JSON document written and fsynced beside its final name, not yet renamed to it."""

    tmp: Path
    final: Path
    size: int
    sha256: str

    def commit(self) -> PublishedFile:
        """Rename into place (the caller fsyncs the directory)."""
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.discard()
            raise StorageError(f"cannot write {self.final}: {exc.strerror or exc}") from exc
        return PublishedFile(self.final, self.size, self.sha256)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def stage_json(
    final: Path, obj: object, *, file_mode: int = 0o640, dir_mode: int = 0o750, sync: bool = True
) -> StagedJson:
    """Write ``obj`` as UTF-8 JSON to a hidden temporary file beside ``final``."""
    try:
        data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:  # not JSON-able, or a lone surrogate left in text
        raise StorageError(f"cannot serialise {final.name}: {exc}") from exc
    # Hidden (a watcher globbing *.json never sees it) and unique per process and thread.
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        ensure_dir(final.parent, dir_mode)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, file_mode)
        try:
            os.fchmod(fd, file_mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(f"cannot write {final}: {exc.strerror or exc}", exc.errno) from exc
    return StagedJson(tmp, final, len(data), hashlib.sha256(data).hexdigest())


def write_json_atomic(
    final: Path,
    obj: object,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o750,
    sync: bool = True,
) -> PublishedFile:
    """Write ``obj`` as UTF-8 JSON to ``final`` through a temporary file in the same directory.

    ``sync=False`` skips the fsyncs: the replacement is still atomic for readers and across a
    process crash, and becomes durable with the next sync of the filesystem (the spool's
    checkpoints, made durable all at once by :class:`~callcap.storage.spool.SpoolSync`)."""
    staged = stage_json(final, obj, file_mode=file_mode, dir_mode=dir_mode, sync=sync)
    published = staged.commit()
    if sync:
        try:
            fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    return published


def reserve_stem(stem: Path, suffixes: tuple[str, ...] = (".wav", ".json")) -> Path:
    """A file stem no published file and no publication in progress uses: ``stem``, else
    ``stem-1``, ``stem-2`` … (the same call recorded twice).  Release it with
    :func:`release_stem` once its files are published (or given up)."""
    with _reserved_lock:
        candidate = stem
        n = 1
        while candidate in _reserved or any(
            candidate.with_suffix(suffix).exists() for suffix in suffixes
        ):
            candidate = stem.with_name(f"{stem.name}-{n}")
            n += 1
        _reserved.add(candidate)
        return candidate


def release_stem(stem: Path) -> None:
    with _reserved_lock:
        _reserved.discard(stem)


class BackgroundPublisher(Generic[K, T]):
    """Runs publication jobs (fsync, hash, rename, sidecar) on worker threads.

    Publishing a recording is mostly waiting for the disk: an fsync of the audio, of the
    sidecar and of their directory.  Done inline, a busy recorder spends its time in those
    waits; here they overlap with packet processing and with each other (fsync and hashing
    release the GIL).  Outcomes come back in submission order, each with the ``tag`` it was
    submitted with, on the caller's thread, so logging and callbacks stay single-threaded.
    Jobs start in submission order; a job that must also *finish* in order waits for its
    turn itself (the pipeline's publications do, so the audit log lists recordings in the
    order their calls ended).
    At most ``max_pending`` jobs are in flight; ``submit`` waits for the oldest beyond that.
    """

    def __init__(self, workers: int = 2, max_pending: int = 256) -> None:
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started by the first job
        self._pending: deque[tuple[K, Future[T]]] = deque()
        self._max_pending = max_pending

    def submit(self, tag: K, job: Callable[[], T]) -> None:
        if len(self._pending) >= self._max_pending:
            self._pending[0][1].exception()  # wait for the oldest; collected by completed()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="callcap-publish"
            )
        self._pending.append((tag, self._pool.submit(job)))

    def completed(self, *, wait: bool = False) -> list[tuple[K, T | Exception]]:
        """Finished jobs, oldest first, each returned once: a result or the exception it
        raised.  Stops at the first unfinished job unless ``wait``."""
        done: list[tuple[K, T | Exception]] = []
        pending = self._pending
        while pending and (wait or pending[0][1].done()):
            tag, future = pending.popleft()
            exc = future.exception()
            if exc is None:
                done.append((tag, future.result()))
            elif isinstance(exc, Exception):
                done.append((tag, exc))
            else:
                raise exc
        return done

    def __len__(self) -> int:
        return len(self._pending)

    def shutdown(self) -> None:
        """Stop the worker threads after the jobs in flight (the next ``submit`` starts
        them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
