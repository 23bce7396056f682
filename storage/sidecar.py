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
from collections.abc import Mapping
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
        lines = ["/".join(str(p) for p in e.absolute_path) + ": " + e.message for e in errors]
        raise StorageError("sidecar does not match the schema:\n  " + "\n  ".join(lines))


def clean_text(value: str | None, limit: int = 512) -> str | None:
    """Escape what is not printable text and cut to ``limit`` characters (``…[+N]`` marks a cut)."""
    if value is None:
        return None
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF or 0x80 <= code < 0xA0:
            out.append(f"\\u{code:04x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > limit:
        text = f"{text[:limit]}…[+{len(text) - limit}]"
    return text


def iso_utc(ts: float) -> str:
    """Capture time → ``2018-04-09T21:14:09.732Z`` (UTC; microseconds truncated to milliseconds).

    Rounding to whole microseconds first keeps float noise (``…1.0199999``) from moving a
    timestamp into the previous millisecond.
    """
    sec, us = divmod(round(ts * 1_000_000), 1_000_000)
    ms = us // 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ms:03d}Z"
