"""``callcap verify``: recompute every hash and the audit chain, and say exactly what differs.

Three layers of evidence are checked, each against the one that vouches for it:

* the chain — line N's ``prev`` must be the SHA-256 of line N-1 and its ``seq`` must be N,
  so an edited, inserted or removed line breaks the chain right after it;
* the files — the newest audit entry naming a file holds its SHA-256 (a sidecar rewritten
  for a legal hold is logged with its new hash), so an altered WAV or sidecar differs, a
  file without an entry was *added*, and a logged file that is gone without a deletion or
  erasure entry was *removed*;
* the sidecar — it holds its WAV's SHA-256, which catches a WAV altered together with a
  forged log.

Only the archive tree is compared: hidden names (the spool, temporary files) and the log
itself are not recordings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from callcap.storage.audit import AUDIT_FILE, GENESIS, REMOVALS, file_sha256, line_hash, read_log

Kind = Literal["altered", "added", "removed", "chain"]


@dataclass(frozen=True, slots=True)
class Problem:
    kind: Kind
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@dataclass(slots=True)
class VerifyReport:
    files: int = 0
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class _Known:
    sha256: str
    line: int
    call_uid: str | None


def archive_files(out_dir: Path) -> list[str]:
    """Every file of the archive, relative and sorted (hidden names and the log excluded)."""
    found: list[str] = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root)
        for name in sorted(files):
            if name.startswith(".") or (base == out_dir and name == AUDIT_FILE):
                continue
            found.append((base / name).relative_to(out_dir).as_posix())
    return found


def verify(out_dir: Path) -> VerifyReport:
    """Check the chain, every file against its newest audit entry, every WAV against its sidecar."""
    report = VerifyReport()
    hashes: dict[str, str] = {}

    def sha256(rel: str) -> str:  # each file is read once, however many checks use it
        if rel not in hashes:
            hashes[rel] = file_sha256(out_dir / rel)
        return hashes[rel]

    known, removed = _replay_log(out_dir, report)
    on_disk = archive_files(out_dir)
    report.files = len(on_disk)
    present = set(on_disk)
    for rel, entry in sorted(known.items()):
        who = f" (call {entry.call_uid})" if entry.call_uid else ""
        if rel not in present:
            report.problems.append(
                Problem(
                    "removed",
                    rel,
                    f"logged at audit line {entry.line}{who} but missing, "
                    "with no deletion or erasure entry",
                )
            )
            continue
        actual = sha256(rel)
        if actual != entry.sha256:
            report.problems.append(
                Problem(
                    "altered",
                    rel,
                    f"sha256 {actual} differs from {entry.sha256} logged at audit line "
                    f"{entry.line}{who}",
                )
            )
    for rel in on_disk:
        if rel in known:
            continue
        if rel in removed:
            detail = f"deleted at audit line {removed[rel]} but present again"
        else:
            detail = "no audit entry records this file"
        report.problems.append(Problem("added", rel, detail))
    reported = {p.subject for p in report.problems}
    for rel in on_disk:
        if rel.endswith(".json"):
            problem = _sidecar_audio(out_dir, rel, reported, sha256)
            if problem is not None:
                report.problems.append(problem)
    return report


def _replay_log(out_dir: Path, report: VerifyReport) -> tuple[dict[str, _Known], dict[str, int]]:
    """Walk the chain; return the files the log vouches for and those it says were removed."""
    known: dict[str, _Known] = {}
    removed: dict[str, int] = {}
    prev = GENESIS
    for line in read_log(out_dir / AUDIT_FILE):
        report.entries += 1
        n = line.number
        expected_prev, prev = prev, line_hash(line.raw)
        entry = line.entry
        if entry is None:
            report.problems.append(Problem("chain", f"audit line {n}", f"{line.problem}"))
            continue
        if entry.get("prev") != expected_prev:
            what = "the genesis value" if n == 1 else f"the SHA-256 of line {n - 1}"
            report.problems.append(
                Problem(
                    "chain",
                    f"audit line {n}",
                    f"chain broken: prev is not {what} (a line before it was altered, "
                    "inserted or removed, or this one was)",
                )
            )
        elif entry.get("seq") != n:
            report.problems.append(
                Problem("chain", f"audit line {n}", f"seq is {entry.get('seq')!r}, expected {n}")
            )
        _apply(entry, n, known, removed)
    return known, removed


def _apply(
    entry: dict[str, Any], n: int, known: dict[str, _Known], removed: dict[str, int]
) -> None:
    files = entry.get("files")
    if not isinstance(files, dict):
        return
    fields = entry.get("fields")
    uid = fields.get("call_uid") if isinstance(fields, dict) else None
    for ref in files.values():
        if not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
            continue
        rel = ref["path"]
        if entry.get("event") in REMOVALS:
            known.pop(rel, None)
            removed[rel] = n
        elif isinstance(ref.get("sha256"), str):
            known[rel] = _Known(ref["sha256"], n, uid if isinstance(uid, str) else None)
            removed.pop(rel, None)


def _sidecar_audio(
    out_dir: Path, rel: str, reported: set[str], sha256: Callable[[str], str]
) -> Problem | None:
    """The WAV must still have the SHA-256 its sidecar recorded."""
    try:
        doc = json.loads((out_dir / rel).read_text(encoding="utf-8"))
        audio = doc.get("audio") if isinstance(doc, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None if rel in reported else Problem("altered", rel, "not a readable JSON sidecar")
    if not isinstance(audio, dict) or not isinstance(audio.get("file"), str):
        return None
    wav_rel = (Path(rel).parent / audio["file"]).as_posix()
    wav = out_dir / wav_rel
    if wav_rel in reported or not wav.is_file():
        return None
    actual = sha256(wav_rel)
    if actual != audio.get("sha256"):
        return Problem("altered", wav_rel, f"sha256 {actual} differs from its sidecar {rel}")
    return None


__all__ = ["Problem", "VerifyReport", "archive_files", "verify"]
