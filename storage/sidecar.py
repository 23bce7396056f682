"""The per-call JSON sidecar: its schema, validation, and safe text for hostile header values.

The schema (``sidecar.schema.json``, JSON Schema 2020-12) is the contract with downstream
tools; ``callcap schema`` prints it and every sidecar the test suite produces is validated
against it.  Header values come from the network: :func:`clean_text` turns undecodable
bytes and control characters into visible escapes and bounds their length, so a sidecar is
always valid UTF-8 of bounded size whatever a peer sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from callcap.errors import StorageError

SCHEMA_VERSION = 1


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return (
        resources.files("callcap.storage")
        .joinpath("sidecar.schema.json")
        .read_text(encoding="utf-8")
    )


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator, FormatChecker

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def validate_sidecar(doc: Mapping[str, Any]) -> None:
    """Raise :class:`StorageError` naming every place ``doc`` breaks the schema."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
        raise StorageError("sidecar does not match the schema:\n  " + "\n  ".join(lines))


def _json_path(parts: Iterable[str | int]) -> str:
    """``$.streams[0].ssrc``: where in the document an error is."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def clean_text(value: str | None, limit: int = 512) -> str | None:
    """Make a header value safe to store: visible escapes, bounded length.

    SIP text is decoded with ``surrogateescape``, so a byte that was not UTF-8 arrives as a
    lone surrogate U+DC80-U+DCFF and becomes ``\\xNN``; every other character that is not
    printable (C0/C1 controls incl. NUL, other surrogates, bidi overrides and other format
    characters, line separators, unassigned code points) becomes ``\\uNNNN`` (``\\UNNNNNNNN``
    beyond the BMP), and a backslash is doubled so an escape can't be forged.  The result is
    cut to ``limit`` characters with ``…[+N]`` (N characters cut) appended.  It is valid
    UTF-8 text for JSON and logs — and still never a path component: layout uses none.
    """
    if value is None:
        return None
    if not (value.isprintable() and "\\" not in value):
        out: list[str] = []
        for ch in value:
            if ch.isprintable():
                out.append("\\\\" if ch == "\\" else ch)
                continue
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        value = "".join(out)
    if len(value) > limit:
        value = f"{value[:limit]}…[+{len(value) - limit}]"
    return value


def iso_utc(ts: float) -> str:
    """Capture time → ``2018-04-09T21:14:09.732Z`` (UTC; microseconds truncated to milliseconds).

    Rounding to whole microseconds first keeps float noise (``…1.0199999``) from moving a
    timestamp into the previous millisecond.
    """
    sec, us = divmod(round(ts * 1_000_000), 1_000_000)
    ms = us // 1000
    text = _SECONDS.get(sec)
    if text is None:
        # Every call in flight is checkpointed each second with times of the same few
        # seconds: formatting each second once saves most of the cost of a checkpoint.
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        text = _SECONDS[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{text}.{ms:03d}Z"


_SECONDS: dict[int, str] = {}
