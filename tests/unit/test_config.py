"""Configuration and credentials-file validation (xksproxy.config, xksproxy.credentials).

These import only the pure validation modules: nothing here loads a PKCS#11 library.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import write_secret
from tests.support.paths import ROOT
from xksproxy.config import Config
from xksproxy.configfile import load_config, parse_config
from xksproxy.credentials import (
    ACCESS_KEY_ID_RE,
    SECRET_RE,
    Credential,
    Credentials,
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
)
from xksproxy.errors import ConfigError

SAMPLE = ROOT / "config" / "softhsm.toml"
SAMPLE_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")

Data = dict[str, Any]


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a stand-in PKCS#11 library, so module paths validate."""
    (tmp_path / "libfake-pkcs11.so").write_bytes(b"\x7fELF")
    yield tmp_path


def hsm(name: str = "hsm-1") -> Data:
    return {
        "name": name,
        "module": "libfake-pkcs11.so",
        "token_label": "xksproxy",
        "pin_file": "secrets/hsm-pin",
    }


def valid() -> Data:
    """The smallest valid configuration (module path relative to the config file)."""
    return {
        "server": {"port": 8443},
        "sigv4": {"region": "eu-west-1"},
        "hsms": [hsm()],
        "prefixes": {"example/xks": {"enabled": True}},
    }


def parse(base: Path, data: Data) -> Config:
    return parse_config(data, base / "xksproxy.toml")


