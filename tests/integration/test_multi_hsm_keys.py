"""Several HSMs: rigs made by ``dev-setup --hsms N``, keys with the same material on each.

Everything runs as an operator would, through the ``xksproxy`` CLI in subprocesses, on real
SoftHSM instances (one copy of the library per HSM).  What one HSM alone holds or can do is
looked at with ``tests/support/hsm_tool.py``, also a subprocess that opens only that HSM: the pytest
process never loads SoftHSM here.  Faults come from each HSM's own copy of the fault-injection
module (``--fault-injection``), told through that HSM's control file to fail one function.
"""

from __future__ import annotations

import json
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import assert_one_line_failure, hsm_tool, snapshot, xksproxy
from tests.support.faultlib import CONF_NAME, FAULT_LIBRARY_NAME
from tests.support.rigs import MultiRig, make_multi_rig, objects_everywhere

IV = bytes(range(12)).hex()
AAD = b"tenant=multi".hex()
PLAINTEXT = b"the same key on every HSM".hex()


@pytest.fixture(scope="module")
def rig2(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("multi") / "rig", 2)


@pytest.fixture(scope="module")
def rig3f(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("multi-faults") / "rig", 3, "--fault-injection")


@pytest.fixture
def faults(rig3f: MultiRig) -> Iterator[MultiRig]:
    """The fault rig, every HSM healthy before and after the test."""
    yield from rig3f.all_healthy()


def assert_on_every_hsm_alike(entry: dict[str, Any], names: list[str]) -> None:
    assert list(entry["hsms"]) == names
    assert all(entry["hsms"][n] is not None for n in names), entry
    kcvs = [entry["kcv"][n] for n in names]
    assert kcvs[0] is not None
    assert kcvs == [kcvs[0]] * len(names)
    assert entry["consistent"] is True
    assert entry["problems"] == []


