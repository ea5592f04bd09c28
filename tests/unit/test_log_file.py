"""The shipped logrotate sample renames and reloads, never copies (the sample run by logrotate,
and a real proxy reopening its log file: tests/integration/test_log_file.py)."""

from __future__ import annotations

from tests.support.paths import ROOT

LOGROTATE_SAMPLE = ROOT / "systemd" / "xksproxy.logrotate"


def test_the_logrotate_sample_reloads_the_proxy() -> None:
    text = LOGROTATE_SAMPLE.read_text()
    assert "systemctl reload xksproxy.service" in text
    directives = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert "copytruncate" not in directives  # rename and reopen: nothing lost in a copy window