def problems_of(base: Path, data: Data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(base, data)
    return info.value.problems


# --- the sample and a valid config ---------------------------------------------------------


@pytest.mark.skipif(not SAMPLE_MODULE.is_file(), reason=f"{SAMPLE_MODULE} is not installed")
def test_sample_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XKSPROXY_HSM_PIN", "0123456789")
    cfg = load_config(SAMPLE)
    assert cfg.hsms[0].pin_env == "XKSPROXY_HSM_PIN"
    assert cfg.hsms[0].read_pin() == "0123456789"
    assert cfg.hsms[0].module == SAMPLE_MODULE
    assert cfg.server.max_plaintext_bytes >= 4300
    assert 8192 <= cfg.server.max_aad_bytes <= 65535
    assert cfg.prefix("example/xks").enabled


def test_minimal_config_is_valid(base: Path) -> None:
    cfg = parse(base, valid())
    assert cfg.server.port == 8443
    assert cfg.sigv4.region == "eu-west-1"
    assert cfg.hsms[0].module == base / "libfake-pkcs11.so"
    assert cfg.hsms[0].pin_file == base / "secrets/hsm-pin"


# --- one problem, reported with its key path -------------------------------------------------

Mutation = Callable[[Data], None]


def setp(path: str, value: Any) -> Mutation:
    """Set a dotted path ("server.port", "hsms.0.pin") in the config data."""

    def mutate(data: Data) -> None:
        node: Any = data
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def delp(path: str) -> Mutation:
    def mutate(data: Data) -> None:
        node: Any = data
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def many_hsms(n: int) -> Mutation:
    return setp("hsms", [hsm(f"hsm-{i}") for i in range(n)])


BAD_CONFIGS: list[tuple[str, Mutation, str]] = [
    ("port-zero", setp("server.port", 0), "server.port"),
    ("port-too-big", setp("server.port", 65536), "server.port"),
    ("port-string", setp("server.port", "8000"), "server.port"),
    ("port-bool", setp("server.port", True), "server.port"),
    ("host-empty", setp("server.host", " "), "server.host"),
    ("deadline-too-small", setp("server.request_deadline_ms", 9), "server.request_deadline_ms"),
    ("deadline-over-kms", setp("server.request_deadline_ms", 241), "server.request_deadline_ms"),
    ("plaintext-below-spec", setp("server.max_plaintext_bytes", 4299), "max_plaintext_bytes"),
    ("aad-below-spec", setp("server.max_aad_bytes", 8191), "server.max_aad_bytes"),
    ("aad-over-u16", setp("server.max_aad_bytes", 65536), "server.max_aad_bytes"),
    ("body-too-small", setp("server.max_body_bytes", 65536), "server.max_body_bytes"),
    ("fleet-zero", setp("server.fleet_size", 0), "server.fleet_size"),
    ("workers-zero", setp("server.workers", 0), "server.workers"),
    ("workers-too-many", setp("server.workers", 65), "server.workers"),
    ("shed-lag-too-small", setp("server.shed_lag_ms", 4), "server.shed_lag_ms"),
    ("in-flight-negative", setp("server.max_in_flight", -1), "server.max_in_flight"),
    ("max-pool-below-pool", setp("hsms.0.max_pool_size", 4), "hsms[0].max_pool_size"),
    ("max-pool-too-big", setp("hsms.0.max_pool_size", 1025), "hsms[0].max_pool_size"),
    ("copies-string", setp("hsms.0.session_key_copies", "yes"), "hsms[0].session_key_copies"),
    ("region-upper", setp("sigv4.region", "US-EAST-1"), "sigv4.region"),
    ("region-garbage", setp("sigv4.region", "mars"), "sigv4.region"),
    ("skew-zero", setp("sigv4.max_skew_seconds", 0), "sigv4.max_skew_seconds"),
    ("health-interval-over-60s", setp("health.interval_seconds", 61), "health.interval_seconds"),
    ("log-level", setp("logging.level", "trace"), "logging.level"),
    ("both-pin-sources", setp("hsms.0.pin_env", "XKS_PIN"), "hsms[0]"),
    ("no-pin-source", delp("hsms.0.pin_file"), "hsms[0]"),
    ("pin-inline", setp("hsms.0.pin", "1234"), "hsms[0].pin"),
    ("pin-env-empty", setp("hsms.0.pin_env", ""), "hsms[0].pin_env"),
    ("module-missing", setp("hsms.0.module", "/nonexistent/libpkcs11.so"), "hsms[0].module"),
    ("module-absent", delp("hsms.0.module"), "hsms[0].module"),
    ("token-label-absent", delp("hsms.0.token_label"), "hsms[0].token_label"),
    ("hsm-name-bad", setp("hsms.0.name", "bad name"), "hsms[0].name"),
    ("hsm-name-absent", delp("hsms.0.name"), "hsms[0].name"),
    ("hsm-vendor", setp("hsms.0.vendor", "acme"), "hsms[0].vendor"),
    ("hsm-pool-zero", setp("hsms.0.pool_size", 0), "hsms[0].pool_size"),
    ("hsm-env-not-table", setp("hsms.0.env", "SOFTHSM2_CONF=x"), "hsms[0].env"),
    ("hsm-env-value", setp("hsms.0.env", {"SOFTHSM2_DEBUG": 1}), "hsms[0].env"),
    ("no-hsms", delp("hsms"), "hsms"),
    ("empty-hsms", setp("hsms", []), "hsms"),
    ("hsms-a-table", setp("hsms", hsm()), "hsms"),
    ("hsm-not-table", setp("hsms", [1]), "hsms[0]"),
    ("eleven-hsms", many_hsms(11), "hsms"),
    ("duplicate-hsm-names", setp("hsms", [hsm("a"), hsm("a")]), "used more than once"),
    ("metrics-port", setp("metrics.port", 0), "metrics.port"),
    ("unknown-metrics", setp("metrics.path", "/m"), "metrics.path"),
    ("metrics-multiprocess-dir", setp("metrics.multiprocess_dir", " "), "metrics.multiprocess_dir"),
    ("health-recover-after", setp("health.recover_after", 0), "health.recover_after"),
    ("unknown-top-level", setp("tls", {"cert": "x"}), "tls"),
    ("unknown-server", setp("server.bogus", 1), "server.bogus"),
    ("unknown-sigv4", setp("sigv4.secret", "x"), "sigv4.secret"),
    ("unknown-health", setp("health.bogus", 1), "health.bogus"),
    ("unknown-logging", setp("logging.format", "text"), "logging.format"),
    ("unknown-hsm", setp("hsms.0.slot", 0), "hsms[0].slot"),
    ("unknown-prefix-setting", setp("prefixes.example/xks.quota", 5), "quota"),
    ("prefix-space", setp("prefixes", {"a b": {}}), 'prefixes."a b"'),
    ("prefix-dots", setp("prefixes", {"a/../b": {}}), 'prefixes."a/../b"'),
    ("prefix-empty-segment", setp("prefixes", {"a//b": {}}), 'prefixes."a//b"'),
    ("prefix-too-long", setp("prefixes", {"p" * 120: {}}), "prefixes"),
    ("prefix-enabled-string", setp("prefixes", {"p": {"enabled": "no"}}), 'prefixes."p".enabled'),
    ("prefix-not-table", setp("prefixes", {"p": True}), 'prefixes."p"'),
    ("server-not-table", setp("server", 8000), "server"),
    ("sigv4-not-table", setp("sigv4", "us-east-1"), "sigv4"),
    ("health-not-table", setp("health", [1]), "health"),
    ("logging-not-table", setp("logging", "debug"), "logging"),
    ("prefixes-not-table", setp("prefixes", ["example/xks"]), "prefixes"),
]


@pytest.mark.parametrize(
    ("mutate", "key_path"),
    [pytest.param(m, k, id=name) for name, m, k in BAD_CONFIGS],
)
def test_bad_config_names_its_key_path(base: Path, mutate: Mutation, key_path: str) -> None:
    data = copy.deepcopy(valid())
    mutate(data)
    problems = problems_of(base, data)
    assert any(key_path in p for p in problems), problems


def test_non_string_conf_path_in_hsm_env_is_a_problem(base: Path) -> None:
    data = valid()
    data["hsms"][0]["env"] = {"SOFTHSM2_CONF": 1}
    problems = problems_of(base, data)
    assert any("hsms[0].env" in p for p in problems), problems


def test_every_problem_is_reported_together(base: Path) -> None:
    data = valid()
    data["server"]["port"] = 0
    data["server"]["max_aad_bytes"] = 100
    data["sigv4"]["region"] = "nowhere"
    data["logging"] = {"level": "loud"}
    data["hsms"][0]["pin"] = "1234"
    data["prefixes"]["bad prefix"] = {}
    problems = problems_of(base, data)
    for key_path in (
        "server.port",
        "server.max_aad_bytes",
        "sigv4.region",
        "logging.level",
        "hsms[0].pin",
        'prefixes."bad prefix"',
    ):
        assert any(key_path in p for p in problems), (key_path, problems)


def test_ten_hsms_are_allowed(base: Path) -> None:
    data = valid()
    data["hsms"] = [hsm(f"hsm-{i}") for i in range(10)]
    assert len(parse(base, data).hsms) == 10


def test_hsms_sharing_a_module_must_share_its_environment(base: Path) -> None:
    data = valid()
    a, b = hsm("a"), hsm("b")
    a["env"] = {"SOFTHSM2_CONF": "a.conf"}
    b["env"] = {"SOFTHSM2_CONF": "b.conf"}
    data["hsms"] = [a, b]
    (problem,) = problems_of(base, data)
    assert "share module" in problem


def test_a_token_may_be_named_by_serial(base: Path) -> None:
    data = valid()
    h = hsm("a")
    del h["token_label"]
    h["token_serial"] = "0123456789abcdef"
    data["hsms"] = [h]
    cfg = parse(base, data).hsms[0]
    assert cfg.token_serial == "0123456789abcdef" and cfg.token_label is None


def test_label_and_serial_together_are_a_problem(base: Path) -> None:
    data = valid()
    data["hsms"][0]["token_serial"] = "0123"
    assert any("token_label" in p for p in problems_of(base, data))


def test_workers_default_to_the_cpus_this_process_may_use(base: Path) -> None:
    assert parse(base, valid()).server.workers == len(os.sched_getaffinity(0))


def test_the_pool_grows_to_32_sessions_unless_told_otherwise(base: Path) -> None:
    cfg = parse(base, valid())
    assert (cfg.hsms[0].pool_size, cfg.hsms[0].max_pool_size) == (8, 32)
    assert cfg.in_flight_limit == 64  # twice the largest max_pool_size, at least 64
    data = valid()
    setp("hsms.0.pool_size", 48)(data)
    cfg = parse(base, data)
    assert cfg.hsms[0].max_pool_size == 48  # a larger pool_size is also the maximum
    assert cfg.in_flight_limit == 96
    setp("hsms.0.max_pool_size", 100)(data)
    setp("server.max_in_flight", 70)(data)
    cfg = parse(base, data)
    assert cfg.hsms[0].max_pool_size == 100
    assert cfg.in_flight_limit == 70  # set: taken as it is


@pytest.mark.parametrize(
    ("vendor", "setting", "expected"),
    [
        ("softhsm", None, True),
        ("luna", None, False),
        ("generic", None, False),
        ("softhsm", False, False),
        ("luna", True, True),
    ],
)
def test_session_key_copies_default_to_softhsm_only(
    base: Path, vendor: str, setting: bool | None, expected: bool
) -> None:
    data = valid()
    data["hsms"][0]["vendor"] = vendor
    if setting is not None:
        data["hsms"][0]["session_key_copies"] = setting
    assert parse(base, data).hsms[0].use_session_copies is expected


def test_metrics_table(base: Path) -> None:
    data = valid()
    data["metrics"] = {"enabled": False, "port": 9200}
    cfg = parse(base, data).metrics
    assert (cfg.enabled, cfg.host, cfg.port) == (False, "127.0.0.1", 9200)


def test_the_empty_prefix_means_no_prefix(base: Path) -> None:
    data = valid()
    data["prefixes"] = {"/": {"enabled": False}}
    assert parse(base, data).prefix("").enabled is False


def test_prefix_tables_naming_the_same_prefix_are_a_problem(base: Path) -> None:
    data = valid()
    data["prefixes"] = {"tenant": {"enabled": False}, "/tenant/": {"enabled": True}}
    problems = problems_of(base, data)
    assert any("tenant" in p for p in problems), problems


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "cannot read" in info.value.problems[0]


def test_config_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1


def test_invalid_toml_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid TOML" in info.value.problems[0]


# --- the credentials file --------------------------------------------------------------------

AKID_A = "ABCDEFGHIJKLMNOPQRST2345"
AKID_B = "ZYXWVUTSRQPONMLKJIHG7654"
SECRET_A = base64.b64encode(bytes(range(32))).decode()
SECRET_B = base64.b64encode(bytes(range(32, 64))).decode()


def cred_entry(akid: str = AKID_A, secret: str = SECRET_A) -> Data:
    return {"access_key_id": akid, "secret": secret, "created": "2024-05-15T12:00:00Z"}


def write_creds(path: Path, prefixes: Any) -> Path:
    return write_secret(path, json.dumps({"version": 1, "prefixes": prefixes}))


def cred_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_credentials(path)
    return info.value.problems


def test_credentials_file_loads(tmp_path: Path) -> None:
    path = write_creds(
        tmp_path / "c.json",
        {"/example/xks/": [cred_entry()], "tenant-b": [cred_entry(AKID_B, SECRET_B)]},
    )
    creds = load_credentials(path)
    assert set(creds) == {"example/xks", "tenant-b"}
    assert creds["example/xks"][0].access_key_id == AKID_A
    assert creds["tenant-b"][0].secret == SECRET_B


def test_missing_credentials_file_means_no_prefixes(tmp_path: Path) -> None:
    assert load_credentials(tmp_path / "absent.json") == {}


BAD_AKIDS = [
    "ABCDEFGHIJKLMNOPQRS",  # 19 characters
    "A" * 31,
    "abcdefghijklmnopqrst2345",  # lower case
    "ABCDEFGHIJKLMNOPQRST0189",  # 0, 1, 8, 9 are not base32
    "ABCDEFGHIJ-LMNOPQRST2345",
    "",
    12345678901234567890,
    None,
]


@pytest.mark.parametrize("akid", BAD_AKIDS, ids=repr)
def test_bad_access_key_id_is_a_problem(tmp_path: Path, akid: Any) -> None:
    path = write_creds(tmp_path / "c.json", {"p": [cred_entry(akid=akid)]})
    problems = cred_problems(path)
    assert any('prefixes."p"[0].access_key_id' in p for p in problems), problems


BAD_SECRETS = [
    "A" * 42,
    "A" * 65,
    "A" * 42 + "-",  # URL-safe base64 characters are not allowed
    "A" * 42 + "_",
    "A" * 40 + " ===",
    "",
    None,
]


@pytest.mark.parametrize("secret", BAD_SECRETS, ids=repr)
def test_bad_secret_is_a_problem(tmp_path: Path, secret: Any) -> None:
    path = write_creds(tmp_path / "c.json", {"p": [cred_entry(secret=secret)]})
    problems = cred_problems(path)
    assert any('prefixes."p"[0].secret' in p for p in problems), problems


def test_bad_secret_is_not_echoed(tmp_path: Path) -> None:
    leaked = "s3cr3t" * 5 + "-" * 20
    path = write_creds(tmp_path / "c.json", {"p": [cred_entry(secret=leaked)]})
    assert not any(leaked in p for p in cred_problems(path))


def test_access_key_id_shared_by_two_prefixes_is_a_problem(tmp_path: Path) -> None:
    path = write_creds(
        tmp_path / "c.json", {"a": [cred_entry()], "b": [cred_entry(secret=SECRET_B)]}
    )
    problems = cred_problems(path)
    assert any(AKID_A in p and "access_key_id" in p for p in problems), problems


def test_access_key_id_twice_in_one_prefix_is_a_problem(tmp_path: Path) -> None:
    path = write_creds(tmp_path / "c.json", {"a": [cred_entry(), cred_entry(secret=SECRET_B)]})
    assert any("access_key_id" in p for p in cred_problems(path))


@pytest.mark.parametrize(
    "text",
    ["{", "", "not json", '{"prefixes": {"a": [}', "{'prefixes': {}}"],
    ids=["truncated", "empty", "words", "broken-list", "single-quotes"],
)
def test_credentials_file_that_is_not_json_is_a_problem(tmp_path: Path, text: str) -> None:
    path = write_secret(tmp_path / "c.json", text)
    problems = cred_problems(path)
    assert len(problems) == 1
    assert "not valid JSON" in problems[0]


def test_credentials_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "c.json", "")
    path.write_bytes(b'{"prefixes": {"\xff": []}}')
    assert len(cred_problems(path)) == 1


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ([], "prefixes"),
        ({"version": 1}, "prefixes"),
        ({"prefixes": []}, "prefixes"),
        ({"prefixes": {"a b": [cred_entry()]}}, 'prefixes."a b"'),
        ({"prefixes": {"a": cred_entry()}}, 'prefixes."a"'),
        ({"prefixes": {"a": ["x"]}}, 'prefixes."a"[0]'),
        (
            {"prefixes": {"a": [cred_entry(generate_credential().access_key_id)] * 11}},
            'prefixes."a"',
        ),
    ],
    ids=["list", "no-prefixes", "prefixes-list", "bad-prefix", "not-a-list", "item", "eleven"],
)
def test_credentials_file_structure_problems(tmp_path: Path, document: Any, where: str) -> None:
    path = write_secret(tmp_path / "c.json", json.dumps(document))
    problems = cred_problems(path)
    assert any(where in p for p in problems), problems


