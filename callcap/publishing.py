"""Publishing ended calls: their files sealed in parallel, committed together, in order.

Publishing a recording is mostly waiting for the disk — an fsync of the audio, of the
sidecar, of their directory, of the audit log — so it runs on worker threads
(:class:`~callcap.storage.publish.BackgroundPublisher`), beside packet processing.  It has
two halves:

* **staging** (:meth:`Publication.stage`): close, fsync and hash the audio, write the sidecar
  beside its final name.  Publications stage in parallel; nothing is visible yet.
* **commit**: rename the files into place, fsync their directory, forget the spool entry,
  and log the publication in the archive's audit log — under the archive lock, so no sweep,
  erasure or verify ever sees a recording whose publication is not logged yet, and in the
  order the calls ended, so the audit log lists them in that order.

Decisions are logged when they are made, not with the publication: :meth:`Publisher.note`
queues an :class:`AuditNote` (a call's consent decision) that is committed in its turn like a
publication, so the audit log says what was decided, and when, even for a call still in
progress — or one whose sensor dies before it ends.

Commits are *grouped*: whichever worker's turn it is commits every publication already
staged behind its own as one batch — one lock, one fsync per directory, one fsync of the
audit log — instead of each paying those waits in turn.  When calls end one by one this is
the same as committing each alone; when hundreds end together (a campaign hanging up, the
end of a capture) the serial part of publishing shrinks by the size of the batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callcap.errors import CallcapError, StorageError
from callcap.recorder import Publication, Published
from callcap.storage.audit import (
    CONSENT_DECIDED,
    PAUSE,
    RECORDING_DISCARDED,
    RECORDING_PUBLISHED,
    AuditLog,
    AuditWriter,
    FileRef,
)
from callcap.storage.publish import BackgroundPublisher, fsync_dir


@dataclass(frozen=True, slots=True)
class AuditNote:
    """An audit entry of its own, committed in call-event order with the publications."""

    call_uid: str
    out_dir: Path
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Noted:
    """A note's outcome: ``problem`` is what went wrong with its entry (None if nothing)."""

    note: AuditNote
    problem: str | None


Outcome = tuple[Published, str | None]
"""What was published, and what went wrong with its audit entry (None if nothing)."""

Entry = Publication | AuditNote
Result = Outcome | Noted

_MAX_BATCH = 64


@dataclass(slots=True)
class _Turns:
    """Tickets staged and waiting for their commit, and the outcomes of batches."""

    next_commit: int = 0  # the first ticket not committed yet
    committing: bool = False
    staged: dict[int, tuple[Entry, BaseException | None]] = field(default_factory=dict)
    outcomes: dict[int, Result | BaseException] = field(default_factory=dict)


