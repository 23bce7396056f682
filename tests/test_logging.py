"""Logs are one JSON event per line (or console text), and packet drops are rate-limited."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from callcap.logs import RateLimitedDrops, configure_logging, get_logger

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as other tests found them."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _json_stream(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging("json", level, stream=stream)
    return stream


def test_every_json_line_has_utc_millisecond_ts_level_and_event() -> None:
    stream = _json_stream()
    before = dt.datetime.now(dt.UTC)
    log = get_logger("callcap.test")
    log.info("call_ended", call_uid="c0ffee", end_reason="bye", duration_s=12.5)
    log.warning("capture_stats", received=10, dropped=0)
    log.error("storage_failed", path="x.wav")
    after = dt.datetime.now(dt.UTC)

    events = _lines(stream)
    assert [e["event"] for e in events] == ["call_ended", "capture_stats", "storage_failed"]
    assert [e["level"] for e in events] == ["info", "warning", "error"]
    for event in events:
        assert TS.fullmatch(event["ts"])
        ts = dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
        assert ts.utcoffset() == dt.timedelta(0)
        assert before - dt.timedelta(milliseconds=1) <= ts <= after
        assert event["logger"] == "callcap.test"
        assert list(event)[:3] == ["ts", "level", "event"]
    assert events[0]["call_uid"] == "c0ffee"
    assert events[0]["duration_s"] == 12.5


def test_events_below_the_level_are_not_written() -> None:
    stream = _json_stream("warning")
    log = get_logger()
    log.debug("noise")
    log.info("more_noise")
    log.warning("kept")
    assert [e["event"] for e in _lines(stream)] == ["kept"]


def test_exception_is_a_structured_field_on_one_line() -> None:
    stream = _json_stream()
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError:
        get_logger().exception("pipeline_error", call_uid="abc")
    text = stream.getvalue()
    assert text.count("\n") == 1
    (event,) = _lines(stream)
    assert event["level"] == "error"
    assert event["event"] == "pipeline_error"
    (exc,) = event["exception"]
    assert exc["exc_type"] == "KeyError"
    assert exc["exc_value"] == "'missing'"
    assert exc["frames"][-1]["name"] == "test_exception_is_a_structured_field_on_one_line"
    assert "locals" not in exc["frames"][-1]


def test_values_json_cannot_hold_are_rendered_as_text() -> None:
    stream = _json_stream()

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    get_logger().info(
        "odd_values",
        payload=b"INVITE \xff\x00",
        path=Path("rec") / "a.wav",
        nan=float("nan"),
        inf=float("inf"),
        ports=frozenset({5060}),
        when=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        thing=Opaque(),
        nested={"k": [b"\x01", (1, 2)], 3: "int key"},
    )
    (event,) = _lines(stream)
    assert event["payload"] == "INVITE \\xff\x00"
    assert event["path"] == str(Path("rec") / "a.wav")
    assert (event["nan"], event["inf"]) == ("nan", "inf")
    assert event["ports"] == [5060]
    assert event["when"] == "2024-01-02T03:04:05+00:00"
    assert event["thing"] == "<opaque>"
    assert event["nested"] == {"k": ["\x01", [1, 2]], "3": "int key"}


def test_reconfiguring_moves_existing_loggers_to_the_new_output() -> None:
    first = _json_stream()
    log = get_logger("callcap.daemon")  # obtained before the reload, as the daemon does
    log.info("before_reload")
    second = io.StringIO()
    configure_logging("json", "info", stream=second)
    configure_logging("json", "info", stream=second)  # a second call changes nothing
    log.info("after_reload")
    logging.getLogger("somelib").warning("library says %s", "hi")
    assert [e["event"] for e in _lines(first)] == ["before_reload"]
    assert [e["event"] for e in _lines(second)] == ["after_reload", "library says hi"]


def test_standard_library_records_become_json_events() -> None:
    stream = _json_stream()
    logging.getLogger("some.library").error("disk %s is full", "/var")
    (event,) = _lines(stream)
    assert event["event"] == "disk /var is full"
    assert event["level"] == "error"
    assert event["logger"] == "some.library"
    assert TS.fullmatch(event["ts"])


def test_default_output_is_the_current_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger().info("daemon_started", pid=1)
    captured = capsys.readouterr()
    assert captured.err == ""
    (line,) = captured.out.splitlines()
    assert json.loads(line)["event"] == "daemon_started"


def test_console_format_renders_event_fields_and_traceback() -> None:
    stream = io.StringIO()
    configure_logging("console", "debug", stream=stream)
    log = get_logger("callcap.record")
    log.info("call_ended", call_uid="c0ffee", payload=b"\x00")
    try:
        1 / 0  # noqa: B018 — raising on purpose
    except ZeroDivisionError:
        log.exception("pipeline_error")
    text = stream.getvalue()
    first = text.splitlines()[0]
    assert TS.match(first)
    assert "call_ended" in first
    assert "call_uid=c0ffee" in first
    assert "callcap.record" in first
    assert "\x1b[" not in text  # no colour codes when the output is not a terminal
    assert "ZeroDivisionError: division by zero" in text


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "loud")])
def test_unknown_format_or_level_is_refused(fmt: Any, level: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(fmt, level, stream=io.StringIO())


# --- rate-limited drop logging ----------------------------------------------------------


def _drops(interval: float = 10.0) -> tuple[RateLimitedDrops, io.StringIO]:
    stream = _json_stream()
    return RateLimitedDrops(get_logger("callcap.pipeline"), interval_s=interval), stream


def _dropped(stream: io.StringIO) -> list[tuple[str, int, int]]:
    events = _lines(stream)
    assert all(e["event"] == "packet_dropped" and e["level"] == "warning" for e in events)
    return [(e["reason"], e["count"], e["total"]) for e in events]


def test_first_drop_logs_at_once_then_repeats_wait_for_the_interval() -> None:
    drops, stream = _drops(10.0)
    drops.drop("rtp_bad_version", 100.0, src="10.0.0.1:4000")
    assert _dropped(stream) == [("rtp_bad_version", 1, 1)]
    for t in (101.0, 105.0, 109.9):
        drops.drop("rtp_bad_version", t)
    assert len(_dropped(stream)) == 1  # suppressed within the interval
    drops.drop("rtp_bad_version", 110.0, src="10.0.0.2:4000")
    assert _dropped(stream) == [("rtp_bad_version", 1, 1), ("rtp_bad_version", 4, 5)]
    assert _lines(stream)[-1]["src"] == "10.0.0.2:4000"
    assert drops.totals["rtp_bad_version"] == 5


def test_each_reason_has_its_own_interval() -> None:
    drops, stream = _drops(10.0)
    drops.drop("ip_bad_header", 0.0)
    drops.drop("sip_no_call_id", 1.0)
    drops.drop("ip_bad_header", 2.0)
    assert _dropped(stream) == [("ip_bad_header", 1, 1), ("sip_no_call_id", 1, 1)]
    assert drops.totals == {"ip_bad_header": 2, "sip_no_call_id": 1}


def test_flush_logs_what_is_pending_and_only_that() -> None:
    drops, stream = _drops(10.0)
    drops.drop("b_reason", 0.0)
    drops.drop("a_reason", 0.0)
    drops.drop("b_reason", 1.0, detail="short packet")
    drops.drop("b_reason", 2.0)
    drops.flush(3.0)
    assert _dropped(stream) == [("b_reason", 1, 1), ("a_reason", 1, 1), ("b_reason", 2, 3)]
    drops.flush(4.0)  # nothing new
    assert len(_dropped(stream)) == 3


def test_time_going_backwards_restarts_the_interval() -> None:
    drops, stream = _drops(10.0)
    drops.drop("x", 1000.0)
    drops.drop("x", 5.0)  # a second capture file starting earlier
    drops.drop("x", 14.0)
    drops.drop("x", 15.0)
    assert _dropped(stream) == [("x", 1, 1), ("x", 3, 4)]


def test_zero_interval_logs_every_drop() -> None:
    drops, stream = _drops(0.0)
    for _ in range(3):
        drops.drop("y", 7.0)
    assert _dropped(stream) == [("y", 1, 1), ("y", 1, 2), ("y", 1, 3)]


def test_context_cannot_clobber_the_counts() -> None:
    drops, stream = _drops()
    drops.drop("z", 0.0, count=99, total=99, detail="kept")
    (event,) = _lines(stream)
    assert (event["reason"], event["count"], event["total"], event["detail"]) == ("z", 1, 1, "kept")
