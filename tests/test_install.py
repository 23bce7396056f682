"""``make install`` / ``make uninstall`` into a staging root (DESTDIR): what lands where,
with which modes, that the installed program runs, and what uninstall keeps.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from callcap.storage.sidecar import load_schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["make", "-C", str(REPO), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_make_install_and_uninstall_into_a_staging_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = _make("install", f"DESTDIR={root}")
    assert "not activated" in proc.stdout  # nothing touched outside the staging root

    unit = root / "usr/local/lib/systemd/system/callcap.service"
    sysusers = root / "usr/local/lib/sysusers.d/callcap.conf"
    tmpfiles = root / "usr/local/lib/tmpfiles.d/callcap.conf"
    confdir = root / "etc/callcap"
    config = confdir / "callcap.yaml"
    link = root / "usr/local/bin/callcap"
    venv = root / "opt/callcap"
    for path, mode in ((unit, 0o644), (sysusers, 0o644), (tmpfiles, 0o644), (config, 0o640)):
        assert _mode(path) == mode, path
    assert _mode(confdir) == 0o750
    assert config.read_bytes() == (REPO / "config/default.yaml").read_bytes()
    assert sysusers.read_bytes() == (REPO / "systemd/callcap.sysusers").read_bytes()
    assert tmpfiles.read_bytes() == (REPO / "systemd/callcap.tmpfiles").read_bytes()
    assert link.is_symlink() and os.readlink(link) == "/opt/callcap/bin/callcap"
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/usr/local/bin/callcap daemon --config /etc/callcap/callcap.yaml"
    ]
    # the installed program runs from its own virtualenv, not from this checkout
    out = subprocess.run(
        [str(venv / "bin/python"), "-I", "-c", "import callcap, sys; print(callcap.__file__)"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.startswith(str(venv))
    schema = subprocess.run(
        [str(venv / "bin/callcap"), "schema"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(schema.stdout) == load_schema()

    # an admin's edited config survives a reinstall
    config.write_text("recording:\n  out_dir: /srv/calls\n", encoding="utf-8")
    _make("install-files", f"DESTDIR={root}")
    assert config.read_text(encoding="utf-8") == "recording:\n  out_dir: /srv/calls\n"

    recording = root / "var/lib/callcap/recordings/2026/01/01/000000_x.wav"
    recording.parent.mkdir(parents=True)
    recording.write_bytes(b"RIFF")
    _make("uninstall", f"DESTDIR={root}")
    for gone in (unit, sysusers, tmpfiles, link, venv):
        assert not gone.exists() and not gone.is_symlink(), gone
    assert config.exists() and recording.exists()  # kept unless asked

    _make("uninstall", f"DESTDIR={root}", "PURGE=yes")
    assert not confdir.exists() and not (root / "var/lib/callcap").exists()


def test_install_paths_follow_prefix_and_sysconfdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _make("install-files", f"DESTDIR={root}", "PREFIX=/usr", "SYSCONFDIR=/etc/pbx")
    unit = root / "usr/lib/systemd/system/callcap.service"
    text = unit.read_text(encoding="utf-8")
    assert "ExecStart=/usr/bin/callcap daemon --config /etc/pbx/callcap/callcap.yaml" in text
    assert (root / "usr/lib/sysusers.d/callcap.conf").is_file()
    assert (root / "usr/lib/tmpfiles.d/callcap.conf").is_file()
    assert _mode(root / "etc/pbx/callcap/callcap.yaml") == 0o640
    assert os.readlink(root / "usr/bin/callcap") == "/opt/callcap/bin/callcap"
    # the rest of the unit is the shipped one, line for line
    shipped = (REPO / "systemd/callcap.service").read_text(encoding="utf-8").splitlines()
    installed = text.splitlines()
    assert len(shipped) == len(installed)
    assert [a for a, b in zip(shipped, installed, strict=True) if a != b] == [
        "ExecStart=/usr/local/bin/callcap daemon --config /etc/callcap/callcap.yaml"
    ]
