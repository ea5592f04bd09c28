"""``xksproxy capacity`` as an operator runs it, on a rig whose HSM sits behind the
fault-injection module: the table and the JSON it writes, sessions that follow the rate, and
one line with exit 1 for an HSM that cannot serve.  Timings are never asserted."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import assert_one_line_failure, xksproxy
from tests.support.faultlib import FaultControl
from tests.support.rigs import DevRig, dev_rig
from xksproxy.config import default_workers

# 1 ms per data-path call, as loadtest's --hsm-latency-ms 1 (a LAN HSM).
DATA_CALLS = ("C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt")
# A short run: steps of 0.2 s at concurrency 1, 2 and 4.
SHORT = ("--step-seconds", "0.2", "--max-concurrency", "4")


@pytest.fixture(scope="module")
def fault_dev_rig(tmp_path_factory: pytest.TempPathFactory) -> DevRig:
    return dev_rig(tmp_path_factory.mktemp("capacity") / "rig", "--fault-injection")


@pytest.fixture
def control(fault_dev_rig: DevRig) -> Iterator[FaultControl]:
    ctl = FaultControl(fault_dev_rig.dir / "faults" / "softhsm-1")
    ctl.slow(1, DATA_CALLS)
    yield ctl
    ctl.ok()


def plan_of(rig: DevRig, rate: int, out: Path) -> tuple[str, dict[str, Any]]:
    proc = xksproxy(
        "capacity", "-c", str(rig.config), "--rate", str(rate), "--json", str(out), *SHORT
    )
    return proc.stdout, json.loads(out.read_text())


def test_capacity_prints_and_writes_the_plan(
    fault_dev_rig: DevRig, control: FaultControl, tmp_path: Path
) -> None:
    stdout, data = plan_of(fault_dev_rig, 200, tmp_path / "plan.json")
    lines = [line.split()[0] for line in stdout.splitlines() if line.startswith("  ")]
    for first in ("proxies", "workers", "HSMs", "sessions", "pool_size", "headroom:"):
        assert first in lines, stdout
    assert "predicted maximum" in stdout.splitlines()[-1]
    assert data["rate"] == 200
    (hsm,) = data["hsmsMeasured"]
    assert hsm["name"] == "softhsm-1"
    assert hsm["ivMode"].startswith("caller")
    concurrency = [s["concurrency"] for s in hsm["steps"]]
    assert concurrency == [1, 2, 4][: len(concurrency)]
    assert all(s["operations"] > 0 for s in hsm["steps"])
    assert hsm["steps"][0]["errors"] == 0  # or the HSM would be UNAVAILABLE
    assert hsm["stoppedBy"] in ("flat", "cpu", "bound", "errors")
    one = data["oneProxy"]
    assert one["limitedBy"] in ("cpu", "sessions", "hsm")
    assert one["max"] == min(one["bounds"].values())
    # Planned on its own CPU and sessions: the HSMs are planned apart (N+1).
    assert 0 < one["planned"] <= min(one["bounds"]["cpu"], one["bounds"]["sessions"])
    assert data["proxyShape"]["workers"] == default_workers()  # the rig sets none
    plan = data["plan"]
    assert plan["proxies"] >= 1 and plan["workersPerProxy"] >= 1
    assert plan["hsms"] == plan["hsmsServingWithOneLost"] + 1 >= 2
    assert 1 <= plan["poolSize"] <= 256
    assert plan["sessionsPerProxyPerHsm"] >= plan["sessionsBusyPerProxyPerHsm"]
    assert data["headroom"] == {"cpuTarget": 0.7, "sessionFactor": 2.0, "hsmTarget": 0.7}


def test_sessions_follow_the_rate(
    fault_dev_rig: DevRig, control: FaultControl, tmp_path: Path
) -> None:
    plans = {
        rate: plan_of(fault_dev_rig, rate, tmp_path / f"{rate}.json")[1] for rate in (50, 1000)
    }
    for data in plans.values():
        p = data["plan"]
        # Little's law, as the plan states it: busy = rate per proxy / HSMs serving x op time.
        busy = p["ratePerProxy"] / p["hsmsServingWithOneLost"] * data["opMs"] / 1000
        assert p["sessionsBusyPerProxyPerHsm"] == pytest.approx(busy, abs=0.01)
        assert p["sessionsPerProxyPerHsm"] == max(1, math.ceil(busy * 2 - 1e-9))
    fleet = {
        r: d["plan"]["sessionsBusyPerProxyPerHsm"] * d["plan"]["proxies"] for r, d in plans.items()
    }
    assert fleet[1000] > fleet[50]


@pytest.mark.parametrize("fault", ["error CKR_DEVICE_ERROR", "wrong PIN"])
def test_an_unavailable_hsm_is_one_line_and_exit_1(
    fault_dev_rig: DevRig, tmp_path: Path, fault: str
) -> None:
    ctl = FaultControl(fault_dev_rig.dir / "faults" / "softhsm-1")
    pin_file = fault_dev_rig.dir / "secrets" / "softhsm-1" / "hsm-pin"
    pin = pin_file.read_text()
    if fault == "wrong PIN":
        pin_file.write_text("0000-not-the-pin\n")
    else:
        ctl.error("CKR_DEVICE_ERROR")
    try:
        proc = xksproxy(
            "capacity",
            "-c",
            str(fault_dev_rig.config),
            "--rate",
            "100",
            "--json",
            str(tmp_path / "plan.json"),
            *SHORT,
            check=False,
        )
    finally:
        ctl.ok()
        pin_file.write_text(pin)
    assert proc.returncode == 1
    assert "pool_size" not in proc.stdout  # no plan
    line = assert_one_line_failure(proc)
    assert line.startswith("xksproxy: error: hsm softhsm-1: UNAVAILABLE: "), line
    assert not (tmp_path / "plan.json").exists()


def test_a_bad_rate_is_a_usage_error(fault_dev_rig: DevRig) -> None:
    proc = xksproxy("capacity", "-c", str(fault_dev_rig.config), "--rate", "0", check=False)
    assert proc.returncode == 2
    assert "--rate: must be above 0" in proc.stderr
