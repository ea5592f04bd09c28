"""``xksproxy keys replicate``: copying keys, with every version and their state, to another HSM.

As in test_multi_hsm_keys.py, everything runs as an operator would: the CLI and the proxy in
subprocesses, on rigs made by ``dev-setup --hsms 2 --fault-injection`` (each SoftHSM behind its
own fault-injection module).  What the CLI cannot do (add a version on one HSM alone, make a key
as an older xksproxy did, leave a crashed run's transport key) tests/support/replicate_hsm.py
does, also in a subprocess, so that the pytest process never loads SoftHSM.  The planning rules
as a table: tests/unit/test_replicate_plan.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import assert_one_line_failure, hsm_tool, snapshot
from tests.support.configs import edit_config
from tests.support.files import write_secret
from tests.support.paths import ROOT
from tests.support.proxies import start_server, stop_server
from tests.support.rigs import MultiRig, make_multi_rig, objects_everywhere
from tests.support.xks_client import XksClient, decrypt_fields

A, B = "softhsm-1", "softhsm-2"


# --- helpers ------------------------------------------------------------------------------


def on_hsm(command: str, config: Path, hsm: str, key_id: str = "-") -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.replicate_hsm",
            command,
            str(config),
            hsm,
            key_id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def replicate(
    rig: MultiRig, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return rig.run("keys", "replicate", "--from", A, "--to", B, *args, config=config)


def keys_of(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """The per-key part of replicate's JSON report, by key id."""
    return {k["keyId"]: k for k in json.loads(proc.stdout)["keys"]}


def create_on(rig: MultiRig, hsm: str, key_id: str, *args: str) -> None:
    proc = rig.run("keys", "create", key_id, *args, config=rig.only(hsm))
    assert proc.returncode == 0, proc.stderr


def alike(entry: dict[str, Any]) -> bool:
    """Whether ``keys list --json`` shows the key on both HSMs, consistent."""
    return entry["consistent"] and all(entry["hsms"][n] is not None for n in (A, B))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("replicate") / "rig", 2, "--fault-injection")


@pytest.fixture
def faults(rig: MultiRig) -> Iterator[MultiRig]:
    """The rig, every HSM healthy before and after the test."""
    yield from rig.all_healthy()


# --- the scenario -----------------------------------------------------------------


def test_replicate_to_a_new_hsm_then_fail_the_old_one_and_decrypt_everything(
    tmp_path: Path,
) -> None:
    settings = {"server": {"workers": 1}, "health": {"interval_seconds": 1}}
    rig = make_multi_rig(tmp_path / "rig", 2, "--fault-injection", settings=settings)
    port = rig.port
    one = rig.only(A)  # the fleet before the new HSM joins
    kms = json.loads((rig.dir / "kms-xks-config.json").read_text())[
        "XksProxyAuthenticationCredential"
    ]
    client = XksClient(
        "127.0.0.1", port, "example/xks", kms["AccessKeyId"], kms["RawSecretAccessKey"]
    )
    for key_id, usage in (
        ("k-plain", "encrypt,decrypt"),
        ("k-rotated", "encrypt,decrypt"),
        ("k-off", "encrypt,decrypt"),
        ("k-dec", "decrypt"),
        ("k-none", "none"),
    ):
        assert rig.run("keys", "create", key_id, "--usage", usage, config=one).returncode == 0
    sealed: list[tuple[str, str, dict[str, Any]]] = []

    def encrypt(key_id: str) -> None:
        plaintext = base64.b64encode(f"secret under {key_id} #{len(sealed)}".encode()).decode()
        enc = client.encrypt(key_id, plaintext=plaintext)
        assert enc.status == 200, enc.body
        sealed.append((key_id, plaintext, enc.json))

    server = start_server(one, port, tmp_path / "one-1.log")
    try:
        for key_id in ("foo", "k-plain", "k-rotated", "k-off"):
            encrypt(key_id)
    finally:
        stop_server(server)
    for _ in range(2):  # versions 2 and 3
        assert rig.run("keys", "rotate", "k-rotated", config=one).returncode == 0
    assert rig.run("keys", "disable", "k-off", config=one).returncode == 0
    server = start_server(one, port, tmp_path / "one-2.log")
    try:
        encrypt("k-rotated")  # under version 3
    finally:
        stop_server(server)

    proc = replicate(rig)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    keys = {k["keyId"]: k for k in report["keys"]}
    assert set(keys) == {"foo", "k-plain", "k-rotated", "k-off", "k-dec", "k-none"}
    assert keys["foo"]["result"] == "alike"  # dev-setup made it on both
    assert keys["k-rotated"]["copiedVersions"] == [1, 2, 3]
    assert keys["k-none"]["unverifiedVersions"] == [1]  # no usage, no KCV (docs say so)
    assert report["summary"]["copiedKeys"] == 5
    assert report["summary"]["copiedVersions"] == 7
    assert report["transport"].startswith("RSA-3072 OAEP")
    assert "copied 5 keys / 7 versions, 1 already alike" in proc.stderr
    listing = rig.listing()
    assert all(alike(entry) for entry in listing.values()), listing
    assert listing["k-off"]["hsms"][B]["keyStatus"] == "DISABLED"
    assert listing["k-rotated"]["hsms"][B]["versions"] == [1, 2, 3]
    assert listing["k-dec"]["kcv"][B].startswith("D:")

    server = start_server(rig.config, port, tmp_path / "both.log")
    try:
        rig.control(A).error("CKR_DEVICE_ERROR")  # every call of the old HSM fails
        deadline = time.monotonic() + 15
        while True:
            states = {d["id"]: d["healthStatus"] for d in client.health().json["ekmFleetDetails"]}
            if states[A] == "UNAVAILABLE":
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        for key_id, plaintext, enc in sealed:
            dec = client.decrypt(key_id, **decrypt_fields(enc))
            if key_id == "k-off":  # disabled on the copy too
                assert dec.error_name == "InvalidStateException", dec.body
                continue
            assert dec.status == 200, (key_id, dec.body)
            assert dec.json["plaintext"] == plaintext
        assert client.encrypt("k-rotated", plaintext="AA==").status == 200
    finally:
        rig.control(A).ok()
        stop_server(server)


