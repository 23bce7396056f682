"""One recorder per output directory.

Two recorders on one directory (``./scripts/run`` started while the service is active, a
``callcap record`` into the live archive) would each record every call — two recordings
per call — and each would take the other's spool entries for a crashed run's and publish
them again.  So a daemon or a ``record`` holds an exclusive ``flock`` on the output
directory itself for as long as it runs; a second one is refused, naming the process that
holds it.

The lock is an ``flock`` on a hidden, empty file in the directory, ``.callcap.lock`` (the
directory's own inode is the audit log's append lock, :mod:`callcap.storage.audit`).  It
is never removed, so no process can lock a file another is about to unlink, and there is
no stale lock after a crash: the kernel drops a dead process's locks.  Archive listings,
``verify`` and the sweeper skip hidden names.  Processes forked by the holder (recording
workers) close their copy of the descriptor (:func:`close_inherited`): the holder alone
keeps the lock, so that it can let go of a directory (a reload moved
``recording.out_dir``) while its workers run on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from callcap.errors import StorageError

LOCK_FILE = ".callcap.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


class OutputInUse(StorageError):
    """The output directory is held by another running recorder."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{path} is in use by {who} (a callcap daemon or record writing there); "
            "one recorder per output directory"
        )
        self.path = path
        self.pid = pid


class OutputLock:
    """An exclusive lock on an output directory, held until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputInUse(path, holder(path)) from None
            raise StorageError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        self._fd: int | None = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def close_inherited() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the lock stays
    the parent's, and goes when the parent lets go of it)."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


def holder(path: Path) -> int | None:
    """The PID holding output directory ``path``, from ``/proc/locks`` (None if not found)."""
    try:
        st = os.stat(path / LOCK_FILE)
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234567 0 EOF" (blocked waiters have "->")
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if key == want:
            return pid
    return None


__all__ = ["LOCK_FILE", "OutputInUse", "OutputLock", "close_inherited", "holder"]
