"""The spool: in-flight calls on disk, and their recovery after the writer died.

Each call in flight owns two files in ``OUT/.spool/``, both named ``<call_uid>-<pid>``:

* ``.wav.part`` — its audio, a WAV whose header is rewritten and fsynced every flush
  interval (see :meth:`~callcap.storage.wav.WavWriter.flush`);
* ``.call.json`` and ``.call.alt.json`` — the call's facts so far: the sidecar it would
  get if it ended at the last checkpoint (parties, addresses, start/answer, streams and
  their statistics, DTMF, gaps, warnings, consent, retention), saved whenever the call
  starts, answers or changes media and at every flush.  The checkpoints go to the two
  files in turn, each overwritten in place (:func:`checkpoint_facts`), and recovery takes
  the newer of the two that reads whole: a write cut short by a crash spoils one file,
  never both.  Why not a temporary file renamed over the old one: ext4 starts writing
  back a file renamed over another at once (``auto_da_alloc``), about 0.3 ms of the
  recorder's time per call and second — a third of a worker's time at a few hundred
  calls — where an overwrite in place costs a few microseconds.

Checkpoint files are reused, not created anew for every call: creating a file (an inode)
costs far more than renaming one — 0.1 to 0.5 ms of the recorder's CPU on ext4 against some
20 µs — and a call in flight needs two.  A published call's checkpoint files are blanked
(nothing of the call stays behind: retention may delete its recording later) and moved to
``.spool/free/``, named ``<pid>-<n>``; the next call renames them to its own names
(:class:`FreeFiles`).  Recovery removes the free files of writers that are gone.

The pid in the names says whose the files are.  At start-up the daemon recovers every entry
whose writer is gone: the WAV is cut back to its last flush and published, and the facts
become its sidecar with ``end_reason: "recovered"``.  An entry that cannot be made whole is
moved to ``.spool/damaged/`` — it is never published half-right and never stops the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from callcap.errors import StorageError, storage_error
from callcap.storage.layout import ensure_dir, recording_stem, spool_dir, unique_stem
from callcap.storage.publish import (
    PublishedFile,
    fsync_dir,
    publish_file,
    seal_file,
    write_json_atomic,
)
from callcap.storage.sidecar import iso_utc, validate_sidecar
from callcap.storage.wav import recover_spooled_wav

SPOOL_VERSION = 1
AUDIO_SUFFIX = ".wav.part"
FACTS_SUFFIX = ".call.json"
FACTS_ALT_SUFFIX = ".call.alt.json"
FACTS_SUFFIXES = (FACTS_SUFFIX, FACTS_ALT_SUFFIX)
DAMAGED = "damaged"
FREE = "free"
RESERVE = "reserve"  # the room kept for a full disk (callcap.storage.reserve), per process
FREE_MARK = b"free\n"  # what a free checkpoint file holds (never a call's facts)
MAX_FREE = 8192  # free checkpoint files one process keeps for reuse (per spool)
RECOVERED_WARNING = "recovered_from_spool"
MAX_WARNINGS = 100  # sidecar.schema.json: warnings.maxItems

_ENTRY = re.compile(
    r"^(?P<uid>[a-z2-7]{16})-(?P<pid>[0-9]{1,10})"
    r"(?P<kind>\.wav\.part|\.call\.json|\.call\.alt\.json)$"
)
_TEMP = re.compile(r"^\..+\.tmp-(?P<pid>[0-9]{1,10})-[0-9]+$")
_FREE_NAME = re.compile(r"^(?P<pid>[0-9]{1,10})-[0-9]+$")


def audio_path(out_dir: Path, call_uid: str, pid: int) -> Path:
    return spool_dir(out_dir) / f"{call_uid}-{pid}{AUDIO_SUFFIX}"


def facts_path(out_dir: Path, call_uid: str, pid: int, slot: int = 0) -> Path:
    return spool_dir(out_dir) / f"{call_uid}-{pid}{FACTS_SUFFIXES[slot]}"


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the spool keeps about a call besides its audio.

    ``sidecar`` is the call's sidecar as of ``checkpoint`` (capture time), with
    ``end_reason: "recovered"`` and ``end`` at the checkpoint already, and an ``audio``
    object whose file-specific fields (file, format, frames, duration, hash, size) recovery
    fills in; ``start`` is the call's start time, which names the published files.
    """

    call_uid: str
    start: float
    checkpoint: float
    sidecar: dict[str, Any]
    #: Counts the call's checkpoints: the newer of two with the same capture time wins.
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "spool_version": SPOOL_VERSION,
            "call_uid": self.call_uid,
            "start": self.start,
            "checkpoint": self.checkpoint,
            "seq": self.seq,
            "sidecar": self.sidecar,
        }

    @classmethod
    def from_json(cls, obj: object) -> CallFacts:
        if not isinstance(obj, dict):
            raise StorageError(f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("spool_version") != SPOOL_VERSION:
            raise StorageError(
                f"spool_version: expected {SPOOL_VERSION}, got {obj.get('spool_version')!r}"
            )
        uid, start, checkpoint, sidecar = (
            obj.get("call_uid"),
            obj.get("start"),
            obj.get("checkpoint"),
            obj.get("sidecar"),
        )
        if not isinstance(uid, str) or not isinstance(sidecar, dict):
            raise StorageError("call_uid (string) and sidecar (object) are required")
        if not isinstance(start, int | float) or not isinstance(checkpoint, int | float):
            raise StorageError("start and checkpoint must be numbers")
        if not isinstance(sidecar.get("audio"), dict):
            raise StorageError("sidecar.audio must be an object")
        seq = obj.get("seq", 0)
        if not isinstance(seq, int):
            raise StorageError("seq must be an integer")
        return cls(uid, float(start), float(checkpoint), sidecar, seq)


def checkpoint_facts(
    out_dir: Path, facts: CallFacts, pid: int, slot: int, *, file_mode: int, dir_mode: int
) -> int:
    """Save ``facts`` into checkpoint file ``slot`` (0 or 1) of the call's entry, in place;
    the slot for the next checkpoint (a one-off :class:`FactsFiles`)."""
    files = FactsFiles(out_dir, facts.call_uid, pid, file_mode=file_mode, dir_mode=dir_mode)
    files.slot = slot
    try:
        files.save(facts)
    finally:
        files.close()
    return files.slot


class FactsFiles:
    """The two checkpoint files of one call in flight, kept open while it lasts: each
    checkpoint overwrites the older of them in place (see the module docstring).  Writes
    are durable from the next :class:`SpoolSync`."""

    def __init__(
        self, out_dir: Path, call_uid: str, pid: int, *, file_mode: int, dir_mode: int
    ) -> None:
        self.paths = (facts_path(out_dir, call_uid, pid, 0), facts_path(out_dir, call_uid, pid, 1))
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.slot = 0  # where the next checkpoint goes
        self._fds: list[int | None] = [None, None]

    def save(self, facts: CallFacts) -> None:
        path = self.paths[self.slot]
        try:
            data = (json.dumps(facts.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise StorageError(f"cannot serialise {path.name}: {exc}") from exc
        try:
            fd = self._fds[self.slot]
            if fd is None:
                fd = self._fds[self.slot] = self._open(path)
            view = memoryview(data)
            at = 0
            while at < len(data):
                at += os.pwrite(fd, view[at:], at)
            os.ftruncate(fd, len(data))  # never to 0: that too starts a write-back on ext4
        except OSError as exc:
            raise storage_error(f"cannot write {path}: {exc.strerror or exc}", exc.errno) from exc
        self.slot = 1 - self.slot

    def _open(self, path: Path) -> int:
        FREE_FILES.take(path)  # a free file renamed to ``path``, if there is one
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(path, flags, self.file_mode)
        except FileNotFoundError:
            ensure_dir(path.parent, self.dir_mode)
            return os.open(path, flags, self.file_mode)

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                self._fds[i] = None
                with contextlib.suppress(OSError):
                    os.close(fd)


def _newest_facts(uid: str, files: dict[str, Path]) -> CallFacts:
    """The newer of the entry's checkpoints that reads whole (a crash mid-write spoils one)."""
    best: CallFacts | None = None
    problem = "audio without call facts: nothing to name or describe it"
    for suffix in FACTS_SUFFIXES:
        path = files.get(suffix)
        if path is None:
            continue
        try:
            facts = CallFacts.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, StorageError) as exc:
            problem = f"unreadable call facts: {exc}"
            continue
        if facts.call_uid != uid:
            problem = f"call facts are for {facts.call_uid!r}, not {uid!r}"
            continue
        if best is None or (facts.checkpoint, facts.seq) > (best.checkpoint, best.seq):
            best = facts
    if best is None:
        raise StorageError(problem)
    return best


class SpoolSync:
    """Makes the whole spool durable once per flush interval with one ``syncfs(2)``.

    Every call in flight commits its audio header and its facts each second; an fsync of
    each (three per call) would put hundreds of disk waits per second on the capture
    thread.  Those writes skip the fsync instead — a crash of the process loses nothing,
    the page cache keeps them — and a worker thread syncs the spool's filesystem, which
    covers a power cut.  Requests made while a sync runs coalesce into the next one.

    ``callcap record`` syncs the same way for another reason: left to the kernel, hundreds
    of MB of audio stay dirty in the page cache until the calls end, and publishing them
    (an fsync per file) then waits for all of it at once; synced as it is written, the
    disk works while the packets are processed.
    """

    def __init__(self) -> None:
        self._wanted = threading.Event()
        self._stop = False
        self._dir: Path | None = None
        self._thread: threading.Thread | None = None
        self.syncs = 0
        self.last_error: str | None = None

    def request(self, spool: Path) -> None:
        """Sync the filesystem holding ``spool`` soon (from any thread; never blocks)."""
        self._dir = spool
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(
                target=self._run, name="callcap-spool-sync", daemon=True
            )
            self._thread.start()
        self._wanted.set()

    def close(self) -> None:
        """Do a last sync of what was requested and stop the worker."""
        if self._thread is not None:
            self._stop = True
            self._wanted.set()
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            spool = self._dir
            if spool is not None:
                try:
                    _syncfs(spool)
                    self.syncs += 1
                except OSError as exc:
                    self.last_error = f"{spool}: {exc.strerror or exc}"
            if self._stop:
                return


def _syncfs(path: Path) -> None:
    """``syncfs(2)`` on the filesystem holding ``path`` (``sync(2)`` where it is missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = _libc()
        if libc is None or not hasattr(libc, "syncfs"):
            os.sync()
            return
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


class FreeFiles:
    """Blank checkpoint files kept for reuse (see the module docstring), per process and
    spool; thread-safe (calls are published on worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[int, Path], list[Path]] = {}
        self._made = 0

    def take(self, path: Path) -> bool:
        """Rename a free file of this process to ``path`` (False: none; create one)."""
        with self._lock:
            free = self._free.get((os.getpid(), path.parent))
            if not free:
                return False
            spare = free.pop()
        try:
            os.rename(spare, path)
        except OSError:
            return False  # gone (a recovery, a hand): the caller creates the file
        return True

    def discard(self) -> None:
        """Remove this process's free files (a clean exit leaves an empty spool)."""
        pid = os.getpid()
        with self._lock:
            mine = [k for k in self._free if k[0] == pid]
            paths = [path for key in mine for path in self._free.pop(key)]
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()

    def give(self, path: Path) -> None:
        """Blank ``path`` and keep it for reuse, or remove it when enough are kept."""
        key = (os.getpid(), path.parent)
        with self._lock:
            room = len(self._free.get(key, ())) < MAX_FREE
            self._made += 1
            spare = path.parent / FREE / f"{key[0]}-{self._made}"
        if room:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.pwrite(fd, FREE_MARK, 0)
                    os.ftruncate(fd, len(FREE_MARK))  # not to 0: see FactsFiles.save
                finally:
                    os.close(fd)
                try:
                    os.rename(path, spare)
                except FileNotFoundError:
                    os.mkdir(spare.parent, 0o700)
                    os.rename(path, spare)
            except FileNotFoundError:
                return
            except OSError:
                pass  # not reusable: removed below
            else:
                with self._lock:
                    self._free.setdefault(key, []).append(spare)
                return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


FREE_FILES = FreeFiles()


def remove_entry(out_dir: Path, call_uid: str, pid: int) -> None:
    """Forget a call's spool entry once its recording is published (or discarded): the
    audio is gone (published: renamed away), the checkpoint files are blanked for reuse."""
    with contextlib.suppress(FileNotFoundError):
        audio_path(out_dir, call_uid, pid).unlink()
    for slot in (0, 1):
        FREE_FILES.give(facts_path(out_dir, call_uid, pid, slot))


@dataclass(frozen=True, slots=True)
class Recovered:
    call_uid: str
    wav: PublishedFile | None  # None: consent said the audio must not be kept
    sidecar: Path
    duration_s: float
    audio_s: float
    end_reason: str = "recovered"  # the sidecar's (its staged one's, if that was saved)


@dataclass(frozen=True, slots=True)
class Damaged:
    name: str
    reason: str
    moved_to: tuple[Path, ...]


def process_alive(pid: int) -> bool:
    """Is ``pid`` a running callcap process?

    The name check keeps a recycled pid (another program now holds it) from hiding a dead
    recorder's files forever; this process never counts, since recovery runs before it has
    spooled anything (after a restart in a fresh pid namespace it may well get its
    predecessor's pid).
    """
    if pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"callcap" in cmdline


def spool_files(out_dir: Path) -> frozenset[Path]:
    """Every file in the spool now (its free and reserve files included): what a recovery
    that runs beside new writers may touch, so it never takes a file one of them made."""
    spool = spool_dir(out_dir)
    found: set[Path] = set()
    for folder in (spool, spool / FREE, spool / RESERVE):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found.update(folder / name for name in names)
    return frozenset(found)


def recover_spool(out_dir: Path, **options: Any) -> tuple[list[Recovered], list[Damaged]]:
    """Publish every spool entry whose writer is gone; move what cannot be saved aside
    (``options``: those of :func:`recover_entries`)."""
    recovered: list[Recovered] = []
    damaged: list[Damaged] = []
    for outcome in recover_entries(out_dir, **options):
        if isinstance(outcome, Recovered):
            recovered.append(outcome)
        else:
            damaged.append(outcome)
    return recovered, damaged


def recover_entries(
    out_dir: Path,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o750,
    alive: Callable[[int], bool] = process_alive,
    only: AbstractSet[Path] | None = None,
) -> Iterator[Recovered | Damaged]:
    """:func:`recover_spool` one entry at a time: each is published (or moved aside) when
    the next outcome is asked for, so a caller can hold the archive lock around each one and
    log it there.  ``only`` limits recovery to those files (see :func:`spool_files`)."""
    spool = spool_dir(out_dir)
    if not spool.is_dir():
        return

    def dead(path: Path, pid: int) -> bool:
        return (only is None or path in only) and not alive(pid)

    entries: dict[tuple[str, int], dict[str, Path]] = {}
    _remove_free(spool / FREE, dead)
    _remove_free(spool / RESERVE, dead)  # a crashed writer's reserve: its room comes back
    for path in sorted(spool.iterdir()):
        temp = _TEMP.match(path.name)
        if temp is not None and dead(path, int(temp.group("pid"))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # half-written facts replacement: the old facts file stands
            continue
        m = _ENTRY.match(path.name)
        if m is None or not path.is_file() or (only is not None and path not in only):
            continue
        key = (m.group("uid"), int(m.group("pid")))
        entries.setdefault(key, {})[m.group("kind")] = path
    for (uid, pid), files in sorted(entries.items()):
        if alive(pid):
            continue
        try:
            call = _recover_one(out_dir, uid, files, file_mode, dir_mode)
        except (StorageError, OSError, ValueError) as exc:
            yield _move_aside(spool, f"{uid}-{pid}", files, str(exc), dir_mode)
            continue
        if call is not None:
            yield call


def _remove_free(free: Path, dead: Callable[[Path, int], bool]) -> None:
    """Remove the free checkpoint files (or reserves) of writers that are gone."""
    try:
        names = os.listdir(free)
    except OSError:
        return
    for name in names:
        m = _FREE_NAME.match(name)
        if m is not None and dead(free / name, int(m.group("pid"))):
            with contextlib.suppress(OSError):
                os.unlink(free / name)


def _recover_one(
    out_dir: Path, uid: str, files: dict[str, Path], file_mode: int, dir_mode: int
) -> Recovered | None:
    """Publish one dead writer's call; None for a call that was never answered.

    An unanswered call gets no recording when it ends normally (it failed, or was still
    ringing), so it gets none here either: its spool files are simply removed.
    """
    part = files.get(AUDIO_SUFFIX)
    facts = _newest_facts(uid, files)
    if facts.sidecar.get("answer") is None:
        for path in files.values():
            path.unlink()
        return None
    if (facts.sidecar.get("consent") or {}).get("action") == "discarded":
        return _recover_discarded(out_dir, uid, facts, files, file_mode, dir_mode)
    if part is None:
        published = _published_alone(out_dir, uid, facts)
        if published is None:
            raise StorageError("call facts without audio, and no published audio of the call")
        return _recover_sidecar(published, uid, facts, files, file_mode, dir_mode)
    frames, fmt = recover_spooled_wav(part)
    stem = unique_stem(recording_stem(out_dir, facts.start, uid))
    wav_final = stem.with_suffix(".wav")
    doc = _recovered_sidecar(facts, wav_final.name, fmt, frames)
    validate_sidecar({**doc, "audio": {**doc["audio"], "sha256": "0" * 64, "bytes": 0}})
    wav = publish_file(part, wav_final, file_mode=file_mode, dir_mode=dir_mode)
    doc["audio"]["sha256"] = wav.sha256
    doc["audio"]["bytes"] = wav.size
    sidecar = write_json_atomic(
        stem.with_suffix(".json"), doc, file_mode=file_mode, dir_mode=dir_mode
    )
    _remove_facts(files)
    return Recovered(uid, wav, sidecar.path, doc["duration_s"], doc["audio"]["duration_s"])


def _published_alone(out_dir: Path, uid: str, facts: CallFacts) -> Path | None:
    """The call's WAV already in the archive while its facts are still in the spool: the
    writer died between the two renames that publish a recording (audio first, sidecar
    last), or after both but before it forgot the entry (and logged the publication)."""
    stem = recording_stem(out_dir, facts.start, uid)
    name = re.compile(re.escape(stem.name) + r"(-[0-9]+)?\.wav")
    try:
        names = os.listdir(stem.parent)
    except OSError:
        return None
    found = [stem.parent / n for n in sorted(names) if name.fullmatch(n)]
    alone = [wav for wav in found if not wav.with_suffix(".json").exists()]
    if len(alone) > 1:
        raise StorageError(f"{len(alone)} published WAVs of the call without a sidecar")
    if alone:
        return alone[0]
    return found[-1] if len(found) == 1 else None


def _recover_sidecar(
    wav: Path,
    uid: str,
    facts: CallFacts,
    files: dict[str, Path],
    file_mode: int,
    dir_mode: int,
) -> Recovered:
    """Give a WAV published alone its sidecar: the one its writer had staged beside it
    (whole and fsynced before the WAV was renamed, and naming this WAV's hash) if it is
    there, else one rebuilt from the spool facts, as for any recovered call.  A WAV whose
    sidecar is in place already is handed back as it is (to be logged as published)."""
    final = wav.with_suffix(".json")
    staged = sorted(wav.parent.glob(f".{final.name}.tmp-*"))
    sidecar: Path | None = None
    doc: dict[str, Any] | None = None
    if final.exists():  # both in place: the publication only lacks its audit entry
        size, digest = seal_file(wav, file_mode=file_mode)
        doc = json.loads(final.read_bytes())
        if not isinstance(doc, dict) or (doc.get("audio") or {}).get("sha256") != digest:
            raise StorageError(f"{final.name} does not describe {wav.name}")
        sidecar = final
    else:
        # a staged sidecar of this WAV names its size: the WAV is hashed (once) only when
        # one does, to check the hash it names
        size = wav.stat().st_size
        candidates = [
            (tmp, staged_doc)
            for tmp in staged
            if (staged_doc := _whole_sidecar(tmp)) is not None
            and (staged_doc.get("audio") or {}).get("bytes") == size
        ]
        if candidates:
            size, digest = seal_file(wav, file_mode=file_mode)
            for tmp, candidate in candidates:
                if candidate["audio"].get("sha256") == digest:
                    os.rename(tmp, final)
                    fsync_dir(final.parent)
                    sidecar, doc = final, candidate
                    break
    if sidecar is None or doc is None:
        frames, fmt = recover_spooled_wav(wav)
        size, digest = seal_file(wav, file_mode=file_mode)
        doc = _recovered_sidecar(facts, wav.name, fmt, frames)
        doc["audio"]["sha256"] = digest
        doc["audio"]["bytes"] = size
        validate_sidecar(doc)
        sidecar = write_json_atomic(final, doc, file_mode=file_mode, dir_mode=dir_mode).path
    for tmp in staged:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _remove_facts(files)
    wav_file = PublishedFile(wav, size, digest)
    return Recovered(
        uid, wav_file, sidecar, doc["duration_s"], doc["audio"]["duration_s"], doc["end_reason"]
    )


def _whole_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar a writer staged at ``path``, if it reads whole and valid."""
    try:
        doc = json.loads(path.read_bytes())
        validate_sidecar(doc)
    except (OSError, ValueError, StorageError):
        return None
    return doc if isinstance(doc, dict) else None


def _remove_facts(files: dict[str, Path]) -> None:
    for suffix in FACTS_SUFFIXES:
        path = files.get(suffix)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _recover_discarded(
    out_dir: Path,
    uid: str,
    facts: CallFacts,
    files: dict[str, Path],
    file_mode: int,
    dir_mode: int,
) -> Recovered:
    """A call whose consent was refused (or missing, to be discarded) keeps no audio after a
    crash either: its spool audio is removed and only the sidecar is published."""
    part = files.get(AUDIO_SUFFIX)
    if part is not None:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    doc = _recovered_sidecar(facts, None, "WAV", 0)
    validate_sidecar(doc)
    stem = unique_stem(recording_stem(out_dir, facts.start, uid))
    sidecar = write_json_atomic(
        stem.with_suffix(".json"), doc, file_mode=file_mode, dir_mode=dir_mode
    )
    _remove_facts(files)
    return Recovered(uid, None, sidecar.path, doc["duration_s"], 0.0)


def _recovered_sidecar(
    facts: CallFacts, file_name: str | None, fmt: str, frames: int
) -> dict[str, Any]:
    """The recovered call's sidecar; ``file_name`` None: no audio is published."""
    doc: dict[str, Any] = json.loads(json.dumps(facts.sidecar))  # a deep copy of plain JSON
    if file_name is None:
        doc["audio"] = None
    else:
        audio = doc["audio"]
        rate = audio.get("sample_rate")
        if not isinstance(rate, int) or rate <= 0:
            raise StorageError(
                f"sidecar.audio.sample_rate: expected a positive integer, got {rate!r}"
            )
        audio.update(file=file_name, format=fmt, frames=frames, duration_s=round(frames / rate, 3))
        _stretch_to_audio(doc, frames / rate)
    doc["end_reason"] = "recovered"
    warning = {
        "code": RECOVERED_WARNING,
        "detail": (
            "the recorder stopped without ending this call; audio up to its last "
            f"flush was recovered at {iso_utc(time.time())}"
        ),
    }
    warnings = doc.setdefault("warnings", [])
    if isinstance(warnings, list):
        if len(warnings) >= MAX_WARNINGS:  # the schema's bound: this one matters most
            warnings[MAX_WARNINGS - 1 :] = [warning]
        else:
            warnings.append(warning)
    return doc


def _stretch_to_audio(doc: dict[str, Any], audio_s: float) -> None:
    """Facts are saved less often than audio is committed (a few flushes apart, when only
    the clock moved): a call ends no earlier than the audio recovered of it.  ``end``,
    the durations and the retention deadline (counted from the end) move on together."""
    try:
        end = _epoch(doc["end"])
        audio_end = _epoch(doc["audio"]["start"]) + audio_s
    except (KeyError, TypeError, ValueError):
        return
    shift = round(audio_end - end, 3)
    if shift <= 0:
        return
    doc["end"] = iso_utc(end + shift)
    for key in ("duration_s", "talk_s"):
        if isinstance(doc.get(key), int | float):
            doc[key] = round(doc[key] + shift, 3)
    retention = doc.get("retention")
    if isinstance(retention, dict) and isinstance(retention.get("delete_after"), str):
        with contextlib.suppress(ValueError):
            retention["delete_after"] = iso_utc(_epoch(retention["delete_after"]) + shift)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _move_aside(
    spool: Path, name: str, files: dict[str, Path], reason: str, dir_mode: int
) -> Damaged:
    """Keep what could not be recovered for a human, out of the next recovery's way."""
    target = spool / DAMAGED
    moved: list[Path] = []
    try:
        ensure_dir(target, dir_mode)
        for path in files.values():
            dest = target / path.name
            n = 1
            while dest.exists():
                dest = target / f"{path.name}.{n}"
                n += 1
            os.replace(path, dest)
            moved.append(dest)
    except OSError as exc:
        reason = f"{reason}; moving it aside failed too: {exc.strerror or exc}"
    return Damaged(name, reason[:500], tuple(moved))


__all__ = [
    "AUDIO_SUFFIX",
    "FACTS_ALT_SUFFIX",
    "FACTS_SUFFIX",
    "FREE_FILES",
    "CallFacts",
    "Damaged",
    "FactsFiles",
    "FreeFiles",
    "Recovered",
    "SpoolSync",
    "audio_path",
    "checkpoint_facts",
    "facts_path",
    "process_alive",
    "recover_entries",
    "recover_spool",
    "remove_entry",
    "spool_files",
]
