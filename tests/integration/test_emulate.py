"""``xksproxy dev-setup --emulate``: rigs whose HSMs make AES-GCM IVs as production HSMs do.

Everything runs as an operator would: the CLI in subprocesses, on real SoftHSM instances, each
behind its own copy of the fault-injection module set to a vendor profile (docs/vendors.md).
The option's refusals come first (one line, non-zero exit, nothing made); then what a rig is made
of (layout, ``vendor`` per HSM, the profile in each copy's ``xksfault.conf``), running it again
(kept with the same options, refused with others), and the commands of a rig working on an
emulated one: ``check`` (the IV mode found), keys, credentials, and ``serve``, whose Encrypts
are opened in software under imported key material with the IV the proxy returned.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support.byok import software_kcv, wrap_with_cryptography
from tests.support.commands import assert_one_line_failure, snapshot, xksproxy
from tests.support.configs import edit_config, read_config
from tests.support.faultlib import CONF_NAME, FAULT_LIBRARY_NAME, FaultControl
from tests.support.paths import ROOT
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import dev_rig, ports_of, variant
from tests.support.xks_client import XksClient
from xksproxy.dev.faultinject import PROFILES, VENDOR_OF_PROFILE
from xksproxy.service import hsm_aad

AAD = b"tenant=emulated"
MIXED = ("luna-fips", "cloudhsm")  # a 16-byte-IV HSM and a 12-byte-only one, side by side
# The IV mode gcm_iv = "auto" must find behind each profile (docs/vendors.md).
MODE_OF = {
    "softhsm": "caller",
    "cloudhsm": "hsm-written",
    "luna-fips": "hsm-appended",
    "luna": "hsm-appended",
    "nshield": "hsm-written",
    "protectserver-fips": "hsm-written",
}


def dev_setup(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return xksproxy("dev-setup", str(directory), *args, check=False)


def conf_settings(home: Path) -> dict[str, str]:
    """The settings of the ``xksfault.conf`` in an HSM's directory."""
    lines = (home / CONF_NAME).read_text().splitlines()
    pairs = (line.partition("=") for line in lines if line.strip() and not line.startswith("#"))
    return {name.strip(): value.strip() for name, _, value in pairs}


