"""The one exception hierarchy of callcap.

A leaf module with no imports of ours, so ``capture``, ``storage`` and ``config`` may all
raise from it without depending on each other. ``codecs`` imports nothing of ours and raises
plain ``ValueError``; :class:`ParseError` subclasses ``ValueError`` so both are caught alike.
"""

from __future__ import annotations

import errno


class CallcapError(Exception):
    """Base of every error callcap raises on purpose."""


class ParseError(CallcapError, ValueError):
    """Input bytes break a protocol rule.

    ``reason`` is a short snake_case code (``ip_bad_header``, ``sip_no_call_id`` …) that the
    pipeline uses as the drop-counter key and the ``reason`` field of the ``packet_dropped``
    log event; the message says what was expected and what was found.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


class NeedMoreData(CallcapError):
    """A stream parser (TCP-carried SIP) needs more bytes before it can say anything."""


class CaptureError(CallcapError):
    """A capture source cannot be opened or read (missing file, unknown format …)."""


class ConfigError(CallcapError):
    """A configuration file is invalid; the message is ``FILE:LINE: key.path: problem``."""

    def __init__(self, file: str, line: int | None, key: str, problem: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.file = file
        self.line = line
        self.key = key
        self.problem = problem


class StorageError(CallcapError):
    """Writing or publishing a recording failed (disk full, permissions …)."""


class DiskFullError(StorageError):
    """A write failed for lack of space (``ENOSPC``, or ``EDQUOT`` for a quota): the
    recorder then stops audio for the calls in flight and publishes what they hold
    (:mod:`callcap.storage.reserve` says why)."""


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_error(message: str, code: int | None) -> StorageError:
    """The error for a failed write whose C ``errno`` was ``code``: a
    :class:`DiskFullError` when it says the disk (or the quota) is full."""
    return DiskFullError(message) if code in _NO_SPACE else StorageError(message)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or the ``OSError`` it was raised from) says the disk is full."""
    if isinstance(exc, DiskFullError):
        return True
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return isinstance(cause, OSError) and cause.errno in _NO_SPACE
