"""What a run published: every sidecar under an output directory (validated against the
schema) with its audio, by Call-ID."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from callcap.storage.sidecar import validate_sidecar


def published(out: Path) -> dict[str, tuple[dict[str, Any], np.ndarray | None]]:
    """Call-ID → (sidecar, int16 audio or None) of everything published under ``out``."""
    found: dict[str, tuple[dict[str, Any], np.ndarray | None]] = {}
    for sidecar in out.rglob("*.json"):
        if ".spool" in sidecar.parts:
            continue
        doc = json.loads(sidecar.read_text())
        validate_sidecar(doc)
        audio = None
        if doc["audio"] is not None:
            audio, _rate = soundfile.read(sidecar.with_suffix(".wav"), dtype="int16")
        found[doc["call_id"]] = (doc, audio)
    return found


__all__ = ["published"]