def test_several_credential_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_creds(
        tmp_path / "c.json",
        {"a b": [cred_entry()], "p": [cred_entry(akid="short"), cred_entry(secret="short")]},
    )
    problems = cred_problems(path)
    assert len(problems) == 3, problems


def test_generated_credential_is_valid() -> None:
    cred = generate_credential()
    assert ACCESS_KEY_ID_RE.match(cred.access_key_id)
    assert SECRET_RE.match(cred.secret)
    assert len(base64.b64decode(cred.secret)) >= 32
    assert generate_credential().access_key_id != cred.access_key_id


def test_credential_repr_hides_the_secret() -> None:
    cred = generate_credential()
    assert cred.secret not in repr(cred)
    assert cred.secret not in str(cred)


def test_kms_console_json_shape() -> None:
    cred = Credential(AKID_A, SECRET_A, "2024-05-15T12:00:00Z")
    assert kms_console_json("/p/kms/xks/v1", cred) == {
        "XksProxyUriPath": "/p/kms/xks/v1",
        "XksProxyAuthenticationCredential": {"AccessKeyId": AKID_A, "RawSecretAccessKey": SECRET_A},
    }


def sample_creds() -> Credentials:
    return {
        "example/xks": (Credential(AKID_A, SECRET_A, "2024-05-15T12:00:00Z"),),
        "tenant-b": (Credential(AKID_B, SECRET_B, "2024-05-16T12:00:00Z"),),
    }