def check_report(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """What ``xksproxy check`` said of each HSM: its lines (state, IV mode) joined."""
    said: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("hsm "):
            name = line.split()[1]
            said[name] = f"{said[name]}\n{line}" if name in said else line
    return said


@dataclass
class EmulatedRig:
    dir: Path
    options: tuple[str, ...]
    profiles: tuple[str, ...]
    kms: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.dir / "xksproxy.toml"

    @property
    def names(self) -> list[str]:
        return [f"softhsm-{i}" for i in range(1, len(self.profiles) + 1)]

    def tables(self) -> list[dict[str, Any]]:
        tables: list[dict[str, Any]] = tomllib.loads(self.config.read_text())["hsms"]
        return tables

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``xksproxy ARGS -c CONFIG``, not checked."""
        return self.run_with(self.config, *args)

    def run_with(self, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``xksproxy ARGS -c config`` (another configuration of this rig), not checked."""
        return xksproxy(*args, "-c", str(config), check=False)

    def ok(self, *args: str) -> Any:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def control(self, name: str) -> FaultControl:
        return FaultControl(self.dir / "faults" / name)


def make(directory: Path, profiles: tuple[str, ...], *options: str) -> EmulatedRig:
    args = ("--hsms", str(len(profiles)), "--emulate", ",".join(profiles), *options)
    # Ports of its own, metrics included: the suite may run beside a serving rig (make run).
    rig = dev_rig(directory, *args)
    return EmulatedRig(directory, args, profiles, rig.kms)


@pytest.fixture(scope="module")
def soft(tmp_path_factory: pytest.TempPathFactory) -> EmulatedRig:
    """One HSM, profile softhsm (the module passes every call through), no fault injection."""
    return make(tmp_path_factory.mktemp("emulate-soft") / "rig", ("softhsm",))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> EmulatedRig:
    """Two HSMs, Luna FIPS (< 7.9.3) and CloudHSM, with fault injection."""
    return make(tmp_path_factory.mktemp("emulate-mixed") / "rig", MIXED, "--fault-injection")


@pytest.fixture
def healthy(mixed: EmulatedRig) -> Iterator[EmulatedRig]:
    for name in mixed.names:
        mixed.control(name).ok()
    yield mixed
    for name in mixed.names:
        mixed.control(name).ok()


# --- the option's refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--emulate", "hsm9000"], "unknown profile 'hsm9000'", id="unknown"),
        pytest.param(["--emulate", "Luna"], "unknown profile 'Luna'", id="wrong-case"),
        pytest.param(["--emulate", ""], "unknown profile ''", id="empty"),
        pytest.param(
            ["--hsms", "2", "--emulate", "cloudhsm,"], "unknown profile ''", id="empty-item"
        ),
        pytest.param(
            ["--hsms", "2", "--emulate", "cloudhsm,bogus"], "unknown profile 'bogus'", id="second"
        ),
        pytest.param(["--emulate", "luna-fips,cloudhsm"], "2 profiles for 1 HSM", id="two-for-1"),
        pytest.param(
            ["--hsms", "3", "--emulate", "luna-fips,cloudhsm"],
            "2 profiles for 3 HSMs",
            id="2-for-3",
        ),
        pytest.param(
            ["--hsms", "2", "--emulate", "luna,nshield,cloudhsm", "--fault-injection"],
            "3 profiles for 2 HSMs",
            id="3-for-2",
        ),
    ],
)
def test_a_bad_emulate_fails_with_one_line_and_makes_nothing(
    tmp_path: Path, args: list[str], says: str
) -> None:
    directory = tmp_path / "rig"
    line = assert_one_line_failure(dev_setup(directory, *args))
    assert "--emulate" in line and says in line, line
    assert not directory.exists()


def test_an_unknown_profile_line_lists_the_profiles(tmp_path: Path) -> None:
    line = assert_one_line_failure(dev_setup(tmp_path / "rig", "--emulate", "hsm9000"))
    for profile in PROFILES:
        assert profile in line


# --- what a rig is made of -----------------------------------------------------------------


def assert_emulated_layout(rig: EmulatedRig, fault: bool) -> None:
    text = rig.config.read_text()
    assert "gcm_iv" not in text.replace("no gcm_iv", "")  # "auto" must find the mode itself
    tables = rig.tables()
    assert [t["name"] for t in tables] == rig.names
    for table, profile in zip(tables, rig.profiles, strict=True):
        name = table["name"]
        home = rig.dir / "hsms" / name
        assert rig.dir / table["module"] == home / FAULT_LIBRARY_NAME
        assert table["vendor"] == VENDOR_OF_PROFILE[profile]
        assert "gcm_iv" not in table
        # The comment naming the profile is in this HSM's own table.
        section = text.split("[[hsms]]")[rig.names.index(name) + 1]
        assert re.search(rf"^#.*'{re.escape(profile)}'", section, re.M), section
        settings = conf_settings(home)
        assert settings.get("profile", "softhsm") == profile  # the default is not written
        assert Path(settings["real_module"]) == home / "libsofthsm2.so"
        if fault:
            assert Path(settings["control"]) == rig.dir / "faults" / name
            assert rig.control(name).read() == "ok"
        else:
            assert "control" not in settings
    assert (rig.dir / "faults").exists() == fault


def test_softhsm_profile_uses_the_per_hsm_layout_without_a_control_file(
    soft: EmulatedRig,
) -> None:
    assert_emulated_layout(soft, fault=False)
    assert not (soft.dir / "softhsm2.conf").exists()  # not the plain one-HSM layout


