"""[logging] file: lines appended to a file, reopened on SIGHUP so that logrotate can rename
it (a real two-worker proxy), and the shipped logrotate sample run by logrotate (what the
sample says, read as text: tests/unit/test_log_file.py)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.api import b64
from tests.support.paths import ROOT
from tests.support.rigs import make_rig
from tests.support.waiting import until
from tests.support.xks_client import XksClient

LOGROTATE_SAMPLE = ROOT / "systemd" / "xksproxy.logrotate"


def events(path: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def test_sighup_reopens_the_log_file_after_logrotate_renamed_it(tmp_path: Path) -> None:
    log = tmp_path / "var" / "xksproxy.log"
    log.parent.mkdir()
    rig = make_rig(tmp_path / "rig", settings={"logging": {"file": str(log)}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(rig.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        until(lambda: log.exists() and bool(events(log, "listening")), "listening in the file")
        assert (log.stat().st_mode & 0o777) == 0o640
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        assert client.encrypt("foo", plaintext=b64(b"before")).status == 200
        rotated = log.with_suffix(".log.1")
        log.rename(rotated)  # what logrotate does, then its postrotate sends SIGHUP
        proc.send_signal(signal.SIGHUP)
        until(lambda: log.exists() and len(events(log, "reload_applied")) == 2, "reload, new file")
        assert client.encrypt("foo", plaintext=b64(b"after")).status == 200
        until(lambda: len(events(log, "xks_request")) == 1, "the second request in the new file")
        assert len(events(rotated, "xks_request")) == 1  # the first stayed in the old one
        assert events(log, "sighup_forwarded")  # the supervisor's own lines moved too
        assert not events(rotated, "reload_applied")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert out == b""  # every line went to the file
    assert b"Traceback" not in err


def test_an_unwritable_log_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-directory" / "xksproxy.log"
    rig = make_rig(tmp_path / "rig", settings={"logging": {"file": str(missing)}})
    done = subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(rig.config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 78
    assert f"logging.file: cannot open {missing}: No such file or directory" in done.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="no logrotate here")
def test_the_logrotate_sample_parses(tmp_path: Path) -> None:
    state, sample = tmp_path / "state", tmp_path / "xksproxy.logrotate"
    # The service user does not exist on a test machine: the same file with root's.
    sample.write_text(LOGROTATE_SAMPLE.read_text().replace("xksproxy xksproxy", "root root"))
    done = subprocess.run(
        ["logrotate", "--debug", "--state", str(state), str(sample)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower()
