"""The fault-injection module's helpers (xksproxy/dev/faultinject/), without SoftHSM: the
profiles, return codes and functions they take are those of the module's C source, and bad
ones are refused before anything is written.  The module itself, loaded:
tests/integration/test_faultinject.py and tests/integration/test_vendor_emulation.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xksproxy.dev.faultinject import (
    FAULT_SOURCE,
    PROFILES,
    VENDOR_OF_PROFILE,
    FaultControl,
    ckr_names,
    conf_text,
    faultable_functions,
    install_copy,
)


def test_profiles_match_the_module_source() -> None:
    names = re.findall(r'\[XKS_PROFILE_\w+\] = "([a-z-]+)"', FAULT_SOURCE.read_text("utf-8"))
    assert tuple(names) == PROFILES
    assert PROFILES[0] == "softhsm"
    assert set(VENDOR_OF_PROFILE) == set(PROFILES)
    assert VENDOR_OF_PROFILE["luna-fips"] == VENDOR_OF_PROFILE["luna"] == "luna"
    assert VENDOR_OF_PROFILE["protectserver-fips"] == "protectserver"
    assert VENDOR_OF_PROFILE["lost-iv"] == "softhsm"


def test_conf_text_writes_the_profile_line_only_when_not_softhsm(tmp_path: Path) -> None:
    real = tmp_path / "libsofthsm2.so"
    assert "profile" not in conf_text(real, None)
    assert "profile" not in conf_text(real, None, "softhsm")
    assert conf_text(real, None, "luna-fips").endswith("profile = luna-fips\n")
    assert "token_clock" not in conf_text(real, None)
    clock = tmp_path / "clock"
    assert f"token_clock = {clock}\n" in conf_text(real, None, "softhsm", clock)
    with pytest.raises(ValueError, match="thales"):
        conf_text(real, None, "thales")
    with pytest.raises(ValueError, match="thales"):
        install_copy(tmp_path / "x.so", tmp_path / "copy", real_module=real, control=None,
                     profile="thales")  # fmt: skip
    assert not (tmp_path / "copy").exists()


def test_fault_control_rejects_unknown_names(tmp_path: Path) -> None:
    control = FaultControl(tmp_path / "ctl")
    assert "CKR_DEVICE_ERROR" in ckr_names()
    with pytest.raises(ValueError, match="CKR_"):
        control.error("CKR_DEVICE_EROR")
    assert not control.path.exists()
    control.error("CKR_PIN_INCORRECT")
    assert control.read() == "error CKR_PIN_INCORRECT"


def test_fault_control_rejects_functions_that_are_not_faultable(tmp_path: Path) -> None:
    control = FaultControl(tmp_path / "ctl")
    assert {"C_UnwrapKey", "C_DeriveKey", "C_DestroyObject"} <= faultable_functions()
    assert "C_Initialize" not in faultable_functions()
    with pytest.raises(ValueError, match="C_Initialize"):
        control.error("CKR_DEVICE_ERROR", ["C_Initialize"])
    with pytest.raises(ValueError, match="C_Nonsense"):
        control.hang(["C_Nonsense"])
    assert not control.path.exists()