# --- dev-setup ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rig2", "rig3f"])
def test_dev_setup_multi_hsm_rig_passes_check(request: pytest.FixtureRequest, which: str) -> None:
    rig: MultiRig = request.getfixturevalue(which)
    proc = rig.run("check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for name in rig.names:
        assert f"hsm {name} " in proc.stdout
    assert proc.stdout.count("ACTIVE") == len(rig.names)


@pytest.mark.parametrize("which", ["rig2", "rig3f"])
def test_dev_setup_demo_key_is_alike_on_every_hsm(
    request: pytest.FixtureRequest, which: str
) -> None:
    rig: MultiRig = request.getfixturevalue(which)
    foo = rig.listing()["foo"]
    assert foo["keyStatus"] == "ENABLED"
    assert foo["keyUsage"] == ["ENCRYPT", "DECRYPT"]
    assert_on_every_hsm_alike(foo, rig.names)


def test_dev_setup_gives_each_hsm_its_own_instance(rig2: MultiRig) -> None:
    config = tomllib.loads(rig2.config.read_text())
    tables = config["hsms"]
    assert [t["name"] for t in tables] == rig2.names
    for t in tables:
        home = rig2.dir / "hsms" / t["name"]
        assert rig2.dir / t["module"] == home / "libsofthsm2.so"
        assert rig2.dir / t["env"]["SOFTHSM2_CONF"] == home / "softhsm2.conf"
        assert f"directories.tokendir = {home / 'tokens'}" in (home / "softhsm2.conf").read_text()
        assert any((home / "tokens").iterdir())
        pin = rig2.dir / t["pin_file"]
        assert pin == rig2.dir / "secrets" / t["name"] / "hsm-pin"
        assert stat.S_IMODE(pin.stat().st_mode) == 0o600
    pins = {(rig2.dir / t["pin_file"]).read_text() for t in tables}
    assert len(pins) == len(tables)  # each HSM has its own PIN


def test_dev_setup_with_fault_injection_gives_each_hsm_its_own_shim(rig3f: MultiRig) -> None:
    tables = tomllib.loads(rig3f.config.read_text())["hsms"]
    for t in tables:
        home = rig3f.dir / "hsms" / t["name"]
        assert rig3f.dir / t["module"] == home / FAULT_LIBRARY_NAME
        conf = (home / CONF_NAME).read_text()
        assert f"real_module = {home / 'libsofthsm2.so'}\n" in conf
        assert f"control = {rig3f.dir / 'faults' / t['name']}\n" in conf
        assert rig3f.control(t["name"]).read() == "ok"


def test_dev_setup_health_keys_are_per_hsm(rig2: MultiRig) -> None:
    kcvs = {n: hsm_tool("kcv", str(rig2.config), n, "xksproxy-health").stdout for n in rig2.names}
    assert len(set(kcvs.values())) == len(rig2.names), kcvs
    proc = rig2.run("keys", "init-health")
    assert proc.returncode == 0, proc.stderr
    for name in rig2.names:
        assert f"health key 'xksproxy-health' on {name} already exists" in proc.stdout


@pytest.mark.parametrize("options", [["--hsms", "2"], ["--hsms", "2", "--fault-injection"]])
def test_dev_setup_again_changes_nothing(tmp_path: Path, options: list[str]) -> None:
    directory = tmp_path / "rig"
    first = xksproxy("dev-setup", str(directory), *options, check=False)
    assert first.returncode == 0, first.stderr
    before = snapshot(directory)
    again = xksproxy("dev-setup", str(directory), *options, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert snapshot(directory) == before


@pytest.mark.parametrize(
    "options",
    [[], ["--hsms", "3"], ["--hsms", "1"], ["--hsms", "2", "--fault-injection"]],
    ids=["one", "three", "explicit-one", "with-faults"],
)
def test_dev_setup_other_options_on_a_multi_hsm_rig_are_refused(
    rig2: MultiRig, options: list[str]
) -> None:
    before = snapshot(rig2.dir)
    line = assert_one_line_failure(xksproxy("dev-setup", str(rig2.dir), *options, check=False))
    assert "2 HSMs" in line
    assert snapshot(rig2.dir) == before


def test_dev_setup_more_hsms_on_a_one_hsm_rig_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "rig"
    assert xksproxy("dev-setup", str(directory), check=False).returncode == 0
    before = snapshot(directory)
    line = assert_one_line_failure(
        xksproxy("dev-setup", str(directory), "--hsms", "2", check=False)
    )
    assert "1 HSM," in line
    assert snapshot(directory) == before


# --- keys create --------------------------------------------------------------------------


def test_keys_create_gives_the_same_kcv_on_every_hsm(rig2: MultiRig) -> None:
    out = rig2.create("k-equal")
    assert list(out["kcv"]) == rig2.names
    assert out["kcv"]["softhsm-1"].startswith("E:")
    assert out["kcv"]["softhsm-1"] == out["kcv"]["softhsm-2"]
    assert out["transport"].startswith("RSA-3072 OAEP")
    assert out["keyStatus"] == "ENABLED"
    assert_on_every_hsm_alike(rig2.listing()["k-equal"], rig2.names)


def test_key_made_on_two_hsms_works_on_each_alone(rig2: MultiRig) -> None:
    rig2.create("k-cross")
    cfg = str(rig2.config)
    one = hsm_tool("encrypt", cfg, "softhsm-1", "k-cross", IV, AAD, PLAINTEXT).stdout.strip()
    two = hsm_tool("encrypt", cfg, "softhsm-2", "k-cross", IV, AAD, PLAINTEXT).stdout.strip()
    assert one == two  # the same key, IV and AAD: the same ciphertext and tag
    assert (
        hsm_tool("decrypt", cfg, "softhsm-2", "k-cross", IV, AAD, one).stdout.strip() == PLAINTEXT
    )
    assert (
        hsm_tool("decrypt", cfg, "softhsm-1", "k-cross", IV, AAD, two).stdout.strip() == PLAINTEXT
    )


def test_keys_create_usage_none_on_every_hsm(rig2: MultiRig) -> None:
    out = rig2.create("k-none", "--usage", "none")
    assert out["keyUsage"] == []
    assert out["kcv"] == {"softhsm-1": None, "softhsm-2": None}  # no KCV without a usage
    entry = rig2.listing()["k-none"]
    assert entry["consistent"] is True
    assert all(entry["hsms"][n]["keyUsage"] == [] for n in rig2.names)


def test_keys_create_decrypt_only_on_every_hsm(rig2: MultiRig) -> None:
    out = rig2.create("k-dec", "--usage", "decrypt")
    assert out["kcv"]["softhsm-1"].startswith("D:")
    assert_on_every_hsm_alike(rig2.listing()["k-dec"], rig2.names)


def test_keys_create_an_id_on_one_hsm_only_is_refused(rig2: MultiRig) -> None:
    lone = rig2.only("softhsm-2")
    assert rig2.run("keys", "create", "k-lone", "--usage", "encrypt", config=lone).returncode == 0
    before = rig2.listing()
    objects_before = hsm_tool("objects", str(rig2.config), "softhsm-1", "k-lone").stdout
    line = assert_one_line_failure(rig2.run("keys", "create", "k-lone"))
    assert "k-lone" in line
    assert "softhsm-2" in line
    assert rig2.listing() == before
    assert hsm_tool("objects", str(rig2.config), "softhsm-1", "k-lone").stdout == objects_before
    assert before["k-lone"]["hsms"]["softhsm-2"]["keyUsage"] == ["ENCRYPT"]


def test_keys_create_the_health_key_label_is_refused(rig2: MultiRig) -> None:
    assert "health" in assert_one_line_failure(rig2.run("keys", "create", "xksproxy-health"))


# --- keys list ----------------------------------------------------------------------------


def test_keys_list_flags_a_missing_copy(rig2: MultiRig) -> None:
    assert rig2.run("keys", "create", "k-missing", config=rig2.only("softhsm-1")).returncode == 0
    entry = rig2.listing()["k-missing"]
    assert entry["hsms"]["softhsm-2"] is None
    assert entry["kcv"]["softhsm-2"] is None
    assert entry["consistent"] is False
    assert entry["problems"] == ["missing on softhsm-2"]
    table = rig2.run("keys", "list").stdout
    (row,) = [line for line in table.splitlines() if line.startswith("k-missing ")]
    assert row.split()[-1] == "missing-on-softhsm-2"
    assert "# k-missing: missing on softhsm-2" in table


def test_keys_list_flags_copies_that_differ(rig2: MultiRig) -> None:
    for name in rig2.names:  # two keys made apart: same id, different material
        assert rig2.run("keys", "create", "k-twin", config=rig2.only(name)).returncode == 0
    entry = rig2.listing()["k-twin"]
    assert entry["consistent"] is False
    assert entry["kcv"]["softhsm-1"] != entry["kcv"]["softhsm-2"]
    assert len(entry["problems"]) == 1
    assert entry["problems"][0].startswith("KCV of version 1 differs: softhsm-1 E:")


def test_keys_list_table_shows_the_kcv_and_ok(rig2: MultiRig) -> None:
    kcv = rig2.create("k-table")["kcv"]["softhsm-1"]
    lines = rig2.run("keys", "list").stdout.splitlines()
    assert lines[0].split() == ["KEY", "ID", "STATUS", "USAGE", "VERSIONS", "KCV", "COPIES"]
    (row,) = [line for line in lines if line.startswith("k-table ")]
    assert row.split() == ["k-table", "ENABLED", "encrypt,decrypt", "1", kcv, "ok"]


# --- keys enable / disable ----------------------------------------------------------------


def test_disable_and_enable_reach_every_hsm(rig2: MultiRig) -> None:
    rig2.create("k-state")
    proc = rig2.run("keys", "disable", "k-state")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hsms"] == rig2.names
    entry = rig2.listing()["k-state"]
    assert [entry["hsms"][n]["keyStatus"] for n in rig2.names] == ["DISABLED", "DISABLED"]
    assert rig2.run("keys", "enable", "k-state").returncode == 0
    entry = rig2.listing()["k-state"]
    assert [entry["hsms"][n]["keyStatus"] for n in rig2.names] == ["ENABLED", "ENABLED"]


def test_disable_with_a_missing_copy_disables_the_others(rig2: MultiRig) -> None:
    assert rig2.run("keys", "create", "k-half", config=rig2.only("softhsm-2")).returncode == 0
    proc = rig2.run("keys", "disable", "k-half")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {
        "keyId": "k-half",
        "keyStatus": "DISABLED",
        "rotationPeriodInDays": None,
        "hsms": ["softhsm-2"],
        "missingOn": ["softhsm-1"],
    }
    assert "missing on softhsm-1" in proc.stderr
    assert rig2.listing()["k-half"]["hsms"]["softhsm-2"]["keyStatus"] == "DISABLED"


def test_disable_an_unknown_key_fails(rig2: MultiRig) -> None:
    assert "does not exist" in assert_one_line_failure(rig2.run("keys", "disable", "k-nowhere"))


# --- failures during create: rollback -----------------------------------------------------


@pytest.mark.parametrize(
    ("hsm", "function"),
    [
        ("softhsm-2", "C_UnwrapKey"),
        ("softhsm-2", "C_GenerateKeyPair"),
        ("softhsm-3", "C_DeriveKey"),
        ("softhsm-3", "C_CreateObject"),
        ("softhsm-1", "C_WrapKey"),
    ],
)
def test_a_failing_hsm_during_create_leaves_nothing_anywhere(
    faults: MultiRig, hsm: str, function: str
) -> None:
    key_id = f"k-rollback-{function}"
    faults.control(hsm).error("CKR_DEVICE_ERROR", [function])
    line = assert_one_line_failure(faults.run("keys", "create", key_id))
    assert hsm in line
    assert "CKR_DEVICE_ERROR" in line
    assert "nothing was left on any HSM" in line
    faults.control(hsm).ok()
    assert key_id not in faults.listing()
    assert objects_everywhere(faults, key_id) == {n: [] for n in faults.names}
    faults.create(key_id)  # the id is free: the same create now succeeds everywhere
    assert_on_every_hsm_alike(faults.listing()[key_id], faults.names)


def test_an_incomplete_rollback_names_the_hsm_to_clean(faults: MultiRig) -> None:
    faults.control("softhsm-1").error("CKR_DEVICE_ERROR", ["C_DestroyObject"])
    faults.control("softhsm-2").error("CKR_DEVICE_ERROR", ["C_UnwrapKey"])
    line = assert_one_line_failure(faults.run("keys", "create", "k-left"))
    assert "rollback incomplete" in line
    assert "softhsm-1" in line.split("rollback incomplete")[1]
    faults.control("softhsm-1").ok()
    faults.control("softhsm-2").ok()
    assert objects_everywhere(faults, "k-left") == {
        "softhsm-1": ["DATA", "SECRET_KEY"],  # still CREATING: never served
        "softhsm-2": [],
        "softhsm-3": [],
    }
    assert "keys create k-left removes it" in line
    assert faults.run("keys", "create", "k-left").returncode == 0  # and so it does
    assert objects_everywhere(faults, "k-left") == {n: ["DATA", "SECRET_KEY"] for n in faults.names}


def test_an_hsm_down_at_login_refuses_create_on_every_hsm(faults: MultiRig) -> None:
    faults.control("softhsm-3").error("CKR_DEVICE_ERROR")
    line = assert_one_line_failure(faults.run("keys", "create", "k-down"))
    assert "softhsm-3" in line
    faults.control("softhsm-3").ok()
    assert objects_everywhere(faults, "k-down") == {n: [] for n in faults.names}


def test_fault_shims_are_independent_per_hsm(faults: MultiRig) -> None:
    faults.control("softhsm-2").error("CKR_DEVICE_ERROR")
    cfg = str(faults.config)
    assert hsm_tool("kcv", cfg, "softhsm-1", "foo").returncode == 0
    assert hsm_tool("kcv", cfg, "softhsm-3", "foo").returncode == 0
    down = hsm_tool("kcv", cfg, "softhsm-2", "foo", check=False)
    assert down.returncode != 0
    assert "CKR_DEVICE_ERROR" in down.stderr
