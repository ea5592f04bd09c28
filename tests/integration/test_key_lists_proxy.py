"""Key allow-lists (``[prefixes."P"] keys``) in a rig's configuration and on a real proxy, with
SIGHUP (matching and bad lists: tests/unit/test_key_lists.py)."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import xksproxy
from tests.support.configs import edit_config, merge, read_config, write_config
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, dev_rig, make_rig
from tests.support.xks_client import XksClient, decrypt_fields, key_meta
from xksproxy.configfile import load_config
from xksproxy.errors import ConfigError


def test_config(tmp_path: Path) -> None:
    rig = dev_rig(tmp_path / "rig")
    assert rig.kms
    config = rig.config
    data = read_config(config)

    def listing(keys: object) -> dict[str, object]:
        return merge(copy.deepcopy(data), {"prefixes": {"example/xks": {"keys": keys}}})

    write_config(config, listing(["foo", "orders-*"]))
    keys = load_config(config).prefix("example/xks").keys
    assert keys is not None and keys.patterns == ("foo", "orders-*")
    assert load_config(config).prefix("other").keys is None  # no list: every key
    write_config(config, listing("foo"))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert any(
        p.startswith('prefixes."example/xks".keys: must be a list') for p in err.value.problems
    )


# ---- a real proxy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Server]]:
    directory = tmp_path_factory.mktemp("key-lists")
    rig = make_rig(directory / "rig")
    set_keys(rig, ["foo", "enc-*"])
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


def set_keys(rig: Rig, keys: list[str]) -> None:
    edit_config(rig.config, {"prefixes": {rig.prefix: {"keys": keys}}})


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
    original = rig.config.read_bytes()
    try:
        set_keys(rig, ["dec-only"])
        server.sighup()
        assert status(mine, "dec-only") == (200, None)
        assert status(mine, "foo") == (404, "KeyNotFoundException")
        applied = [ln for ln in server.log_text().splitlines() if '"reload_applied"' in ln]
        assert json.loads(applied[-1])["key_lists"] == {rig.prefix: ["dec-only"]}
        set_keys(rig, ["bad/key"])
        server.sighup()
        assert "'bad/key' is not a key id" in server.log_text()
        assert status(mine, "dec-only") == (200, None)  # the list before the bad reload
        assert status(mine, "foo") == (404, "KeyNotFoundException")
    finally:
        rig.config.write_bytes(original)
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