class Publisher:
    """Takes ended calls' publications, hands back their outcomes in call-end order."""

    def __init__(self, audit_for: Callable[[Path], AuditLog], workers: int = 6) -> None:
        # Staging is waiting for the disk (fsync) far more than computing: more workers than
        # cores keep several fsyncs in flight when many calls end together.
        self._audit_for = audit_for
        self._pool: BackgroundPublisher[Entry, Result] = BackgroundPublisher(workers)
        self._tickets = 0
        self._cond = threading.Condition()
        self._turns = _Turns()

    def submit(self, publication: Publication) -> None:
        ticket = self._tickets
        self._tickets += 1
        self._pool.submit(publication, lambda: self._publish(publication, ticket))

    def note(self, note: AuditNote) -> None:
        """Log ``note`` in its turn: after the publications submitted before it, before
        those submitted after it (a call's decision then comes before its publication)."""
        ticket = self._tickets
        self._tickets += 1
        self._pool.submit(note, lambda: self._publish(note, ticket))

    def completed(self, *, wait: bool = False) -> list[tuple[Entry, Result | Exception]]:
        """Finished publications, in the order they were submitted (see
        :meth:`BackgroundPublisher.completed`)."""
        return self._pool.completed(wait=wait)

    def shutdown(self) -> None:
        self._pool.shutdown()

    def _publish(self, publication: Entry, ticket: int) -> Result:
        """On a worker: stage, then wait for the turn of this ticket — committing a batch
        when the turn is this worker's, or collecting the outcome another worker's batch
        left for it."""
        failed: BaseException | None = None
        try:
            if not isinstance(publication, AuditNote):
                publication.stage()
        except BaseException as exc:  # noqa: BLE001 - reported in ticket order, below
            failed = exc
        turns = self._turns
        with self._cond:
            turns.staged[ticket] = (publication, failed)
            while ticket not in turns.outcomes:
                if turns.next_commit == ticket and not turns.committing:
                    break
                self._cond.wait()
            else:
                return _result(turns.outcomes.pop(ticket))
            batch: list[tuple[int, Entry, BaseException | None]] = []
            t = ticket
            while t in turns.staged and len(batch) < _MAX_BATCH:
                batch.append((t, *turns.staged.pop(t)))
                t += 1
            turns.committing = True
        outcomes: dict[int, Result | BaseException] = {}
        try:
            outcomes = self._commit(batch)
        finally:
            with self._cond:
                for t, _p, _f in batch:
                    outcome = outcomes.get(t)
                    turns.outcomes[t] = (
                        outcome
                        if outcome is not None
                        else StorageError("publication interrupted before its commit")
                    )
                turns.next_commit = batch[-1][0] + 1
                turns.committing = False
                self._cond.notify_all()
                mine = turns.outcomes.pop(ticket)
        return _result(mine)

    def _commit(
        self, batch: list[tuple[int, Entry, BaseException | None]]
    ) -> dict[int, Result | BaseException]:
        """Commit staged publications, in order, a run of one archive at a time."""
        outcomes: dict[int, Result | BaseException] = {}
        i = 0
        while i < len(batch):
            out_dir = batch[i][1].out_dir
            j = i
            while j < len(batch) and batch[j][1].out_dir == out_dir:
                j += 1
            outcomes.update(self._commit_archive(out_dir, batch[i:j]))
            i = j
        return outcomes

    def _commit_archive(
        self, out_dir: Path, batch: list[tuple[int, Entry, BaseException | None]]
    ) -> dict[int, Result | BaseException]:
        outcomes: dict[int, Result | BaseException] = {}
        with contextlib.ExitStack() as stack:
            audit: AuditWriter | None = None
            problem: str | None = None
            try:
                audit = stack.enter_context(self._audit_for(out_dir).locked())
            except (OSError, CallcapError) as exc:
                # The audio is still published (losing a call over a log line would be
                # worse); every outcome says what went wrong with the log.
                problem = str(exc)[:500]
            placed: list[tuple[int, Publication]] = []
            notes: list[tuple[int, AuditNote]] = []
            for ticket, publication, failed in batch:
                if failed is not None:
                    outcomes[ticket] = failed
                    continue
                if isinstance(publication, AuditNote):
                    notes.append((ticket, publication))
                    continue
                try:
                    publication.place()
                except BaseException as exc:  # noqa: BLE001 - this publication only
                    outcomes[ticket] = exc
                    continue
                placed.append((ticket, publication))
            broken: dict[Path, BaseException] = {}
            for directory in dict.fromkeys(p.stem.parent for _t, p in placed):
                try:
                    fsync_dir(directory)
                except OSError as exc:
                    broken[directory] = StorageError(f"cannot publish into {directory}: {exc}")
            published: list[tuple[int, Published | AuditNote]] = list(notes)
            for ticket, publication in placed:
                failure = broken.get(publication.stem.parent)
                if failure is not None:
                    outcomes[ticket] = failure
                    continue
                try:
                    published.append((ticket, publication.finish()))
                except BaseException as exc:  # noqa: BLE001 - this publication only
                    outcomes[ticket] = exc
            published.sort(key=lambda item: item[0])  # the log follows the tickets' order
            for ticket, done in published:
                outcomes[ticket] = _logged(audit, done, problem)
            if audit is not None and published:
                try:
                    audit.sync()
                except StorageError as exc:
                    for ticket, done in published:
                        outcomes[ticket] = _logged(None, done, str(exc)[:500])
        return outcomes


def _result(outcome: Result | BaseException) -> Result:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _logged(log: AuditWriter | None, done: Published | AuditNote, problem: str | None) -> Result:
    """Log one committed entry (when the lock was had: ``log`` is not None); its outcome."""
    if isinstance(done, AuditNote):
        if log is not None:
            try:
                log.append(done.event, done.fields, sync=False)
            except (OSError, CallcapError) as exc:
                problem = str(exc)[:500]
        return Noted(done, problem)
    if log is not None:
        problem = _log_publication(log, done)
    return (done, problem)


def _log_publication(log: AuditWriter, published: Published) -> str | None:
    """Log what reached the archive, with its hashes, once the sidecar is in place (made
    durable by the batch's one ``sync``).

    A failed append leaves the recording published and is reported (the error text is
    returned); ``callcap verify`` then reports its files as added.
    """
    if published.sidecar is None:
        return None
    event = RECORDING_PUBLISHED if published.wav is not None else RECORDING_DISCARDED
    files: dict[str, FileRef] = {}
    if published.wav is not None:
        files["wav"] = log.ref(published.wav.path, published.wav.sha256)
    files["sidecar"] = log.ref(published.sidecar, published.sidecar_sha256)
    doc = published.document
    consent = doc["consent"]
    try:
        if consent["mode"] == "all_party" and not published.consent_audited:
            # (a decision is audited when made; this is for a call never answered, which
            # had no consent window and so no note)
            evidence = consent["evidence"]
            log.append(
                CONSENT_DECIDED,
                {
                    "call_uid": published.call_uid,
                    "rule": consent["rule"],
                    "status": consent["status"],
                    "method": evidence["method"] if evidence is not None else None,
                    "action": consent["action"],
                },
                sync=False,
            )
        for pause in doc.get("pauses") or ():
            # PCI pauses: when the recording was silenced and what asked for it
            log.append(
                PAUSE,
                {
                    "call_uid": published.call_uid,
                    "from_s": pause["from_s"],
                    "to_s": pause["to_s"],
                    "by": pause["by"],
                },
                sync=False,
            )
        log.append(
            event,
            {
                "call_uid": published.call_uid,
                "end_reason": doc["end_reason"],
                "consent_status": doc["consent"]["status"],
                "delete_after": doc["retention"]["delete_after"],
            },
            files,
            sync=False,
        )
    except (OSError, CallcapError) as exc:
        return str(exc)[:500]
    return None
