"""Recording on more than one core: worker processes, each recording its share of the calls.

Why processes, and why every worker sees every frame.  Python runs one thread at a time, so
more cores mean more processes.  The kernel could split the traffic between them
(``PACKET_FANOUT`` by a flow hash), but a call is not a flow: its two directions, its RTCP,
and every later media change (a re-INVITE to new ports, a new SSRC after a transfer, a NAT
that picks another source port) are different flows that a hash scatters over workers, while
the call must land in one file, time-aligned.  A classifier process handing frames to
recorders through shared memory would copy every frame once more and put one more process
between the ring and the disk.  So instead:

- each worker has its own capture ring (or reads the capture file itself) and sees every
  frame;
- each worker follows *all* SIP and all media routes (SIP is a tiny share of the traffic),
  so it knows which call every RTP packet belongs to;
- only the call's owner — :func:`~callcap.sharding.owner_of` its Call-ID — records it; the
  other workers drop its media in the fast lane's block lookup, a fraction of a microsecond
  per frame, counted as ``rtp_other_worker``.

The kernel copies each frame into every worker's ring; at 200,000 packets/s that is a few
per cent of a core per worker, bought back many times by a recorder per core.  Spool files
are named by the writer's PID, so crash recovery already tells the workers' entries apart,
and the audit log is one chain whatever process appends to it (it is locked per append).

This module is the plumbing shared by ``callcap daemon`` and ``callcap record --workers``:
starting a worker with a message pipe back to its parent, and making sure a worker never
outlives the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from callcap.storage.lock import close_inherited

MAX_AUTO_WORKERS: Final = 8
_PR_SET_PDEATHSIG: Final = 1

Message = tuple[Any, ...]


def worker_count(setting: int | None) -> int:
    """``capture.workers`` as a number: null means one per core this process may run on."""
    if setting is not None:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has sched_getaffinity
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (prctl
    PR_SET_PDEATHSIG), so that a worker whose master was killed finishes its calls and
    exits instead of recording on, unsupervised."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the pipe's EOF still tells
        pass


@dataclass(slots=True)
class Worker:
    """A started worker process and the parent's end of its message pipe."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    last_heard: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    inbox: list[Message] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, message: Message) -> bool:
        try:
            self.conn.send(message)
        except (OSError, ValueError, BrokenPipeError):
            return False
        return True

    def receive(self) -> list[Message]:
        """Every message waiting now (none once the worker is gone)."""
        out = self.inbox
        self.inbox = []
        try:
            while self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            pass
        return out

    def wait_for(self, kind: str, key: Any, timeout: float) -> Message | None:
        """The next message ``(kind, key, …)`` (any ``kind`` message when ``key`` is None);
        others received meanwhile are kept for :meth:`receive`."""
        deadline = _now() + timeout
        while True:
            left = deadline - _now()
            if left <= 0:
                return None
            try:
                if not self.conn.poll(left):
                    return None
                message = self.conn.recv()
            except (EOFError, OSError):
                return None
            if message[0] == kind and (key is None or (len(message) >= 2 and message[1] == key)):
                return tuple(message)
            self.inbox.append(message)


def start_worker(index: int, target: Callable[..., int], args: tuple[Any, ...]) -> Worker:
    """Fork a worker running ``target(conn, *args)``; its return value is its exit status.

    Forked, not spawned: the child starts with the parent's imports and configuration
    already in memory, in milliseconds.
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(
        target=_run, args=(target, child, args), name=f"callcap-worker-{index}", daemon=False
    )
    process.start()
    child.close()
    return Worker(index, process, parent, last_heard=_now())


def _run(
    target: Callable[..., int], conn: multiprocessing.connection.Connection, args: Any
) -> None:
    die_with_parent()
    close_inherited()  # the output directory's lock is the parent's
    status = 70  # EX_SOFTWARE, if the target raises
    try:
        status = target(conn, *args)
    finally:
        conn.close()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)


def wait_any(workers: list[Worker], timeout: float) -> None:
    """Sleep until a worker has a message or exits, or ``timeout`` passes."""
    handles: list[Any] = [w.conn for w in workers]
    handles += [w.process.sentinel for w in workers]
    if handles:
        multiprocessing.connection.wait(handles, timeout)


def _now() -> float:
    import time

    return time.monotonic()


__all__ = ["Worker", "die_with_parent", "start_worker", "wait_any", "worker_count"]
