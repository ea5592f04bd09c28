"""The systemd units in systemd/, read as text: timers, hardening, credentials (their commands
run, and systemd-analyze: tests/integration/test_systemd_commands.py)."""

from __future__ import annotations

import shlex

import pytest

from tests.support.paths import ROOT
from tests.support.systemd_units import UNITS, unit


def test_every_timer_starts_a_service_that_exists() -> None:
    timers = [u for u in UNITS if u.suffix == ".timer"]
    assert {t.stem for t in timers} == {"xksproxy-rotate-due", "xksproxy-purge-due"}
    for timer in timers:
        assert (timer.with_suffix(".service")).exists()
        assert unit(timer)["Timer"]["Persistent"] == "true"


def test_the_proxy_unit_notifies_reloads_and_is_hardened() -> None:
    service = unit(ROOT / "systemd" / "xksproxy.service")["Service"]
    # READY=1 from xksproxy/sdnotify.py (tests/integration/test_sdnotify_proxy.py)
    assert service["Type"] == "notify"
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