def test_saved_credentials_load_back(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    save_credentials(path, sample_creds())
    assert load_credentials(path) == sample_creds()


def test_saved_credentials_are_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    old_umask = os.umask(0)
    try:
        save_credentials(path, sample_creds())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_saving_over_a_world_readable_file_makes_it_0600(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    path.chmod(0o644)
    save_credentials(path, sample_creds())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_the_file_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    save_credentials(path, {"old": sample_creds()["example/xks"]})
    with path.open() as reader:  # a reader that opened the old file keeps a whole old file
        save_credentials(path, sample_creds())
        assert json.loads(reader.read())["prefixes"].keys() == {"old"}
    assert load_credentials(path) == sample_creds()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.json"]


def test_failed_save_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "credentials.json"
    save_credentials(path, sample_creds())
    before = path.read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_credentials(path, {"new": sample_creds()["tenant-b"]})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.json"]


def test_a_reload_may_remove_every_credential_only_when_allowed(base: Path) -> None:
    from xksproxy.tenancy import Tenancy, check_credentials_kept

    creds = write_creds(base / "credentials.json", {})
    data = valid()
    setp("sigv4.credentials_file", str(creds))(data)
    before = Tenancy(bases={}, credentials={"p": {"AKID": "secret"}}, enabled={})
    after = Tenancy(bases={}, credentials={}, enabled={})
    with pytest.raises(ConfigError, match="holds no credential"):
        check_credentials_kept(parse(base, data), before, after)
    creds.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        check_credentials_kept(parse(base, data), before, after)
    setp("sigv4.allow_no_credentials", True)(data)
    check_credentials_kept(parse(base, data), before, after)  # said explicitly: applied
    check_credentials_kept(parse(base, valid()), after, after)  # none before: nothing to keep
