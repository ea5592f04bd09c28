"""``serve`` refuses a secret file group or others may read, in one line (reading secret files
alone: tests/unit/test_secret_files.py)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT
from tests.support.rigs import make_rig


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
        cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("secret", ["secrets/hsm-pin", "credentials.json"])
def test_serve_refuses_a_world_readable_secret_in_one_line(tmp_path: Path, secret: str) -> None:
    rig = make_rig(tmp_path / "rig")
    path = rig.dir / secret
    path.chmod(0o644)
    proc = serve(rig.config)
    assert proc.returncode == 78, proc.stderr
    assert "readable by group and others (mode 0644)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # never changed behind the operator's back
