"""The ``xksproxy`` command line, a stable contract: run as subprocesses, as an operator would.

Anything that changes state runs on a fresh rig made by ``dev-setup`` in tmp_path; the shared
``rig`` fixture is used for read-only commands only.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import assert_one_line_failure, snapshot, xksproxy
from tests.support.configs import write_config
from tests.support.ports import free_port
from tests.support.rigs import Rig, dev_rig

AKID_RE = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{43,64}$")
CONSOLE_KEYS = {"XksProxyUriPath", "XksProxyAuthenticationCredential"}
DEV_SETUP_KEYS = CONSOLE_KEYS | {"XksProxyUriEndpoint", "Region"}


@dataclass
class Fresh:
    """A rig made by dev-setup in tmp_path, safe to change."""

    dir: Path
    config: Path
    kms: dict[str, Any]
    port: int
    metrics_port: int

    @property
    def ports(self) -> tuple[str, ...]:
        """The ports dev-setup was given (free ones, picked by the rig factory)."""
        return ("--port", str(self.port), "--metrics-port", str(self.metrics_port))

    @property
    def akid(self) -> str:
        value: str = self.kms["XksProxyAuthenticationCredential"]["AccessKeyId"]
        return value

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``xksproxy ARGS -c CONFIG``, not checked."""
        return xksproxy(*args, "-c", str(self.config), check=False)

    def credentials(self) -> dict[str, list[dict[str, str]]]:
        prefixes: dict[str, list[dict[str, str]]] = json.loads(
            (self.dir / "credentials.json").read_text()
        )["prefixes"]
        return prefixes

    def hsm_keys(self) -> dict[str, dict[str, Any]]:
        proc = self.run("keys", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        return {k["keyId"]: k for k in json.loads(proc.stdout)}


def dev_setup(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return xksproxy("dev-setup", str(directory), *args, check=False)


@pytest.fixture
def fresh(tmp_path: Path) -> Fresh:
    rig = dev_rig(tmp_path / "rig")
    return Fresh(rig.dir, rig.config, rig.kms, rig.port, rig.metrics_port)


def assert_console_json(kms: dict[str, Any], uri_path: str) -> None:
    assert kms["XksProxyUriPath"] == uri_path
    cred = kms["XksProxyAuthenticationCredential"]
    assert set(cred) == {"AccessKeyId", "RawSecretAccessKey"}
    assert AKID_RE.match(cred["AccessKeyId"]), cred["AccessKeyId"]
    assert SECRET_RE.match(cred["RawSecretAccessKey"])


# --- dev-setup ----------------------------------------------------------------------------


def test_dev_setup_prints_the_kms_console_json(fresh: Fresh) -> None:
    assert set(fresh.kms) == DEV_SETUP_KEYS
    assert_console_json(fresh.kms, "/example/xks/kms/xks/v1")
    assert fresh.kms["XksProxyUriEndpoint"] == f"http://127.0.0.1:{fresh.port}"
    assert fresh.kms["Region"] == "us-east-1"


def test_dev_setup_writes_the_same_json_to_kms_xks_config(fresh: Fresh) -> None:
    assert json.loads((fresh.dir / "kms-xks-config.json").read_text()) == fresh.kms


@pytest.mark.parametrize(
    "name", ["secrets/hsm-pin", "secrets/hsm-so-pin", "credentials.json", "kms-xks-config.json"]
)
def test_dev_setup_secret_file_is_mode_0600(fresh: Fresh, name: str) -> None:
    assert stat.S_IMODE((fresh.dir / name).stat().st_mode) == 0o600


def test_dev_setup_every_file_under_secrets_is_mode_0600(fresh: Fresh) -> None:
    files = [p for p in (fresh.dir / "secrets").rglob("*") if p.is_file()]
    assert files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


def test_dev_setup_rig_has_the_demo_key(fresh: Fresh) -> None:
    foo = fresh.hsm_keys()["foo"]
    assert foo["keyStatus"] == "ENABLED"
    assert foo["keyUsage"] == ["ENCRYPT", "DECRYPT"]


def test_dev_setup_again_changes_nothing(fresh: Fresh) -> None:
    before = snapshot(fresh.dir)
    proc = dev_setup(fresh.dir, *fresh.ports)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(fresh.dir) == before


def test_dev_setup_again_prints_the_same_json(fresh: Fresh) -> None:
    proc = dev_setup(fresh.dir, *fresh.ports)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == fresh.kms


@pytest.mark.parametrize("prefix", ["tenant-a/xks", "/tenant-a/xks", "/tenant-a/xks/"])
def test_dev_setup_custom_prefix(tmp_path: Path, prefix: str) -> None:
    proc = dev_setup(tmp_path / "rig", "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    kms = json.loads(proc.stdout)
    assert_console_json(kms, "/tenant-a/xks/kms/xks/v1")
    assert "tenant-a/xks" in json.loads((tmp_path / "rig/credentials.json").read_text())["prefixes"]


@pytest.mark.parametrize("region", ["eu-west-2", "ap-southeast-1", "us-gov-west-1"])
def test_dev_setup_custom_region(tmp_path: Path, region: str) -> None:
    proc = dev_setup(tmp_path / "rig", "--region", region)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Region"] == region


def test_dev_setup_custom_port(tmp_path: Path) -> None:
    port = free_port()
    proc = dev_setup(tmp_path / "rig", "--port", str(port))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["XksProxyUriEndpoint"].endswith(f":{port}")


# --- keys ---------------------------------------------------------------------------------

USAGE_TABLE = [
    ("encrypt,decrypt", ["ENCRYPT", "DECRYPT"], "encrypt,decrypt"),
    ("decrypt,encrypt", ["ENCRYPT", "DECRYPT"], "encrypt,decrypt"),
    ("encrypt", ["ENCRYPT"], "encrypt"),
    ("decrypt", ["DECRYPT"], "decrypt"),
    ("none", [], "none"),
]


@pytest.mark.parametrize(("usage", "key_usage", "_column"), USAGE_TABLE)
def test_keys_create_prints_the_new_key(
    fresh: Fresh, usage: str, key_usage: list[str], _column: str
) -> None:
    proc = fresh.run("keys", "create", "k-1.a_b", "--usage", usage)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["keyId"] == "k-1.a_b"
    assert out["keyUsage"] == key_usage
    assert out["keyStatus"] == "ENABLED"


@pytest.mark.parametrize(("usage", "key_usage", "_column"), USAGE_TABLE)
def test_keys_list_json_shows_a_created_key(
    fresh: Fresh, usage: str, key_usage: list[str], _column: str
) -> None:
    assert fresh.run("keys", "create", "k1", "--usage", usage).returncode == 0
    entry = fresh.hsm_keys()["k1"]
    assert entry["keyUsage"] == key_usage
    assert entry["keyStatus"] == "ENABLED"
    assert entry["versions"] == [1]


@pytest.mark.parametrize(("usage", "_key_usage", "column"), USAGE_TABLE)
def test_keys_list_table_shows_a_created_key(
    fresh: Fresh, usage: str, _key_usage: list[str], column: str
) -> None:
    assert fresh.run("keys", "create", "k1", "--usage", usage).returncode == 0
    proc = fresh.run("keys", "list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
    assert rows["k1"] == ["ENABLED", column, "1"]


def test_keys_create_prints_the_kcv_of_the_one_hsm(fresh: Fresh) -> None:
    proc = fresh.run("keys", "create", "k1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out["kcv"]) == ["softhsm-1"]
    assert re.fullmatch(r"E:[0-9a-f]{6}", out["kcv"]["softhsm-1"])
    assert out["transport"] is None  # one HSM: generated in place, never wrapped


def test_keys_list_json_shows_the_kcv_on_the_one_hsm(fresh: Fresh) -> None:
    kcv = json.loads(fresh.run("keys", "create", "k1").stdout)["kcv"]
    entry = fresh.hsm_keys()["k1"]
    assert entry["kcv"] == kcv
    assert entry["consistent"] is True
    assert entry["hsms"]["softhsm-1"]["kcv"] == {"1": kcv["softhsm-1"]}


def test_keys_init_health_on_a_rig_says_it_exists(fresh: Fresh) -> None:
    proc = fresh.run("keys", "init-health")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "health key 'xksproxy-health' already exists\n"


def test_keys_disable_prints_the_hsms(fresh: Fresh) -> None:
    proc = fresh.run("keys", "disable", "foo")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["keyStatus"] == "DISABLED"
    assert out["hsms"] == ["softhsm-1"]
    assert fresh.hsm_keys()["foo"]["keyStatus"] == "DISABLED"


def test_keys_create_default_usage_is_encrypt_decrypt(fresh: Fresh) -> None:
    assert fresh.run("keys", "create", "k1").returncode == 0
    assert fresh.hsm_keys()["k1"]["keyUsage"] == ["ENCRYPT", "DECRYPT"]


def test_keys_list_hides_the_health_key(fresh: Fresh) -> None:
    assert "xksproxy-health" not in fresh.hsm_keys()


def test_keys_create_existing_id_fails(fresh: Fresh) -> None:
    assert fresh.run("keys", "create", "k1", "--usage", "encrypt").returncode == 0
    line = assert_one_line_failure(fresh.run("keys", "create", "k1"))
    assert "k1" in line
    assert fresh.hsm_keys()["k1"]["keyUsage"] == ["ENCRYPT"]  # the first key is untouched


def test_keys_create_demo_key_again_fails(fresh: Fresh) -> None:
    assert_one_line_failure(fresh.run("keys", "create", "foo"))


@pytest.mark.parametrize("key_id", ["b@d", "has space", "a" * 129, "slash/id", "ünïcode", "a:b"])
def test_keys_create_invalid_id_fails(fresh: Fresh, key_id: str) -> None:
    before = fresh.hsm_keys()
    assert_one_line_failure(fresh.run("keys", "create", key_id))
    assert fresh.hsm_keys() == before


@pytest.mark.parametrize("usage", ["sign", "encrypt,sign", "all", "encrypt,encrypt", ""])
def test_keys_create_invalid_usage_fails(fresh: Fresh, usage: str) -> None:
    assert_one_line_failure(fresh.run("keys", "create", "k1", "--usage", usage))
    assert "k1" not in fresh.hsm_keys()


def test_keys_create_health_key_label_is_refused(fresh: Fresh) -> None:
    line = assert_one_line_failure(fresh.run("keys", "create", "xksproxy-health"))
    assert "health" in line


def test_keys_id_of_128_characters_is_accepted(fresh: Fresh) -> None:
    key_id = "k" * 128
    assert fresh.run("keys", "create", key_id).returncode == 0
    assert key_id in fresh.hsm_keys()


# --- credentials --------------------------------------------------------------------------


def test_credentials_add_prints_console_json(fresh: Fresh) -> None:
    proc = fresh.run("credentials", "add", "--prefix", "example/xks")
    assert proc.returncode == 0, proc.stderr
    kms = json.loads(proc.stdout)
    assert set(kms) == CONSOLE_KEYS
    assert_console_json(kms, "/example/xks/kms/xks/v1")


def test_credentials_add_keeps_the_existing_credential(fresh: Fresh) -> None:
    proc = fresh.run("credentials", "add", "--prefix", "example/xks")
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)["XksProxyAuthenticationCredential"]["AccessKeyId"]
    akids = [c["access_key_id"] for c in fresh.credentials()["example/xks"]]
    assert akids == [fresh.akid, new]


@pytest.mark.parametrize("prefix", ["tenant-b", "/tenant-b/"])
def test_credentials_add_on_a_new_prefix_creates_it(fresh: Fresh, prefix: str) -> None:
    proc = fresh.run("credentials", "add", "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    kms = json.loads(proc.stdout)
    assert_console_json(kms, "/tenant-b/kms/xks/v1")
    assert [c["access_key_id"] for c in fresh.credentials()["tenant-b"]] == [
        kms["XksProxyAuthenticationCredential"]["AccessKeyId"]
    ]


def test_credentials_file_stays_0600_after_add(fresh: Fresh) -> None:
    assert fresh.run("credentials", "add", "--prefix", "tenant-b").returncode == 0
    assert stat.S_IMODE((fresh.dir / "credentials.json").stat().st_mode) == 0o600


def test_credentials_remove_removes(fresh: Fresh) -> None:
    assert fresh.run("credentials", "add", "--prefix", "example/xks").returncode == 0
    proc = fresh.run(
        "credentials", "remove", "--prefix", "example/xks", "--access-key-id", fresh.akid
    )
    assert proc.returncode == 0, proc.stderr
    akids = [c["access_key_id"] for c in fresh.credentials()["example/xks"]]
    assert fresh.akid not in akids
    assert len(akids) == 1


def test_credentials_remove_unknown_id_fails(fresh: Fresh) -> None:
    before = fresh.credentials()
    proc = fresh.run(
        "credentials", "remove", "--prefix", "example/xks", "--access-key-id", "A" * 24
    )
    assert_one_line_failure(proc)
    assert fresh.credentials() == before


def test_credentials_remove_on_unknown_prefix_fails(fresh: Fresh) -> None:
    proc = fresh.run("credentials", "remove", "--prefix", "nowhere", "--access-key-id", fresh.akid)
    assert_one_line_failure(proc)


def test_credentials_remove_last_is_refused(fresh: Fresh) -> None:
    proc = fresh.run(
        "credentials", "remove", "--prefix", "example/xks", "--access-key-id", fresh.akid
    )
    assert "--allow-last" in assert_one_line_failure(proc)
    assert [c["access_key_id"] for c in fresh.credentials()["example/xks"]] == [fresh.akid]


def test_credentials_remove_last_with_allow_last_removes_the_prefix(fresh: Fresh) -> None:
    proc = fresh.run(
        "credentials",
        "remove",
        "--prefix",
        "example/xks",
        "--access-key-id",
        fresh.akid,
        "--allow-last",
    )
    assert proc.returncode == 0, proc.stderr
    assert "example/xks" not in fresh.credentials()


# --- kms-config ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["example/xks", "/example/xks"])
def test_kms_config_prints_the_prefix_console_json(fresh: Fresh, prefix: str) -> None:
    proc = fresh.run("kms-config", "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    kms = json.loads(proc.stdout)
    assert set(kms) == CONSOLE_KEYS
    assert kms["XksProxyUriPath"] == fresh.kms["XksProxyUriPath"]
    assert kms["XksProxyAuthenticationCredential"] == fresh.kms["XksProxyAuthenticationCredential"]


def test_kms_config_for_a_added_prefix(fresh: Fresh) -> None:
    added = json.loads(fresh.run("credentials", "add", "--prefix", "tenant-b").stdout)
    proc = fresh.run("kms-config", "--prefix", "tenant-b")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == added


def test_kms_config_unknown_prefix_fails(fresh: Fresh) -> None:
    assert_one_line_failure(fresh.run("kms-config", "--prefix", "nowhere"))


# --- check --------------------------------------------------------------------------------


def test_check_on_a_good_rig_says_active(rig: Rig) -> None:
    proc = xksproxy("check", "-c", str(rig.config), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ACTIVE" in proc.stdout


def wrong_pin(fresh: Fresh) -> subprocess.CompletedProcess[str]:
    pin = fresh.dir / "secrets/hsm-pin"
    pin.write_text("0" * len(pin.read_text().strip()) + "\n")
    return fresh.run("check")


def test_check_with_a_wrong_pin_fails(fresh: Fresh) -> None:
    proc = wrong_pin(fresh)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "ACTIVE" not in proc.stdout
    assert not proc.stdout.rstrip().endswith(": ok")
    assert re.search(r"PIN|login", proc.stderr + proc.stdout, re.IGNORECASE), proc.stderr


def test_check_with_a_wrong_pin_says_the_login_failed(fresh: Fresh) -> None:
    line = assert_one_line_failure(wrong_pin(fresh))
    assert re.search(r"PIN|login", line, re.IGNORECASE), line


def test_check_with_a_missing_pin_file_fails(fresh: Fresh) -> None:
    (fresh.dir / "secrets/hsm-pin").unlink()
    proc = fresh.run("check")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "ACTIVE" not in proc.stdout


# --- bad input ----------------------------------------------------------------------------

# {cfg}: a fresh rig's config; {dir}: a new directory (dev-setup: a path not made yet);
# {bad}: a file with invalid TOML; {missing}: a config path that does not exist.
BAD_INPUT: list[Any] = [
    pytest.param([], id="no-subcommand"),
    pytest.param(["frobnicate"], id="unknown-subcommand"),
    pytest.param(["keys"], id="keys-without-subcommand"),
    pytest.param(["keys", "frobnicate", "-c", "{cfg}"], id="unknown-keys-subcommand"),
    pytest.param(["keys", "list"], id="keys-list-without-c"),
    pytest.param(["check"], id="check-without-c"),
    pytest.param(["serve"], id="serve-without-c"),
    pytest.param(["kms-config", "--prefix", "example/xks"], id="kms-config-without-c"),
    pytest.param(["credentials", "add", "--prefix", "p"], id="credentials-add-without-c"),
    pytest.param(["keys", "list", "-c", "{missing}"], id="keys-list-missing-config"),
    pytest.param(["check", "-c", "{missing}"], id="check-missing-config"),
    pytest.param(["serve", "-c", "{missing}"], id="serve-missing-config"),
    pytest.param(["check", "-c", "{bad}"], id="check-invalid-toml"),
    pytest.param(["keys", "list", "-c", "{bad}"], id="keys-list-invalid-toml"),
    pytest.param(["check", "-c", "{dir}"], id="config-is-a-directory"),
    pytest.param(["credentials", "add", "-c", "{cfg}", "--prefix", "a b"], id="prefix-space"),
    pytest.param(["credentials", "add", "-c", "{cfg}", "--prefix", "../x"], id="prefix-dots"),
    pytest.param(["credentials", "add", "-c", "{cfg}", "--prefix", "a//b"], id="prefix-empty-seg"),
    pytest.param(["credentials", "add", "-c", "{cfg}", "--prefix", "p" * 120], id="prefix-long"),
    pytest.param(["kms-config", "-c", "{cfg}", "--prefix", "a?b"], id="kms-config-bad-prefix"),
    pytest.param(
        ["credentials", "remove", "-c", "{cfg}", "--prefix", "a b", "--access-key-id", "A" * 24],
        id="remove-bad-prefix",
    ),
    pytest.param(
        ["credentials", "remove", "-c", "{cfg}", "--prefix", "example/xks", "--access-key-id", "x"],
        id="remove-bad-access-key-id",
    ),
    pytest.param(["dev-setup", "{dir}", "--prefix", "bad prefix"], id="dev-setup-bad-prefix"),
    pytest.param(["dev-setup", "{dir}", "--port", "http"], id="dev-setup-bad-port"),
    pytest.param(["dev-setup", "{dir}", "--hsms", "0"], id="dev-setup-no-hsms"),
    pytest.param(["dev-setup", "{dir}", "--hsms", "11"], id="dev-setup-eleven-hsms"),
    pytest.param(["dev-setup", "{dir}", "--hsms", "two"], id="dev-setup-hsms-not-a-number"),
    pytest.param(["keys", "list", "-c", "{cfg}", "--bogus"], id="unknown-option"),
]


def substitute(args: Sequence[str], cfg: str, tmp_path: Path) -> list[str]:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    values = {
        "{cfg}": cfg,
        "{dir}": str(tmp_path / "new-dir"),
        "{bad}": str(bad),
        "{missing}": str(tmp_path / "missing.toml"),
    }
    if "dev-setup" not in args:
        (tmp_path / "new-dir").mkdir()
    return [values.get(a, a) for a in args]


@pytest.mark.parametrize("args", BAD_INPUT)
def test_bad_input_fails_with_one_line(
    request: pytest.FixtureRequest, tmp_path: Path, args: list[str]
) -> None:
    rig: Fresh | None = request.getfixturevalue("fresh") if "{cfg}" in args else None
    before = rig.credentials() if rig else None
    proc = xksproxy(*substitute(args, str(rig.config) if rig else "", tmp_path), check=False)
    assert_one_line_failure(proc)
    if rig:
        assert rig.credentials() == before


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty-file-without-hsms"),
        pytest.param(b"hsms = 1\n", id="hsms-not-a-list"),
        pytest.param(
            b'[server]\nhost = "\xff"\n',
            id="not-utf8",
        ),
        pytest.param(
            b'[[hsms]]\nname = "h"\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\n'
            b'token_label = "t"\npin_env = "X"\n[hsms.env]\nSOFTHSM2_CONF = 1\n',
            id="non-string-conf-env",
        ),
    ],
)
def test_config_problem_fails_without_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.toml"
    path.write_bytes(content)
    proc = xksproxy("check", "-c", str(path), check=False)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(line.startswith("xksproxy: config: ") for line in proc.stderr.splitlines())


def test_unreadable_credentials_file_fails_with_one_line(fresh: Fresh) -> None:
    (fresh.dir / "credentials.json").write_text("{not json")
    proc = fresh.run("kms-config", "--prefix", "example/xks")
    assert_one_line_failure(proc)
    assert proc.returncode == 78


INVALID_CONFIG = {
    "server": {"port": 0, "request_deadline_ms": 1000, "colour": "blue"},
    "sigv4": {"region": "Mars"},
    "hsms": [
        {"name": "h", "module": "/nonexistent/libpkcs11.so", "token_label": "t", "pin": "1234"}
    ],
}
INVALID_CONFIG_KEYS = [
    "server.port",
    "server.request_deadline_ms",
    "server.colour",
    "sigv4.region",
    "hsms[0].module",
    "hsms[0].pin",
    "hsms[0]: set exactly one of pin_env or pin_file",
]


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["serve"],
        ["keys", "list"],
        ["keys", "create", "k1"],
        ["kms-config", "--prefix", "example/xks"],
        ["credentials", "add", "--prefix", "example/xks"],
    ],
    ids=lambda c: "-".join(c),
)
def test_invalid_config_exits_78_listing_every_problem(tmp_path: Path, command: list[str]) -> None:
    path = write_config(tmp_path / "xksproxy.toml", INVALID_CONFIG)
    proc = xksproxy(*command, "-c", str(path), check=False)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    for key in INVALID_CONFIG_KEYS:
        assert any(key in line for line in lines), (key, lines)
    assert all(line.startswith("xksproxy: config: ") for line in lines), lines
