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
from dataclasses import dataclass
from pathlib import Path

from callcap.errors import StorageError
from callcap.storage.layout import ensure_dir

_BLOCK = 1 << 20


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
    try:
        _fsync_path(part)
        size, digest = _hash(part)
        os.chmod(part, file_mode)
        ensure_dir(final.parent, dir_mode)
        if final.exists():
            raise StorageError(f"{final} already exists; refusing to overwrite a published file")
        os.replace(part, final)
        _fsync_path(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StorageError(f"cannot publish {final}: {exc.strerror or exc}") from exc
    return PublishedFile(final, size, digest)


def write_json_atomic(
    final: Path, obj: object, *, file_mode: int = 0o640, dir_mode: int = 0o750
) -> PublishedFile:
    """Write ``obj`` as UTF-8 JSON to ``final`` through a temporary file in the same directory."""
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
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_path(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    return PublishedFile(final, len(data), hashlib.sha256(data).hexdigest())