def test_mixed_profiles_each_hsm_gets_its_vendor_and_profile(mixed: EmulatedRig) -> None:
    assert_emulated_layout(mixed, fault=True)
    assert [t["vendor"] for t in mixed.tables()] == ["luna", "cloudhsm"]


def test_check_finds_each_hsms_iv_mode(soft: EmulatedRig, healthy: EmulatedRig) -> None:
    for rig in (soft, healthy):
        proc = rig.run("check")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        said = check_report(proc)
        for name, profile in zip(rig.names, rig.profiles, strict=True):
            assert "ACTIVE" in said[name] and MODE_OF[profile] in said[name], (profile, said)


@pytest.fixture(scope="module")
def every(tmp_path_factory: pytest.TempPathFactory) -> EmulatedRig:
    """One HSM per vendor profile (lost-iv aside), no fault injection."""
    return make(tmp_path_factory.mktemp("emulate-every") / "rig", tuple(MODE_OF))


def test_every_vendor_profile_passes_check_in_its_mode(every: EmulatedRig) -> None:
    assert_emulated_layout(every, fault=False)
    proc = every.run("check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    said = check_report(proc)
    for name, profile in zip(every.names, every.profiles, strict=True):
        assert "ACTIVE" in said[name] and MODE_OF[profile] in said[name], (profile, said)


def only_with_gcm_iv(rig: EmulatedRig, profile: str, gcm_iv: str) -> Path:
    """A configuration of *rig* (in its directory: its paths are relative) with only the HSM
    emulating *profile*, set to *gcm_iv*."""

    def only(data: dict[str, Any]) -> None:
        table = data["hsms"][rig.profiles.index(profile)]
        assert "vendor" in table
        data["hsms"] = [{**table, "gcm_iv": gcm_iv}]

    return edit_config(rig.config, change=only, to=rig.dir / f"only-{profile}-{gcm_iv}.toml")


def sample_gcm_iv(sample: str) -> str:
    """The gcm_iv a sample of config/ sets, or else the one its comments suggest."""
    text = (ROOT / "config" / f"{sample}.toml").read_text()
    modes: set[str] = set(re.findall(r'(?m)^(?:# )?gcm_iv = "([a-z-]+)"', text))
    (mode,) = modes
    return mode


@pytest.mark.parametrize(
    ("sample", "profile"),
    [("cloudhsm", "cloudhsm"), ("luna", "luna-fips"), ("luna", "luna"), ("nshield", "nshield")],
)
def test_the_gcm_iv_of_each_sample_fits_its_emulation(
    every: EmulatedRig, sample: str, profile: str
) -> None:
    mode = sample_gcm_iv(sample)
    proc = every.run_with(only_with_gcm_iv(every, profile, mode), "check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "ACTIVE" in proc.stdout and mode in proc.stdout, proc.stdout


def test_an_explicit_mode_the_hsm_does_not_follow_makes_it_unavailable(
    every: EmulatedRig,
) -> None:
    proc = every.run_with(only_with_gcm_iv(every, "cloudhsm", "caller"), "check")
    assert proc.returncode != 0
    assert "UNAVAILABLE" in proc.stdout and "ACTIVE" not in proc.stdout, proc.stdout


def test_a_fault_on_one_emulated_hsm_shows_in_check(healthy: EmulatedRig) -> None:
    healthy.control("softhsm-2").error("CKR_DEVICE_ERROR")
    proc = healthy.run("check")
    assert proc.returncode != 0
    said = check_report(proc)
    assert "ACTIVE" in said["softhsm-1"] and "UNAVAILABLE" in said["softhsm-2"], said


# --- running dev-setup again ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["soft", "mixed"])
def test_dev_setup_again_with_the_same_options_changes_nothing(
    request: pytest.FixtureRequest, which: str
) -> None:
    rig: EmulatedRig = request.getfixturevalue(which)
    before = snapshot(rig.dir)
    again = dev_setup(rig.dir, *rig.options)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == rig.kms
    assert snapshot(rig.dir) == before


@pytest.mark.parametrize(
    ("which", "options", "found"),
    [
        pytest.param("soft", [], "1 HSM emulating softhsm", id="soft-plain"),
        pytest.param("soft", ["--emulate", "cloudhsm"], "1 HSM emulating softhsm", id="soft-other"),
        pytest.param(
            "soft", ["--emulate", "softhsm", "--fault-injection"], "emulating", id="soft-faults"
        ),
        pytest.param(
            "mixed",
            ["--hsms", "2", "--emulate", "cloudhsm,luna-fips", "--fault-injection"],
            "2 HSMs with fault injection emulating luna-fips,cloudhsm",
            id="mixed-swapped",
        ),
        pytest.param(
            "mixed",
            ["--hsms", "2", "--emulate", "luna-fips,cloudhsm"],
            "2 HSMs with fault injection emulating",
            id="mixed-without-faults",
        ),
        pytest.param(
            "mixed", ["--hsms", "2", "--fault-injection"], "emulating luna-fips", id="mixed-plain"
        ),
    ],
)
def test_other_profiles_on_an_existing_rig_are_refused(
    request: pytest.FixtureRequest, which: str, options: list[str], found: str
) -> None:
    rig: EmulatedRig = request.getfixturevalue(which)
    before = snapshot(rig.dir)
    line = assert_one_line_failure(dev_setup(rig.dir, *options))
    assert found in line, line
    assert snapshot(rig.dir) == before


def test_fault_injection_alone_is_the_same_rig_as_emulating_softhsm(tmp_path: Path) -> None:
    directory = tmp_path / "rig"
    first = dev_setup(directory, "--fault-injection")
    assert first.returncode == 0, first.stderr
    before = snapshot(directory)
    again = dev_setup(directory, "--fault-injection", "--emulate", "softhsm")
    assert again.returncode == 0, again.stderr
    assert snapshot(directory) == before
    line = assert_one_line_failure(dev_setup(directory, "--emulate", "luna"))
    assert "1 HSM with fault injection, not 1 HSM emulating luna" in line, line


# --- the rig's commands --------------------------------------------------------------------


def test_keys_and_credentials_commands_work_on_an_emulated_rig(healthy: EmulatedRig) -> None:
    rig = healthy
    created = rig.ok("keys", "create", "k-emu")
    assert set(created["kcv"]) == set(rig.names)
    assert len(set(created["kcv"].values())) == 1  # the same material on both
    rotated = rig.ok("keys", "rotate", "k-emu")
    assert rotated["version"] == 2
    assert rig.run("keys", "disable", "k-emu").returncode == 0
    listing = {k["keyId"]: k for k in rig.ok("keys", "list", "--json")}
    assert listing["k-emu"]["keyStatus"] == "DISABLED"
    assert listing["k-emu"]["consistent"] is True
    assert listing["foo"]["consistent"] is True
    replicated = rig.ok("keys", "replicate", "--from", "softhsm-1", "--to", "softhsm-2", "foo")
    assert replicated is not None
    added = rig.ok("credentials", "add", "--prefix", "example/xks")
    assert added["XksProxyUriPath"] == rig.kms["XksProxyUriPath"]


# --- serve: the IV the proxy returns is the one the HSM used --------------------------------


@pytest.fixture(scope="module")
def imported(mixed: EmulatedRig, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Key ``k-known`` imported on both HSMs with material this test knows."""
    out = tmp_path_factory.mktemp("emulate-import")
    mixed.ok(
        "keys", "import-params", "k-known", "--wrapping-algorithm", "RSAES_OAEP_SHA_1",
        "--wrapping-key-spec", "RSA_3072", "--out", str(out),
    )  # fmt: skip
    material = os.urandom(32)
    wrap_with_cryptography(out, "RSAES_OAEP_SHA_1", material)
    result = mixed.ok(
        "keys", "import", "k-known", "--wrapped-key-material",
        str(out / "EncryptedKeyMaterial.bin"), "--import-token", str(out / "ImportToken.bin"),
    )  # fmt: skip
    assert result["kcv"] == dict.fromkeys(mixed.names, software_kcv(material))
    return material


@pytest.fixture(scope="module")
def server(
    mixed: EmulatedRig, imported: bytes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Ports picked now: nothing else has had time to take them.  One worker (one health board
    # to ask), probing every second (an HSM back soon after).  A configuration of its own
    # beside the rig's, which stays as dev-setup wrote it.
    assert read_config(mixed.config)["health"]["interval_seconds"] == 5
    settings = {"server": {"workers": 1}, "health": {"interval_seconds": 1}}
    config = variant(mixed.config, "serve", settings)
    port, _ = ports_of(config)
    srv = start_server(config, port, tmp_path_factory.mktemp("emulate-logs") / "proxy.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(mixed: EmulatedRig, server: Server) -> XksClient:
    return XksClient.from_kms(mixed.kms, server.port)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def wait_for_all_active(client: XksClient, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        details = client.health().json["ekmFleetDetails"]
        if {d["healthStatus"] for d in details} == {"ACTIVE"}:
            return
        assert time.monotonic() < deadline, details
        time.sleep(0.1)


def encrypt_and_open(client: XksClient, material: bytes) -> dict[str, str]:
    """Encrypt through the proxy, open the result in software with the returned IV, and
    decrypt it through the proxy too; the Encrypt response."""
    plaintext = os.urandom(40)
    resp = client.encrypt("k-known", plaintext=b64(plaintext), additionalAuthenticatedData=b64(AAD))
    assert resp.status == 200, resp.body
    enc: dict[str, str] = resp.json
    raw = {k: base64.b64decode(v) for k, v in enc.items()}
    sealed = raw["ciphertext"] + raw["authenticationTag"]
    aad = hsm_aad(AAD, raw["ciphertextMetadata"])
    assert AESGCM(material).decrypt(raw["initializationVector"], sealed, aad) == plaintext
    back = client.decrypt(
        "k-known",
        ciphertext=enc["ciphertext"],
        ciphertextMetadata=enc["ciphertextMetadata"],
        initializationVector=enc["initializationVector"],
        authenticationTag=enc["authenticationTag"],
        additionalAuthenticatedData=b64(AAD),
    )
    assert back.status == 200, back.body
    assert base64.b64decode(back.json["plaintext"]) == plaintext
    return enc


@pytest.mark.parametrize(
    ("failing", "iv_length"),
    [("softhsm-2", 16), ("softhsm-1", 12)],
    ids=["luna-fips-serves", "cloudhsm-serves"],
)
def test_each_emulated_hsm_encrypts_under_the_iv_it_returns(
    healthy: EmulatedRig, client: XksClient, imported: bytes, failing: str, iv_length: int
) -> None:
    wait_for_all_active(client)
    # Encrypts go to the other HSM: the failing one's encryptions fail (decrypts still work).
    healthy.control(failing).error("CKR_DEVICE_ERROR", ["C_EncryptInit"])
    for _ in range(3):
        enc = encrypt_and_open(client, imported)
        assert len(base64.b64decode(enc["initializationVector"])) == iv_length


# --- a token that matches no IV mode -------------------------------------------------------


def test_a_token_that_hides_its_iv_is_unavailable_and_the_others_serve(tmp_path: Path) -> None:
    rig = make(tmp_path / "rig", ("softhsm", "lost-iv"))
    assert [t["vendor"] for t in rig.tables()] == ["softhsm", "softhsm"]
    proc = rig.run("check")
    assert proc.returncode != 0
    said = check_report(proc)
    assert "ACTIVE" in said["softhsm-1"] and "caller" in said["softhsm-1"], said
    assert "UNAVAILABLE" in said["softhsm-2"], said
    assert "ACTIVE" not in said["softhsm-2"], said
