"""Where recordings live: ``OUT/YYYY/MM/DD/HHMMSS_<call_uid>.{wav,json}`` and the spool.

No header text ever reaches a path: the file name is built from the call's start time and
``call_uid``, a hash of the call's identity in base32 (lower case, no padding), which is
safe on every filesystem and stable for the same call across runs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

SPOOL = ".spool"


def make_call_uid(call_id: str, from_tag: str | None, start_ts: float) -> str:
    """16 characters of ``[a-z2-7]`` identifying one call (80 bits of SHA-256)."""
    material = "\x00".join((call_id, from_tag or "", str(round(start_ts * 1_000_000))))
    try:  # header text decoded with surrogateescape hashes as the bytes on the wire
        raw = material.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a byte
        raw = material.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).digest()
    return base64.b32encode(digest[:10]).decode("ascii").lower()


def recording_stem(out_dir: Path, start_ts: float, call_uid: str) -> Path:
    """``out_dir/YYYY/MM/DD/HHMMSS_<call_uid>`` from the call's start time in UTC."""
    t = time.gmtime(start_ts)
    return (
        out_dir
        / f"{t.tm_year:04d}"
        / f"{t.tm_mon:02d}"
        / f"{t.tm_mday:02d}"
        / f"{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}_{call_uid}"
    )


def unique_stem(stem: Path) -> Path:
    """Never overwrite a published recording: the same call recorded twice gets a suffix."""
    candidate = stem
    n = 1
    while candidate.with_suffix(".wav").exists() or candidate.with_suffix(".json").exists():
        candidate = stem.with_name(f"{stem.name}-{n}")
        n += 1
    return candidate


def spool_dir(out_dir: Path) -> Path:
    """In-flight audio lives here: same filesystem as the output, so publishing is a rename."""
    return out_dir / SPOOL


def ensure_dir(path: Path, mode: int = 0o750) -> None:
    """``mkdir -p`` giving every directory it creates exactly ``mode``, whatever the umask."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, mode)
