"""The systemd units run real commands: each timer's service its CLI command (asked for its
--help), and ``systemd-analyze verify`` passes on them where it exists (their settings, read
as text: tests/unit/test_systemd.py)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.commands import xksproxy
from tests.support.paths import ROOT
from tests.support.systemd_units import UNITS, unit


@pytest.mark.parametrize("name", ["xksproxy-rotate-due", "xksproxy-purge-due"])
def test_the_service_runs_a_real_cli_command(name: str) -> None:
    service = unit(ROOT / "systemd" / f"{name}.service")["Service"]
    assert service["Type"] == "oneshot"
    argv = shlex.split(service["ExecStart"])
    assert argv[1:4] == ["keys", name.removeprefix("xksproxy-"), "-c"]
    proc = xksproxy(*argv[1:3], "--help")
    assert "--dry-run" in proc.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    # The units name /opt/xksproxy/bin/xksproxy; point them at this checkout's CLI to verify.
    cli = Path(sys.executable).with_name("xksproxy")
    for path in UNITS:
        text = path.read_text().replace("/opt/xksproxy/bin/xksproxy", str(cli))
        (tmp_path / path.name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "xksproxy" not in proc.stderr, proc.stderr
