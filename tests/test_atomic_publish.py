"""Published files appear whole or not at all, with exact modes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callcap.errors import StorageError
from callcap.storage.publish import (
    BackgroundPublisher,
    PublishedFile,
    publish_file,
    release_stem,
    reserve_stem,
    write_json_atomic,
)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _part(tmp_path: Path, content: bytes) -> Path:
    spool = tmp_path / ".spool"
    spool.mkdir(exist_ok=True)
    part = spool / "abc.wav.part"
    part.write_bytes(content)
    return part


def test_publish_moves_the_part_into_place_with_its_hash(tmp_path: Path) -> None:
    content = os.urandom(3 << 20)  # several hashing blocks
    part = _part(tmp_path, content)
    final = tmp_path / "2018" / "04" / "09" / "211409_abcdefghijklmnop.wav"
    published = publish_file(part, final)
    assert published == PublishedFile(final, len(content), hashlib.sha256(content).hexdigest())
    assert final.read_bytes() == content
    assert not part.exists()


@pytest.mark.usefixtures("strict_umask")
def test_published_modes_ignore_the_umask(tmp_path: Path) -> None:
    part = _part(tmp_path, b"RIFF")
    os.chmod(part, 0o600)
    final = tmp_path / "a" / "b" / "x.wav"
    publish_file(part, final)
    sidecar = write_json_atomic(tmp_path / "c" / "x.json", {"k": 1}).path
    assert _mode(final) == _mode(sidecar) == 0o640
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c"):
        assert _mode(d) == 0o750


def test_modes_are_configurable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        final = tmp_path / "d" / "x.wav"
        publish_file(_part(tmp_path, b"x"), final, file_mode=0o600, dir_mode=0o700)
        sidecar = write_json_atomic(tmp_path / "e" / "x.json", [], file_mode=0o604, dir_mode=0o711)
    finally:
        os.umask(old)
    assert (_mode(final), _mode(final.parent)) == (0o600, 0o700)
    assert (_mode(sidecar.path), _mode(sidecar.path.parent)) == (0o604, 0o711)


def test_crash_before_the_rename_leaves_no_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = _part(tmp_path, b"audio")
    final = tmp_path / "out" / "x.wav"

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="Input/output error"):
        publish_file(part, final)
    assert not final.exists()
    assert part.read_bytes() == b"audio"  # still in the spool, for a retry or recovery


def test_crash_before_the_json_rename_leaves_neither_file_nor_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "x.json"

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left"):
        write_json_atomic(final, {"call_uid": "abc"})
    assert list(tmp_path.iterdir()) == []


def test_publish_refuses_to_overwrite_a_published_file(tmp_path: Path) -> None:
    final = tmp_path / "x.wav"
    final.write_bytes(b"first call")
    part = _part(tmp_path, b"second call")
    with pytest.raises(StorageError, match="already exists"):
        publish_file(part, final)
    assert final.read_bytes() == b"first call"
    assert part.exists()


def test_missing_part_raises_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot publish"):
        publish_file(tmp_path / "nope.part", tmp_path / "x.wav")


def test_json_is_utf8_indented_in_insertion_order_with_a_newline(tmp_path: Path) -> None:
    doc = {"z": 1, "a": "Jürgen ☎", "m": [1, None]}
    published = write_json_atomic(tmp_path / "x.json", doc)
    raw = published.path.read_bytes()
    assert (
        raw
        == b'{\n  "z": 1,\n  "a": "J\xc3\xbcrgen \xe2\x98\x8e",\n  "m": [\n    1,\n    null\n  ]\n}\n'
    )
    assert (published.size, published.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())


def test_json_that_cannot_be_encoded_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot serialise"):
        write_json_atomic(tmp_path / "x.json", {"call_id": "\udcff"})  # lone surrogate
    with pytest.raises(StorageError, match="cannot serialise"):
        write_json_atomic(tmp_path / "y.json", {"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_polling_reader_never_sees_a_partial_json(tmp_path: Path) -> None:
    """A watcher lists and parses *.json while big sidecars are written and rewritten."""
    out = tmp_path / "out"
    out.mkdir()
    big = {"streams": [{"ssrc": f"0x{i:08X}", "note": "x" * 200} for i in range(3000)]}  # ~0.7 MB
    done = threading.Event()
    parsed: list[int] = []
    failures: list[str] = []

    def reader() -> None:
        while not done.is_set():
            for path in out.glob("*.json"):
                try:
                    doc = json.loads(path.read_bytes())
                except FileNotFoundError:
                    continue
                except ValueError as exc:
                    failures.append(f"{path.name}: {exc}")
                    continue
                parsed.append(len(doc["streams"]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(12):
            write_json_atomic(out / f"call{i % 3}.json", big)  # new files and replacements
    finally:
        done.set()
        thread.join()
    assert failures == []
    assert parsed and set(parsed) == {3000}
    assert sorted(p.name for p in out.iterdir()) == ["call0.json", "call1.json", "call2.json"]


def test_background_publisher_returns_outcomes_in_submission_order(tmp_path: Path) -> None:
    publisher: BackgroundPublisher[str, PublishedFile] = BackgroundPublisher(workers=3)
    gate = threading.Event()
    parts = []
    for i in range(6):
        part = tmp_path / f"{i}.part"
        part.write_bytes(bytes([i]) * 1000)
        parts.append(part)

    def job(i: int) -> PublishedFile:
        if i == 0:
            gate.wait(5)  # the first job finishes last
        return publish_file(parts[i], tmp_path / "out" / f"{i}.wav")

    for i in range(6):
        publisher.submit(f"call{i}", lambda i=i: job(i))
    publisher.submit("missing", lambda: publish_file(tmp_path / "nope", tmp_path / "n.wav"))
    assert publisher.completed() == []  # the oldest is not done: nothing overtakes it
    gate.set()
    outcomes = publisher.completed(wait=True)
    assert [tag for tag, _ in outcomes] == [f"call{i}" for i in range(6)] + ["missing"]
    for i, (_tag, outcome) in enumerate(outcomes[:6]):
        assert isinstance(outcome, PublishedFile)
        assert outcome.sha256 == hashlib.sha256(bytes([i]) * 1000).hexdigest()
    assert isinstance(outcomes[6][1], StorageError)
    assert len(publisher) == 0 and publisher.completed() == []
    publisher.shutdown()


def test_reserved_stems_are_unique_until_released(tmp_path: Path) -> None:
    stem = tmp_path / "120000_abc"
    (tmp_path / "120000_abc.wav").write_bytes(b"published")
    first = reserve_stem(stem)
    second = reserve_stem(stem)
    assert (first.name, second.name) == ("120000_abc-1", "120000_abc-2")
    release_stem(first)
    assert reserve_stem(stem) == first
    release_stem(first)
    release_stem(second)


def test_publications_commit_in_call_end_order_in_one_batch_whatever_order_they_staged_in(
    tmp_path: Path,
) -> None:
    """Three calls end together; the first stages slowest, the second fails to stage.  They
    commit in call-end order, the failure passes the turn on, and the worker whose turn it
    is commits everything staged behind it under one archive lock (group commit)."""
    from callcap.publishing import Publisher
    from callcap.recorder import Published
    from callcap.storage.audit import AuditLog

    placed: list[int] = []
    locks: list[Path] = []

    class CountingLog(AuditLog):
        @contextlib.contextmanager
        def locked(self) -> Iterator[Any]:
            locks.append(self.out_dir)
            with super().locked() as writer:
                yield writer

    class Staged:
        """What the publisher needs of a publication, with staging that takes ``delay``."""

        def __init__(self, ticket: int, delay: float, fail: bool = False) -> None:
            self.ticket, self.delay, self.fail = ticket, delay, fail
            self.out_dir = tmp_path
            self.stem = tmp_path / f"call{ticket}"

        def stage(self) -> None:
            threading.Event().wait(self.delay)
            if self.fail:
                raise StorageError("staging failed")

        def place(self) -> None:
            placed.append(self.ticket)

        def finish(self) -> Published:
            return Published(str(self.ticket), None, None, {})

    publisher = Publisher(CountingLog, workers=3)
    for ticket, delay, fail in ((0, 0.3, False), (1, 0.05, True), (2, 0.0, False)):
        publisher.submit(Staged(ticket, delay, fail))  # type: ignore[arg-type]
    outcomes = publisher.completed(wait=True)
    publisher.shutdown()
    assert placed == [0, 2]
    assert [type(result).__name__ for _p, result in outcomes] == ["tuple", "StorageError", "tuple"]
    assert [result[0].call_uid for _p, result in outcomes if isinstance(result, tuple)] == [
        "0",
        "2",
    ]
    assert locks == [tmp_path]  # one batch, one lock


def test_a_note_is_logged_in_its_turn_between_the_publications_around_it(tmp_path: Path) -> None:
    """A consent decision noted while calls are being published: its audit entry comes
    after the publications submitted before it and before those after it, whichever staged
    first, in the same group commit."""
    from callcap.publishing import AuditNote, Noted, Publisher
    from callcap.recorder import Published
    from callcap.storage.audit import AuditLog, read_log

    class Staged:
        def __init__(self, ticket: int, delay: float) -> None:
            self.ticket, self.delay = ticket, delay
            self.out_dir = tmp_path
            self.stem = tmp_path / f"call{ticket}"

        def stage(self) -> None:
            threading.Event().wait(self.delay)

        def place(self) -> None:
            pass

        def finish(self) -> Published:
            doc = {
                "consent": {"mode": "one_party", "status": "not_required"},
                "end_reason": "bye_caller",
                "retention": {"delete_after": None},
            }
            sidecar = self.stem.with_suffix(".json")
            return Published(str(self.ticket), sidecar, None, doc, "0" * 64)

    fields = {"call_uid": "1", "rule": "r", "status": "granted", "method": "dtmf"}
    publisher = Publisher(AuditLog, workers=3)
    publisher.submit(Staged(0, 0.3))  # type: ignore[arg-type]
    publisher.note(AuditNote("1", tmp_path, "consent_decided", fields))
    publisher.submit(Staged(2, 0.0))  # type: ignore[arg-type]
    outcomes = publisher.completed(wait=True)
    publisher.shutdown()
    assert [type(result).__name__ for _p, result in outcomes] == ["tuple", "Noted", "tuple"]
    noted = outcomes[1][1]
    assert isinstance(noted, Noted) and noted.problem is None
    lines = list(read_log(tmp_path / "audit.jsonl"))
    assert [line.entry["event"] for line in lines] == [
        "recording_discarded",
        "consent_decided",
        "recording_discarded",
    ]
    assert [line.entry["fields"]["call_uid"] for line in lines] == ["0", "1", "2"]
    assert lines[1].entry["fields"] == fields


def test_a_note_that_cannot_be_logged_says_why(tmp_path: Path) -> None:
    from callcap.publishing import AuditNote, Noted, Publisher
    from callcap.storage.audit import AuditLog

    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    publisher = Publisher(AuditLog, workers=1)
    publisher.note(AuditNote("1", blocked, "consent_decided", {"call_uid": "1"}))
    ((_note, result),) = publisher.completed(wait=True)
    publisher.shutdown()
    assert isinstance(result, Noted)
    assert result.problem is not None and "not-a-directory" in result.problem
