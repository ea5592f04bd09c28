"""Running the CLI (and the test tools) as an operator would: in subprocesses."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT


def run_module(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` in a subprocess (which may load PKCS#11 modules freely)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed: {proc.stderr}")
    return proc


def xksproxy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would."""
    return run_module("xksproxy", *args, check=check)


def hsm_tool(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Look at one HSM of a rig alone (tests/support/hsm_tool.py)."""
    return run_module("tests.support.hsm_tool", *args, check=check)


def assert_one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    """A failure: non-zero exit, exactly one line on stderr, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xksproxy: "), lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under *directory*: its mode and bytes.

    SoftHSM rewrites the generation counter in its ``token.object`` on every login (even a
    read-only ``keys list`` does), and a lock file says who held it last, so those are compared
    by mode only; the token's key objects are compared byte for byte.
    """
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_file():
            volatile = path.name == "token.object" or path.suffix == ".lock"
            out[rel] = (mode, b"" if volatile else path.read_bytes())
        else:
            out[rel] = (mode, b"<dir>")
    return out
