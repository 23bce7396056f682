"""A 10.5-hour call is recorded in the same memory as a 10-minute one (streaming, bounded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from callgen import write_long_call

pytestmark = pytest.mark.slow


# Linux carries a parent's RSS high-water mark into a forked child, even across exec, so
# measuring callcap as a direct child of pytest would report at least pytest's own RSS and
# could not see a regression below it.  A tiny launcher (python -I -S) starts callcap and
# reports the child's ru_maxrss from wait4.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _record_peak_rss(pcap: Path, out: Path) -> tuple[int, list[dict[str, object]]]:
    """Run ``callcap record`` and return its peak RSS (bytes) and its sidecars."""
    argv = [sys.executable, "-m", "callcap", "record", str(pcap), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, *argv],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    code, rss = proc.stdout.splitlines()[-1].split()  # callcap prints its WAV paths first
    assert code == "0", proc.stderr[-3000:]
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in out.rglob("*.json")]
    return int(rss), docs


def test_ten_and_a_half_hour_call_uses_no_more_memory_than_ten_minutes(tmp_path: Path) -> None:
    short = tmp_path / "short.pcap"
    long = tmp_path / "long.pcap"
    write_long_call(short, 600)
    packets = write_long_call(long, 10.5 * 3600)
    assert packets > 3_700_000
    rss_short, docs_short = _record_peak_rss(short, tmp_path / "out-short")
    short.unlink()
    rss_long, docs_long = _record_peak_rss(long, tmp_path / "out-long")
    long.unlink()
    assert rss_long <= rss_short + 10 * 1024 * 1024, (
        f"10.5 h: {rss_long / 1e6:.1f} MB, 10 min: {rss_short / 1e6:.1f} MB"
    )
    ((doc,),) = (docs_long,)
    assert docs_short[0]["audio"]["frames"] == pytest.approx(600.5 * 8000, abs=8000)
    assert doc["audio"]["frames"] == pytest.approx((10.5 * 3600 + 0.5) * 8000, abs=8000)
    assert doc["audio"]["format"] == "WAV"  # 605 MB of audio: well under the RF64 threshold
    wav = next((tmp_path / "out-long").rglob("*.wav"))
    info = soundfile.info(str(wav))
    assert info.frames == doc["audio"]["frames"]
    assert all(s["lost"] == 0 and s["late"] == 0 for s in doc["streams"])