# --- re-runs, refusals, problems ----------------------------------------------------------


def test_replicate_again_changes_nothing(faults: MultiRig) -> None:
    create_on(faults, A, "k-again")
    first = replicate(faults, "k-again")
    assert first.returncode == 0, first.stderr
    assert keys_of(first)["k-again"]["result"] == "copied"
    before = snapshot(faults.dir)
    again = replicate(faults, "k-again", "foo")
    assert again.returncode == 0, again.stderr
    assert {k: v["result"] for k, v in keys_of(again).items()} == {
        "k-again": "alike",
        "foo": "alike",
    }
    assert json.loads(again.stdout)["transport"] is None  # nothing travelled
    assert snapshot(faults.dir) == before
    # No transport key is left on either HSM.
    assert objects_everywhere(faults, "xksproxy-transport") == {A: [], B: []}


def test_a_different_copy_is_refused_and_the_other_keys_go_on(faults: MultiRig) -> None:
    for hsm in (A, B):  # the same id, other material
        create_on(faults, hsm, "k-twin")
    create_on(faults, A, "k-fine")
    kcvs = {hsm: hsm_tool("kcv", str(faults.config), hsm, "k-twin").stdout for hsm in (A, B)}
    objects_before = hsm_tool("objects", str(faults.config), B, "k-twin").stdout
    proc = replicate(faults, "k-twin", "k-fine")
    assert proc.returncode == 1
    keys = keys_of(proc)
    assert keys["k-fine"]["result"] == "copied"
    assert keys["k-twin"]["result"] == "refused"
    expected = (
        f"refusing to overwrite a different copy of 'k-twin' on {B}: "
        f"version 1 KCV {kcvs[A].strip()} on {A}, {kcvs[B].strip()} on {B}"
    )
    assert keys["k-twin"]["problems"] == [expected]
    assert f"# k-twin: {expected}" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("xksproxy: error: not every key was")
    assert "refused: k-twin" in proc.stderr
    assert hsm_tool("kcv", str(faults.config), B, "k-twin").stdout == kcvs[B]
    assert hsm_tool("objects", str(faults.config), B, "k-twin").stdout == objects_before
    assert alike(faults.listing()["k-fine"])


