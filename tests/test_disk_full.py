"""A full (or nearly full) output filesystem: partial recordings, not lost ones.

Recordings go into a real small tmpfs, filled and freed by the test while calls are in
flight.  What must hold (``callcap.storage.reserve`` states the rule):

* a call whose audio write fails for lack of space keeps the audio written so far and is
  published as a partial recording whose sidecar says ``disk_full`` and what span it covers
  — the audio equal, sample for sample, to the start of the same call recorded with room;
* below ``storage.min_free`` new calls are not recorded (their sidecars say ``disk_low``)
  while the calls in flight go on whole;
* when room returns, ``disk_ok`` is logged and calls are recorded again by themselves;
* every publication has its audit entry (``callcap verify`` is clean), no spool entry is
  left behind, and ``callcap record`` exits 1 when a recording is incomplete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from daemon_harness import RunningDaemon, live_config
from netns_harness import NetnsPair, tcpreplay
from outputs import published
from tones import held_fraction
from workload import WorkloadInfo, write_workload

from callcap.capture.block import batched
from callcap.capture.pcapfile import CaptureReader
from callcap.config.loader import load_config
from callcap.errors import DiskFullError, StorageError
from callcap.pipeline import Pipeline
from callcap.storage.audit import AuditLog
from callcap.storage.wav import WavWriter

MiB = 1 << 20


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take the filesystem's free space, down to ``leave`` bytes (0: until ENOSPC)."""
    filler = disk / f"filler-{leave}"
    want = free_space(disk) - leave
    block = b"\xa5" * MiB
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while want > 0 or not leave:
            want -= os.write(fd, block[: min(MiB, want)] if leave else block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def free_space(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


class EventLog:
    """A structlog-shaped logger that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.events.append({"event": event, "level": level, **fields})

        return log

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def _config(tmp_path: Path, storage: str) -> Any:
    path = tmp_path / "callcap.yaml"
    path.write_text(f"storage:\n{storage}control:\n  socket: null\n")
    return load_config(path)


def _verify(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callcap", "verify", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _spool_entries(out: Path) -> list[str]:
    spool = out / ".spool"
    return sorted(p.name for p in spool.glob("*") if p.is_file()) if spool.is_dir() else []


def _codes(doc: dict[str, Any]) -> set[str]:
    return {w["code"] for w in doc["warnings"]}


# -- the writer and the audit log on a full disk ----------------------------------------------


def test_wav_writer_counts_the_frames_that_landed_and_stays_readable(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", MiB) as disk:
        writer = WavWriter(disk / "a.wav", sample_rate=8000, channels=2)
        second = (np.arange(16000, dtype=np.int64) % 20011 - 10000).astype(np.int16)
        second = second.reshape(-1, 2)

        def write_a_lot() -> None:
            for _ in range(100):
                writer.write(second)

        with pytest.raises(DiskFullError, match="No space left"):
            write_a_lot()
        frames = writer.frames
        assert 0 < frames < 100 * len(second)
        writer.close()
        audio, rate = soundfile.read(disk / "a.wav", dtype="int16")
        assert rate == 8000 and audio.shape == (frames, 2)
        assert np.array_equal(audio, np.tile(second, (100, 1))[:frames])


def test_audit_append_on_a_full_disk_takes_its_cut_line_back(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", MiB) as disk:
        out = disk / "out"
        log = AuditLog(out)
        with log.locked() as writer:
            writer.append("hold_added", {"call_uid": "a" * 16, "reason": "x"})
        before = log.path.read_bytes()
        filler = fill(disk)
        with log.locked() as writer, pytest.raises(DiskFullError):
            writer.append("hold_added", {"call_uid": "b" * 16, "reason": "y" * 20000})
        assert log.path.read_bytes() == before  # no torn line left in the chain
        filler.unlink()
        with log.locked() as writer:
            writer.append("hold_removed", {"call_uid": "a" * 16})
        result = _verify(out)
        assert result.returncode == 0, result.stdout + result.stderr


# -- record: partial recordings and the exit status --------------------------------------------


def test_record_into_a_full_disk_publishes_partial_recordings_and_exits_1(
    tmp_path: Path,
) -> None:
    capture = tmp_path / "calls.pcap"
    info = write_workload(capture, calls=12, seconds=30, seed=11)
    config = tmp_path / "callcap.yaml"
    config.write_text("storage:\n  min_free: 0\n  reserve: 1MiB\n")
    reference = tmp_path / "reference"

    command = [sys.executable, "-m", "callcap", "record", "--config", str(config)]

    def record(out: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "--out", str(out), str(capture)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    roomy = record(reference)
    assert roomy.returncode == 0, roomy.stderr[-2000:]
    whole = published(reference)
    # 12 calls of ~25 s need ~9.6 MB of audio: 6 MiB holds part of it
    with small_disk(tmp_path / "disk", 6 * MiB) as disk:
        out = disk / "out"
        full = record(out)
        assert full.returncode == 1, full.stderr[-3000:]
        events = [json.loads(line) for line in full.stderr.splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        assert names.count("disk_full") == 1 and "recording_failed" not in names
        (finished,) = [e for e in events if e["event"] == "record_finished"]
        partial = published(out)
        assert partial.keys() == whole.keys() == {c.call_id for c in info.calls}
        assert finished["recordings"] == len(info.calls)
        cut = 0
        for call_id, (doc, audio) in partial.items():
            ref_doc, ref_audio = whole[call_id]
            assert audio is not None and ref_audio is not None
            assert doc["end_reason"] == ref_doc["end_reason"]
            assert doc["duration_s"] == ref_doc["duration_s"]  # the call, not the audio
            assert doc["audio"]["frames"] == len(audio) <= len(ref_audio)
            # what was written is exactly the start of the call's audio
            assert np.array_equal(audio, ref_audio[: len(audio)])
            if len(audio) < len(ref_audio):
                cut += 1
                (warning,) = [w for w in doc["warnings"] if w["code"] == "disk_full"]
                covered = f"0.000-{len(audio) / 8000:.3f} s"
                assert covered in warning["detail"]
        assert cut >= len(info.calls) // 2
        assert finished["recordings_incomplete"] == cut
        assert finished["recordings_failed"] == 0 and finished["audit_failed"] == 0
        result = _verify(out)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _spool_entries(out) == []
        assert not list((out / ".spool").rglob("*.wav.part"))


# -- full, then low, then room again, during calls ---------------------------------------------


def _frames(*captures: Path) -> Iterator[tuple[float, int, bytes]]:
    for capture in captures:
        with CaptureReader(str(capture)) as reader:
            yield from reader


def _batches(tmp_path: Path) -> tuple[list[Path], list[WorkloadInfo]]:
    """Four batches of calls, one after the other: A (4 × 10 s), then B, C, D (3 × 6 s)."""
    t0 = 1_700_000_000.0
    specs = [("a", 4, 10.0, t0), ("b", 3, 6.0, t0 + 11), ("c", 3, 6.0, t0 + 18)]
    specs.append(("d", 3, 6.0, t0 + 25))
    paths, infos = [], []
    for seed, (name, calls, seconds, start) in enumerate(specs, 1):
        path = tmp_path / f"{name}.pcap"
        info = write_workload(path, calls=calls, seconds=seconds, seed=seed, start_time=start)
        infos.append(info)
        paths.append(path)
    return paths, infos


def test_full_then_low_then_room_again_during_calls(tmp_path: Path) -> None:
    """The disk fills during batch A, is freed, drops below ``min_free`` during B (which
    goes on whole) so that C is not recorded, and has room again for D."""
    paths, (a, b, c, d) = _batches(tmp_path)
    t0 = a.start_time
    config = _config(tmp_path, "  min_free: 4MiB\n  reserve: 1MiB\n")
    reference = tmp_path / "reference"
    ref = Pipeline(config, reference, EventLog())
    ref.run(_frames(*paths))
    ref.close("capture_end")
    whole = published(reference)
    assert len(whole) == 13

    with small_disk(tmp_path / "disk", 16 * MiB) as disk:
        out = disk / "out"
        log = EventLog()
        pipeline = Pipeline(config, out, log)
        fillers: list[Path] = []
        seen: dict[str, float] = {}

        def at(ts: float) -> None:
            """What the test does to the disk, at capture times."""
            rel = ts - t0
            if rel >= 4 and "full" not in seen:
                seen["full"] = free_space(disk)
                fillers.append(fill(disk))
            elif rel >= 8 and "freed" not in seen:
                seen["freed"] = rel
                fillers.pop().unlink()
            elif rel >= 14 and "low" not in seen:
                seen["low"] = rel
                fillers.append(fill(disk, leave=2 * MiB))
            elif rel >= 22 and "room" not in seen:
                seen["room"] = rel
                fillers.pop().unlink()

        def frames() -> Iterator[tuple[float, int, bytes]]:
            for frame in _frames(*paths):
                at(frame[0])
                yield frame

        # small blocks: what the test does to the disk happens between blocks that are
        # already processed, not ahead of them
        pipeline.run_blocks(batched(frames(), size=16))
        pipeline.close("capture_end")
        assert set(seen) == {"full", "freed", "low", "room"}

        names = [e["event"] for e in log.events]
        order = [n for n in names if n in ("disk_full", "disk_ok", "disk_low")]
        # a full disk is below min_free too: seen at the tick, before the writes that fail
        assert order == ["disk_low", "disk_full", "disk_ok", "disk_low", "disk_ok"]
        assert "recording_failed" not in names and "audit_failed" not in names
        stats = pipeline.stats()
        assert stats.recordings_failed == 0 and stats.audit_failed == 0
        assert stats.recordings_incomplete == len(a.calls) + len(c.calls)

        got = published(out)
        assert got.keys() == whole.keys()
        for info, expect in ((a, "partial"), (b, "whole"), (c, "none"), (d, "whole")):
            for call in info.calls:
                doc, audio = got[call.call_id]
                ref_doc, ref_audio = whole[call.call_id]
                assert ref_audio is not None
                assert doc["end_reason"] == ref_doc["end_reason"]
                if expect == "whole":
                    assert audio is not None and np.array_equal(audio, ref_audio)
                    assert not _codes(doc) & {"disk_full", "disk_low"}
                elif expect == "partial":
                    assert audio is not None and 0 < len(audio) < len(ref_audio)
                    assert np.array_equal(audio, ref_audio[: len(audio)])
                    assert "disk_full" in _codes(doc)
                    # the audio stops where the disk filled, 4 s into the capture (less
                    # the jitter window and at most one flush interval)
                    first = min(call.caller.first_time, call.callee.first_time)
                    filled_at = t0 + 4 - first
                    assert filled_at - 1.5 <= len(audio) / 8000 <= filled_at + 0.05
                else:
                    assert audio is None and doc["audio"] is None
                    (warning,) = [w for w in doc["warnings"] if w["code"] == "disk_low"]
                    assert "storage.min_free (4MiB)" in warning["detail"]
                    assert "no audio of this call was recorded" in warning["detail"]
        result = _verify(out)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _spool_entries(out) == []


def test_no_room_for_the_reserve_records_nothing_and_says_why(tmp_path: Path) -> None:
    """A disk that cannot even hold the reserve when recording starts: calls get sidecars
    saying the disk was full, nothing half-written, and the run fails."""
    paths, (a, *_rest) = _batches(tmp_path)
    config = _config(tmp_path, "  min_free: 0\n  reserve: 8MiB\n")
    with small_disk(tmp_path / "disk", 4 * MiB) as disk:
        out = disk / "out"
        log = EventLog()
        pipeline = Pipeline(config, out, log)
        pipeline.run(_frames(paths[0]))
        pipeline.close("capture_end")
        (full,) = log.named("disk_full")
        assert "no room for the reserve" in full["error"]
        got = published(out)
        assert got.keys() == {call.call_id for call in a.calls}
        for doc, audio in got.values():
            assert audio is None and "disk_full" in _codes(doc)
        assert pipeline.stats().recordings_incomplete == len(a.calls)
        assert _verify(out).returncode == 0
        assert not list((out / ".spool").rglob("*.wav.part")) and _spool_entries(out) == []


def test_space_settings_are_checked_where_they_are_written(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  min_free: 0\n  reserve: 5%\n")
    with pytest.raises(Exception, match=r"bad\.yaml:3: storage\.reserve: must be a size in bytes"):
        load_config(bad)
    bad.write_text("storage:\n  min_free: 12 parsecs\n")
    with pytest.raises(Exception, match=r"bad\.yaml:2: storage\.min_free: expected a size"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("storage:\n  min_free: 1.5GiB\n  reserve: 0\n")
    storage = load_config(ok).storage
    assert storage.min_free.of(10**12) == 3 * (1 << 29) and storage.reserve.bytes == 0
    ok.write_text("storage:\n  min_free: 5%\n")
    assert load_config(ok).storage.min_free.of(2000) == 100


def test_errno_decides_the_kind_of_storage_error() -> None:
    from callcap.errors import is_disk_full, storage_error

    assert isinstance(storage_error("x", errno.ENOSPC), DiskFullError)
    assert isinstance(storage_error("x", errno.EDQUOT), DiskFullError)
    other = storage_error("x", errno.EACCES)
    assert type(other) is StorageError and not is_disk_full(other)
    wrapped = StorageError("y")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)


# -- the live daemon ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_daemon_disk_filled_and_freed_during_live_calls(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    """Calls replayed onto a veth in a private namespace, the daemon recording into a small
    tmpfs that the test fills and then frees while they are in flight: those calls are
    published cut short, the next ones whole, and the archive verifies clean."""
    net = netns_pair
    first, later = tmp_path / "first.pcap", tmp_path / "later.pcap"
    now = time.time()
    a = write_workload(first, calls=4, seconds=12, seed=21, start_time=now)
    b = write_workload(later, calls=3, seconds=5, seed=22, start_time=now + 13)
    config = live_config(tmp_path, extra="storage:\n  min_free: 0\n  reserve: 1MiB\n")
    with small_disk(tmp_path / "disk", 12 * MiB) as disk:
        out = disk / "out"
        daemon = RunningDaemon(
            tmp_path,
            ["--config", str(config), "--interface", net.veth_b, "--out", str(out)],
            netns=net.b,
        )
        try:
            daemon.wait_ready()

            def replay() -> None:
                tcpreplay(net.a, net.veth_a, first)
                tcpreplay(net.a, net.veth_a, later)

            sender = threading.Thread(target=replay, daemon=True)
            sender.start()
            time.sleep(4.0)
            filler = fill(disk)
            daemon.wait_event("disk_full", timeout=10)
            time.sleep(2.0)
            filler.unlink()
            daemon.wait_event("disk_ok", timeout=10)
            sender.join(timeout=90)
            total = len(a.calls) + len(b.calls)
            daemon.wait_event(
                "capture_stats", timeout=30, where=lambda e: e["recordings_total"] == total
            )
            assert daemon.stop() == 0, daemon.stderr[-3000:]
        finally:
            daemon.close()
        events = daemon.events()
        names = [e["event"] for e in events]
        assert "recording_failed" not in names and "audit_failed" not in names
        last = [e for e in events if e["event"] == "capture_stats"][-1]
        assert last["recordings_incomplete_total"] == len(a.calls)
        assert last["recordings_failed_total"] == last["audit_failed_total"] == 0
        got = published(out)
        assert got.keys() == {c.call_id for c in (*a.calls, *b.calls)}
        for info, cut in ((a, True), (b, False)):
            for call in info.calls:
                doc, audio = got[call.call_id]
                assert audio is not None
                assert doc["end_reason"] in ("bye_caller", "bye_callee")
                first_rtp = min(call.caller.first_time, call.callee.first_time)
                held = len(audio) / 8000
                if cut:
                    assert "disk_full" in _codes(doc)
                    assert 1.0 < held < 6.0  # it ended about when the disk filled
                else:
                    assert not _codes(doc) & {"disk_full", "disk_low"}
                for ch, side in ((0, call.caller), (1, call.callee)):
                    start = side.first_time - first_rtp + 0.1
                    end = min(held, side.first_time - first_rtp + side.packets_sent * 0.02) - 0.1
                    assert held_fraction(audio[:, ch], side.tone_hz, start, end) > 0.99
        result = _verify(out)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _spool_entries(out) == []
