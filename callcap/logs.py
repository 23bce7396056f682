"""Structured logging: events with fields, rendered once at the edge as JSON lines or for humans.

Code logs ``log.info("call_ended", call_uid=…, end_reason=…)`` — an event name and values,
never a formatted sentence — so a log shipper can filter on ``event`` and count on fields.
The renderer is chosen by :func:`configure_logging` at start-up (and again on reload).

JSON mode writes exactly one object per line (``{"ts", "level", "event", …fields}``): an
exception becomes a structured ``exception`` field, never a multi-line traceback that would
split into several journald entries, and a value JSON cannot hold (bytes, a path, NaN) is
rendered as text instead of losing the whole event. Records from the standard ``logging``
module (third-party libraries) go through the same renderer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import PurePath
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from callcap.storage.sidecar import iso_utc

__all__ = ["RateLimitedDrops", "configure_logging", "get_logger"]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_HEAD = ("ts", "level", "event", "logger")
_NAME_KEY = "_logger_name"
_MAX_DEPTH = 8
_DROP_FIELDS = frozenset({"reason", "count", "total"})


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is *now*.

    Binding the object present at configure time would break when it is later replaced
    (test capture, a daemon redirecting its output) and then closed.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()


def _add_timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Wall-clock time of the log event, ISO 8601 UTC to the millisecond (RFC 3339)."""
    event_dict["ts"] = iso_utc(time.time())
    return event_dict


def _name_field(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Expose the name given to :func:`get_logger` as ``logger``, as stdlib records have it."""
    if _NAME_KEY in event_dict:
        event_dict["logger"] = event_dict.pop(_NAME_KEY)
    return event_dict


def _head_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put ts, level, event and logger first so a human scanning raw JSON lines finds them."""
    head = {key: event_dict.pop(key) for key in _HEAD if key in event_dict}
    head.update(event_dict)
    return head


def _json_default(obj: object) -> Any:
    """Text for what ``json`` cannot encode; called by ``json.dumps`` for unknown types."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return list(obj)
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    return repr(obj)


def _sanitise(obj: object, depth: int = 0) -> Any:
    """A copy of ``obj`` that strict JSON can hold, for when plain encoding failed."""
    if depth > _MAX_DEPTH:
        return repr(obj)
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(key): _sanitise(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitise(value, depth + 1) for value in obj]
    try:
        converted = _json_default(obj)
    except Exception:  # noqa: BLE001 — a broken __repr__/tolist must not lose the event
        return f"<unrepresentable {type(obj).__name__}>"
    return converted if isinstance(converted, str) else _sanitise(converted, depth + 1)


def _dumps(obj: Any, **_: Any) -> str:
    """Strict JSON (no NaN), ASCII-only so any output encoding can carry it."""
    try:
        return json.dumps(obj, default=_json_default, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(_sanitise(obj), ensure_ascii=True, allow_nan=False)


def _renderers(fmt: str, stream: TextIO) -> list[Processor]:
    if fmt == "json":
        return [
            # Locals of every frame would copy packet payloads and SIP headers into logs.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            _head_first,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    if fmt == "console":
        try:
            colors = stream.isatty()
        except (AttributeError, ValueError):
            colors = False
        return [structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="ts")]
    raise ValueError(f"log format must be 'json' or 'console', got {fmt!r}")


class _CallcapHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler we install so a reconfigure replaces it and nothing else."""


LogFormat = Literal["json", "console"]


def configure_logging(
    fmt: LogFormat = "json",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Choose the renderer, level and output; safe to call again (config reload).

    ``stream=None`` means the process's standard output at the time of each write (the
    daemon under systemd); the ``record`` command passes ``sys.stderr`` so that standard
    output carries only the paths of written recordings.
    """
    try:
        level_no = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}") from None
    out: TextIO = stream if stream is not None else _CurrentStdout()  # type: ignore[assignment]
    renderers = _renderers(fmt, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _name_field,
        structlog.processors.add_log_level,
        _add_timestamp,
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[*shared, *renderers],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        context_class=dict,
        # Not cached: loggers obtained before a reload must follow the new configuration.
        cache_logger_on_first_use=False,
    )
    handler = _CallcapHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                _add_timestamp,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CallcapHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger | Any:
    """A logger whose events carry ``logger=name``; follows later reconfiguration."""
    if name is None:
        return structlog.get_logger()
    # ``logger`` is a parameter name of structlog.get_logger; _name_field renames it back.
    return structlog.get_logger(**{_NAME_KEY: name})


class RateLimitedDrops:
    """Counts dropped packets per reason and logs `packet_dropped` (reason, count since last
    log, total) at most once per interval per reason, by capture time or wall time passed in.

    A malformed packet costs one counter increment, not one log line: a flood of garbage on
    a SPAN port must not turn into a flood of log I/O. The first drop of a reason is logged at
    once (so a new problem shows up immediately); later ones accumulate until the interval
    has passed and the next drop of that reason arrives, or until :meth:`flush`. Time comes
    in as an argument so replaying a capture file rate-limits by capture time. If time goes
    backwards (files concatenated, clock stepped) the interval restarts from the new time.
    """

    def __init__(self, logger: Any, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.totals: Counter[str] = Counter()
        self._pending: dict[str, int] = {}
        self._context: dict[str, dict[str, object]] = {}
        self._last_logged: dict[str, float] = {}

    def drop(self, reason: str, now: float, **context: object) -> None:
        """Count one drop; log it if this reason was quiet for ``interval_s``."""
        self.totals[reason] += 1
        self._pending[reason] = self._pending.get(reason, 0) + 1
        last = self._last_logged.get(reason)
        if last is None or now - last >= self.interval_s:
            self._emit(reason, now, context)
            return
        if now < last:
            self._last_logged[reason] = now
        self._context[reason] = context

    def flush(self, now: float) -> None:
        """Log every reason with drops not yet logged (at shutdown / end of capture)."""
        for reason in sorted(self._pending):
            self._emit(reason, now, self._context.get(reason, {}))

    def _emit(self, reason: str, now: float, context: dict[str, object]) -> None:
        count = self._pending.pop(reason)
        self._context.pop(reason, None)
        self._last_logged[reason] = now
        extra = {key: value for key, value in context.items() if key not in _DROP_FIELDS}
        self.logger.warning(
            "packet_dropped", reason=reason, count=count, total=self.totals[reason], **extra
        )
