"""Room kept back on the output filesystem so that a full disk still lets calls be published.

When the disk fills, every call in flight fails its next audio write at about the same
moment, and each of them then needs a few kilobytes more — its sidecar, its audit entries,
a directory entry — to be published as the partial recording it is.  Without room for those,
a full disk would lose every call in flight rather than just the audio after the disk
filled, and a recording could reach the archive without its audit entry.

So the recorder keeps a *reserve*: a file of ``size`` bytes in the spool, allocated
(``posix_fallocate``, so the blocks are really taken) when recording starts, one per
process writing to the archive.  The rule: on the first write that fails for lack of space
every reserve in the spool is released, audio writing stops for the calls in flight (their
recordings end where their audio ends; the other processes stop theirs when they find
their reserve gone, at their next flush), and the freed room is what the sidecars and
audit entries are written into.  Once the filesystem again has room for the reserve and as
much again (above ``storage.min_free``), each process takes its reserve back and new calls
are recorded again.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from pathlib import Path

from callcap.errors import StorageError
from callcap.storage.layout import ensure_dir
from callcap.storage.spool import RESERVE

_CHUNK = 1 << 20


_numbers = itertools.count(1)


class DiskReserve:
    """One reserve file; ``held`` says whether its blocks are taken.

    It lives in the spool's ``reserve/`` directory as ``<pid>-<n>``, so that spool recovery
    (:func:`~callcap.storage.spool.recover_spool`) removes what a crashed process left.
    """

    def __init__(self, spool: Path, size: int, *, file_mode: int = 0o600) -> None:
        self.path = spool / RESERVE / f"{os.getpid()}-{next(_numbers)}"
        self.size = size
        self.file_mode = file_mode
        self.held = False

    def take(self) -> bool:
        """Allocate the reserve (again); False, with nothing left behind, when there is no
        room for it yet.  A size of 0 keeps no reserve and always succeeds."""
        if self.size <= 0 or self.held:
            self.held = self.size > 0
            return True
        try:
            ensure_dir(self.path.parent, 0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise StorageError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        try:
            _allocate(fd, self.size)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise StorageError(f"cannot reserve {self.path}: {exc.strerror or exc}") from exc
        os.close(fd)
        self.held = True
        return True

    def release(self) -> None:
        """Give the reserve's blocks back to the filesystem (idempotent)."""
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release_all(self) -> int:
        """Release this reserve and every other one in the spool: the disk is full for every
        process writing to it (the workers of one daemon), and each of them, finding its
        reserve gone (:meth:`lost`), stops its calls' audio too.  How many were released."""
        self.release()
        released = 1
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    released += 1
        return released

    def close(self) -> None:
        """Release the reserve and remove its directory, and the spool, if they are left
        empty: a run that recorded nothing leaves nothing behind."""
        self.release()
        for directory in (self.path.parent, self.path.parent.parent):
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty (another process's reserve, calls in the spool) or gone

    def lost(self) -> bool:
        """Whether the reserve is held but its file is gone: another process released it."""
        return self.held and not os.path.exists(self.path)


def disk_space(path: Path) -> tuple[int, int] | None:
    """``(available, total)`` bytes of ``path``'s filesystem, as an unprivileged writer
    sees them (root's reserved blocks are not counted as available); None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        zeros = bytes(_CHUNK)  # a filesystem without fallocate: write the blocks instead
        done = 0
        while done < size:
            done += os.write(fd, zeros[: min(_CHUNK, size - done)])
