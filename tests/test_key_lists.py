"""Key allow-lists: ``[prefixes."P"] keys`` limits the external keys a prefix serves; any other
key is KeyNotFoundException to it.  Units, configuration, and a real proxy with SIGHUP."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Rig, Server, free_port, make_rig, start_server, stop_server, xksproxy
from tests.xks_client import XksClient, decrypt_fields, key_meta
from xksproxy.authz import parse_key_list
from xksproxy.configfile import load_config
from xksproxy.errors import ConfigError


def key_list(value: Any) -> Any:
    problems: list[str] = []
    parsed = parse_key_list(value, "keys", problems)
    return parsed if parsed is not None else problems


@pytest.mark.parametrize(
    ("patterns", "key_id", "served"),
    [
        (["foo"], "foo", True),
        (["foo"], "foo2", False),
        (["foo"], "FOO", False),  # key ids are case-sensitive
        (["orders-*"], "orders-2026", True),
        (["orders-*"], "orders-", True),
        (["orders-*"], "order-1", False),
        (["k?"], "k1", True),
        (["k?"], "k12", False),
        (["a.b"], "axb", False),  # a dot is a dot
        (["*"], "anything", True),
        ([], "foo", False),  # an empty list serves no key
        (["foo", "bar-*"], "bar-1", True),
    ],
)
def test_matching(patterns: list[str], key_id: str, served: bool) -> None:
    assert (key_id in key_list(patterns)) is served


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("foo", "must be a list"),
        ({"a": 1}, "must be a list"),
        ([""], "'' is not a key id"),
        (["a/b"], "'a/b' is not a key id"),
        ([1], "1 is not a key id"),
        (["x" * 129], "is not a key id"),
    ],
)
def test_bad_lists(value: Any, problem: str) -> None:
    problems = key_list(value)
    assert isinstance(problems, list) and any(problem in p for p in problems), problems


def test_config(tmp_path: Path) -> None:
    out = xksproxy("dev-setup", str(tmp_path / "rig"), "--port", str(free_port())).stdout
    assert json.loads(out)
    config = tmp_path / "rig" / "xksproxy.toml"
    text = config.read_text()
    config.write_text(text + '\n[prefixes."example/xks"]\nkeys = ["foo", "orders-*"]\n')
    keys = load_config(config).prefix("example/xks").keys
    assert keys is not None and keys.patterns == ("foo", "orders-*")
    assert load_config(config).prefix("other").keys is None  # no list: every key
    config.write_text(text + '\n[prefixes."example/xks"]\nkeys = "foo"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert any(
        p.startswith('prefixes."example/xks".keys: must be a list') for p in err.value.problems
    )


# ---- a real proxy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Server]]:
    directory = tmp_path_factory.mktemp("key-lists")
    rig = make_rig(directory / "rig", free_port())
    with rig.config.open("a") as f:
        f.write(f'\n[prefixes."{rig.prefix}"]\nkeys = ["foo", "enc-*"]\n')
    server = start_server(rig.config, rig.port, directory / "proxy.log")
    yield rig, server
    stop_server(server)


def clients(rig: Rig, server: Server) -> tuple[XksClient, XksClient]:
    """The listed prefix's client, and one of a prefix without a list."""
    return (
        XksClient("127.0.0.1", server.port, rig.prefix, rig.akid, rig.secret, rig.region),
        XksClient(
            "127.0.0.1", server.port, rig.other_prefix, rig.other_akid, rig.other_secret, rig.region
        ),
    )


def status(client: XksClient, key: str) -> tuple[int, str | None]:
    resp = client.metadata(key, key_meta("CreateKey"))
    return resp.status, resp.json.get("errorName")


def set_keys(rig: Rig, line: str) -> None:
    text = rig.config.read_text()
    rig.config.write_text(re.sub(r"(?m)^keys = .*$", line, text))


def test_listed_keys_are_served_others_do_not_exist(listed: tuple[Rig, Server]) -> None:
    rig, server = listed
    mine, other = clients(rig, server)
    assert status(mine, "foo") == (200, None)
    assert status(mine, "enc-only") == (200, None)
    plaintext = base64.b64encode(b"x" * 16).decode()
    assert mine.encrypt("enc-only", plaintext=plaintext).status == 200
    for key in ("dec-only", "no-usage", "nonexistent"):
        assert status(mine, key) == (404, "KeyNotFoundException")
    enc = mine.encrypt("foo", plaintext=plaintext)
    assert enc.status == 200
    resp = mine.decrypt("dec-only", **decrypt_fields(enc.json))
    assert resp.status == 404 and resp.json["errorName"] == "KeyNotFoundException"
    assert mine.health().status == 200
    assert status(other, "dec-only") == (200, None)  # a prefix without a list: every key
    lines = [json.loads(ln) for ln in server.log_text().splitlines() if '"xks_request"' in ln]
    refused = [ln for ln in lines if ln.get("key_not_in_prefix")]
    assert {ln["key_id"] for ln in refused} >= {"dec-only", "no-usage", "nonexistent"}
    assert all(ln["status"] == 404 for ln in refused)


def test_sighup_changes_the_list_and_a_bad_one_is_rejected(listed: tuple[Rig, Server]) -> None:
    rig, server = listed
    mine, _ = clients(rig, server)
    original = rig.config.read_text()
    try:
        set_keys(rig, 'keys = ["dec-only"]')
        server.sighup()
        assert status(mine, "dec-only") == (200, None)
        assert status(mine, "foo") == (404, "KeyNotFoundException")
        applied = [ln for ln in server.log_text().splitlines() if '"reload_applied"' in ln]
        assert json.loads(applied[-1])["key_lists"] == {rig.prefix: ["dec-only"]}
        set_keys(rig, 'keys = ["bad/key"]')
        server.sighup()
        assert "'bad/key' is not a key id" in server.log_text()
        assert status(mine, "dec-only") == (200, None)  # the list before the bad reload
        assert status(mine, "foo") == (404, "KeyNotFoundException")
    finally:
        rig.config.write_text(original)
        server.sighup()
    assert status(mine, "foo") == (200, None)


def test_policy_test_says_a_key_outside_the_list_is_not_found(
    listed: tuple[Rig, Server], tmp_path: Path
) -> None:
    rig, _ = listed
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"requestMetadata": key_meta("Encrypt")}))
    args = ("policy", "test", "-c", str(rig.config), "--prefix", rig.prefix, "--request")
    out = xksproxy(*args, str(request), "--key-id", "dec-only", check=False)
    assert out.returncode == 1, out
    assert "decision: deny" in out.stdout and "KeyNotFoundException" in out.stdout
    out = xksproxy(*args, str(request), "--key-id", "enc-only", check=False)
    assert out.returncode == 0 and "decision: allow" in out.stdout, out
