"""The shipped unit passes ``systemd-analyze verify`` and stays within the exposure budget."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "callcap.service"


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as an admin installs it, pointing at a callcap that exists on this machine."""
    callcap = shutil.which("callcap") or shutil.which("true")
    assert callcap is not None
    unit = tmp_path / "callcap.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/callcap", callcap),
        encoding="utf-8",
    )
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout + proc.stderr)
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_unit_declares_the_hardening_the_admin_relies_on() -> None:
    text = UNIT.read_text(encoding="utf-8")
    for line in (
        "Type=notify",
        "User=callcap",
        "AmbientCapabilities=CAP_NET_RAW",
        "CapabilityBoundingSet=CAP_NET_RAW",
        "StateDirectory=callcap",
        "ConfigurationDirectory=callcap",
        "UMask=0027",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_PACKET AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 4",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert any(row.startswith(line) for row in text.splitlines()), line