def test_versions_the_source_lacks_are_refused(faults: MultiRig) -> None:
    faults.create("k-ahead")
    on_hsm("add-version", faults.only(B), B, "k-ahead")
    before = snapshot(faults.dir)
    proc = replicate(faults, "k-ahead")
    assert proc.returncode == 1
    (problem,) = keys_of(proc)["k-ahead"]["problems"]
    assert problem == (
        f"refusing to overwrite a different copy of 'k-ahead' on {B}: "
        f"it has version 2, which {A} lacks"
    )
    assert snapshot(faults.dir) == before


def test_a_key_made_by_an_older_xksproxy_is_reported_clearly(faults: MultiRig) -> None:
    on_hsm("old-key", faults.only(A), A, "k-old")
    create_on(faults, A, "k-new")
    proc = replicate(faults, "k-old", "k-new")
    assert proc.returncode == 1
    keys = keys_of(proc)
    assert keys["k-new"]["result"] == "copied"
    assert keys["k-old"]["result"] == "refused"
    (problem,) = keys["k-old"]["problems"]
    assert "version 1 on softhsm-1 is not extractable" in problem
    assert "older than `keys replicate`" in problem
    assert objects_everywhere(faults, "k-old")[B] == []


def test_a_key_made_by_other_tooling_becomes_version_1_on_the_copy(faults: MultiRig) -> None:
    on_hsm("foreign-key", faults.only(A), A, "k-foreign")
    proc = replicate(faults, "k-foreign")
    assert proc.returncode == 0, proc.stderr
    assert keys_of(proc)["k-foreign"]["copiedVersions"] == [1]
    entry = faults.listing()["k-foreign"]
    assert alike(entry), entry
    assert entry["hsms"][B]["versions"] == [1]
    assert replicate(faults, "k-foreign").returncode == 0  # and alike from then on


def test_a_different_state_is_reported_not_overwritten(faults: MultiRig) -> None:
    faults.create("k-moody")
    assert faults.run("keys", "disable", "k-moody", config=faults.only(B)).returncode == 0
    proc = replicate(faults, "k-moody")
    assert proc.returncode == 1
    key = keys_of(proc)["k-moody"]
    assert key["result"] == "alike"
    (problem,) = key["problems"]
    assert f"status ENABLED on {A}, DISABLED on {B}" in problem
    assert "keys enable, keys disable" in problem
    assert "to check: k-moody" in proc.stderr
    statuses = faults.listing()["k-moody"]["hsms"]
    assert (statuses[A]["keyStatus"], statuses[B]["keyStatus"]) == ("ENABLED", "DISABLED")


def test_a_leftover_transport_key_is_removed(faults: MultiRig) -> None:
    on_hsm("leftover", faults.config, A)
    assert objects_everywhere(faults, "xksproxy-transport")[A] == ["PUBLIC_KEY"]
    create_on(faults, A, "k-after-crash")
    proc = replicate(faults, "k-after-crash")
    assert proc.returncode == 0, proc.stderr
    assert objects_everywhere(faults, "xksproxy-transport") == {A: [], B: []}


def test_the_progress_bar_can_be_forced(faults: MultiRig) -> None:
    proc = replicate(faults, "foo", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "checking" in proc.stderr
    assert "key/s" in proc.stderr


# --- failures half-way --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "step"),
    [("C_UnwrapKey", "unwrapping version 1"), ("C_EncryptInit", "checking version 1")],
)
def test_a_failure_half_way_leaves_nothing_and_the_next_run_completes(
    faults: MultiRig, function: str, step: str
) -> None:
    """C_UnwrapKey fails the first version (after the metadata is stored); C_EncryptInit fails
    the check of the first stored copy: either way this run's objects are removed again."""
    key_id = f"k-half-{function}"
    create_on(faults, A, key_id)
    for _ in range(2):
        on_hsm("add-version", faults.only(A), A, key_id)
    faults.control(B).error("CKR_DEVICE_ERROR", [function])
    proc = replicate(faults, key_id)
    faults.control(B).ok()
    assert proc.returncode == 1
    key = keys_of(proc)[key_id]
    assert key["result"] == "failed"
    (problem,) = key["problems"]
    assert f"HSM {B}: {step} of '{key_id}' failed (CKR_DEVICE_ERROR)" in problem
    assert problem.endswith(f"nothing of this run was left on {B}")
    assert objects_everywhere(faults, key_id)[B] == []
    again = replicate(faults, key_id)
    assert again.returncode == 0, again.stderr
    assert keys_of(again)[key_id]["copiedVersions"] == [1, 2, 3]
    assert alike(faults.listing()[key_id])


