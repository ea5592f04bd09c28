"""The systemd units in systemd/: they verify, and they run commands the CLI has."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, xksproxy

UNITS = sorted(
    p for p in (ROOT / "systemd").glob("xksproxy*.*") if p.suffix in (".service", ".timer")
)


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_every_timer_starts_a_service_that_exists() -> None:
    timers = [u for u in UNITS if u.suffix == ".timer"]
    assert {t.stem for t in timers} == {"xksproxy-rotate-due", "xksproxy-purge-due"}
    for timer in timers:
        assert (timer.with_suffix(".service")).exists()
        assert unit(timer)["Timer"]["Persistent"] == "true"


@pytest.mark.parametrize("name", ["xksproxy-rotate-due", "xksproxy-purge-due"])
def test_the_service_runs_a_real_cli_command(name: str) -> None:
    service = unit(ROOT / "systemd" / f"{name}.service")["Service"]
    assert service["Type"] == "oneshot"
    argv = shlex.split(service["ExecStart"])
    assert argv[1:4] == ["keys", name.removeprefix("xksproxy-"), "-c"]
    proc = xksproxy(*argv[1:3], "--help")
    assert "--dry-run" in proc.stdout


def test_the_proxy_unit_notifies_reloads_and_is_hardened() -> None:
    service = unit(ROOT / "systemd" / "xksproxy.service")["Service"]
    assert service["Type"] == "notify"  # READY=1 from xksproxy/sdnotify.py (tests/test_sdnotify.py)
    assert shlex.split(service["ExecStart"])[1:3] == ["serve", "-c"]
    assert "kill -HUP $MAINPID" in service["ExecReload"]
    assert service["RestartPreventExitStatus"] == "78"  # a configuration error: do not loop
    assert service["User"] == "xksproxy"
    assert service["LoadCredential"].startswith("hsm-pin:")
    for setting, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "LimitCORE": "0",
    }.items():
        assert service[setting].split("#")[0].strip() == value, setting


@pytest.mark.parametrize("name", ["xksproxy-rotate-due", "xksproxy-purge-due"])
def test_the_timer_units_load_the_same_credential(name: str) -> None:
    proxy = unit(ROOT / "systemd" / "xksproxy.service")["Service"]["LoadCredential"]
    assert unit(ROOT / "systemd" / f"{name}.service")["Service"]["LoadCredential"] == proxy


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