def test_a_failure_never_touches_what_the_target_had(faults: MultiRig) -> None:
    create_on(faults, A, "k-grow")
    assert replicate(faults, "k-grow").returncode == 0
    for _ in range(2):
        on_hsm("add-version", faults.only(A), A, "k-grow")
    tokens = faults.dir / "hsms" / B / "tokens"
    before = snapshot(tokens)
    faults.control(B).error("CKR_DEVICE_ERROR", ["C_UnwrapKey"])
    proc = replicate(faults, "k-grow")
    faults.control(B).ok()
    assert proc.returncode == 1
    assert keys_of(proc)["k-grow"]["result"] == "failed"
    assert snapshot(tokens) == before  # version 1 and its metadata as they were
    again = replicate(faults, "k-grow")
    assert again.returncode == 0, again.stderr
    key = keys_of(again)["k-grow"]
    assert (key["alikeVersions"], key["copiedVersions"]) == ([1], [2, 3])
    assert key["metadata"] == "merged"  # the records of versions 2 and 3
    assert alike(faults.listing()["k-grow"])


# --- bad input: a clear message, a non-zero exit, nothing changed -------------------------


def _variant(rig: MultiRig, name: str) -> Path:
    """A configuration of *rig* whose first HSM takes its SO PIN as *name* says."""

    def so_pin(data: dict[str, Any]) -> None:
        first = data["hsms"][0]
        assert first.pop("so_pin_file") == "secrets/softhsm-1/hsm-so-pin"
        if name == "wrong-so-pin":
            write_secret(rig.dir / "wrong-so-pin", "00000000\n")
            first["so_pin_file"] = "wrong-so-pin"
        elif name != "no-so-pin":
            first["so_pin_env"] = "XKS_TEST_NO_SUCH_VARIABLE"

    return edit_config(rig.config, change=so_pin, to=rig.dir / f"{name}.toml")


@pytest.mark.parametrize(
    ("args", "config", "code", "expected"),
    [
        (["--from", A, "--to", A], None, 1, "--from and --to are both 'softhsm-1'"),
        (
            ["--from", "hsm-x", "--to", B],
            None,
            1,
            "no HSM named 'hsm-x' (configured: softhsm-1, softhsm-2)",
        ),
        (["--from", A, "--to", "hsm-y"], None, 1, "--to: no HSM named 'hsm-y'"),
        (
            ["--from", A, "--to", B, "k-pending", "k-nowhere"],
            None,
            1,
            "not on softhsm-1: 'k-nowhere'",
        ),
        (["--from", A, "--to", B, "xksproxy-health"], None, 1, "is a health key"),
        (["--from", A, "--to", B, "bad id!"], None, 1, "key ids are 1-128 characters"),
        (
            ["--from", A, "--to", B, "k-pending"],
            "no-so-pin",
            1,
            "no security officer PIN configured: set so_pin_file or so_pin_env",
        ),
        (
            ["--from", A, "--to", B, "k-pending"],
            "wrong-so-pin",
            1,
            "security officer login failed (CKR_PIN_INCORRECT); check so_pin_file",
        ),
        (
            ["--from", A, "--to", B, "k-pending"],
            "unset-so-pin-env",
            78,
            "$XKS_TEST_NO_SUCH_VARIABLE is not set",
        ),
        (["--to", B], None, 2, "the following arguments are required: --from"),
    ],
    ids=[
        "same",
        "unknown-from",
        "unknown-to",
        "unknown-key",
        "health-key",
        "bad-id",
        "no-so-pin",
        "wrong-so-pin",
        "unset-so-pin-env",
        "no-from",
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    faults: MultiRig, args: list[str], config: str | None, code: int, expected: str
) -> None:
    if "k-pending" not in faults.listing():
        create_on(faults, A, "k-pending")  # missing on B: a run would have to copy it
    path = faults.config if config is None else _variant(faults, config)
    before = snapshot(faults.dir)
    proc = faults.run("keys", "replicate", *args, config=path)
    assert expected in assert_one_line_failure(proc)
    assert proc.returncode == code
    assert snapshot(faults.dir) == before
