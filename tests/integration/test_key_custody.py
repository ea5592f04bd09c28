"""Key versions, rotation, disable/enable and scheduled deletion, as an operator uses them.

Real SoftHSM tokens, the real CLI, and a running proxy (2 workers) signed by botocore: every
change a key command makes must reach the running proxy within ``key_cache_ttl_seconds``
(1 s here), with no restart.  Time is moved forward for deletion windows and rotation periods
with libfaketime (``faketime``), so the CLI runs unmodified against a clock days ahead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import assert_one_line_failure, hsm_tool, xksproxy
from tests.support.configs import edit_config, read_config
from tests.support.paths import ROOT
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import MultiRig, Rig, make_multi_rig, make_rig, ports_of
from tests.support.xks_client import Response, XksClient, decrypt_fields
from xksproxy.dev.faultinject import set_token_clock
from xksproxy.hsm import objects
from xksproxy.hsm.keycache import SWEEP_MIN_KEYS
from xksproxy.keys.locks import KeyLocks

TTL = 1.0
# How long after a key command returns a running proxy may still act on the old state: the
# TTL, plus room for a request and a lookup on a loaded machine.
SEEN_WITHIN = TTL + 2.0

needs_faketime = pytest.mark.skipif(
    shutil.which("faketime") is None, reason="faketime is not installed (scripts/bootstrap)"
)


@pytest.fixture(scope="module")
def rig1(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(
        tmp_path_factory.mktemp("custody"), settings={"hsms": {"key_cache_ttl_seconds": TTL}}
    )


@pytest.fixture(scope="module")
def proxy(rig1: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(rig1.config, rig1.port, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(rig1: Rig, proxy: Server) -> XksClient:
    return XksClient("127.0.0.1", proxy.port, rig1.prefix, rig1.akid, rig1.secret, rig1.region)


@pytest.fixture(scope="module")
def rig2(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("custody2"), 2)


def run(config: Path, *args: str, faked: str | None = None) -> subprocess.CompletedProcess[str]:
    """``xksproxy ARGS -c CONFIG`` (not checked), under ``faketime FAKED`` if given."""
    if faked is None:
        return xksproxy(*args, "-c", str(config), check=False)
    return subprocess.run(
        ["faketime", faked, sys.executable, "-m", "xksproxy", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def ok(config: Path, *args: str, faked: str | None = None) -> Any:
    proc = run(config, *args, faked=faked)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def listed_key(config: Path, key: str) -> dict[str, Any]:
    """The key's entry in `keys list --json`."""
    found: list[dict[str, Any]] = [
        k for k in ok(config, "keys", "list", "--json") if k["keyId"] == key
    ]
    assert len(found) == 1, found
    return found[0]


def state_of(config: Path) -> str:
    """Everything the key commands could change, for "nothing changed" checks."""
    return run(config, "keys", "list", "--json").stdout


def cm_version(enc: dict[str, Any]) -> int:
    """The key version an Encrypt response's ciphertextMetadata names (format 1)."""
    raw = base64.b64decode(enc["ciphertextMetadata"])
    assert raw[0] == 1 and len(raw) == 5
    return int.from_bytes(raw[1:], "big")


def encrypt(client: XksClient, key: str) -> dict[str, Any]:
    resp = client.encrypt(key, plaintext=base64.b64encode(os.urandom(32)).decode())
    assert resp.status == 200, resp.body
    out: dict[str, Any] = resp.json
    return out


def seen(check: Callable[[], bool]) -> float:
    """Seconds until *check* holds on every worker (40 times in a row: each request is a new
    connection, which the kernel hands to either worker; 10 in a row all went to one worker
    once, in a full run); fails after SEEN_WITHIN."""
    start = time.monotonic()
    streak = 0
    while streak < 40:
        streak = streak + 1 if check() else 0
        assert time.monotonic() - start < SEEN_WITHIN, "the running proxy did not see it in time"
        if not streak:
            time.sleep(0.05)
    return time.monotonic() - start


def error_of(resp: Response) -> str | None:
    return None if resp.status == 200 else resp.error_name


# ---- versions and rotation -----------------------------------------------------------------


def test_rotate_twice_then_every_version_decrypts(rig1: Rig, client: XksClient) -> None:
    xksproxy("keys", "create", "rot", "-c", str(rig1.config))
    old = {1: encrypt(client, "rot")}
    for version in (2, 3):
        out = ok(rig1.config, "keys", "rotate", "rot")
        assert out["version"] == version
        seen(lambda v=version: cm_version(encrypt(client, "rot")) == v)  # type: ignore[misc]
        old[version] = encrypt(client, "rot")
    assert {v: cm_version(e) for v, e in old.items()} == {1: 1, 2: 2, 3: 3}
    for enc in old.values():
        resp = client.decrypt("rot", **decrypt_fields(enc))
        assert resp.status == 200, resp.body
    meta = client.metadata("rot")
    assert meta.json["keyStatus"] == "ENABLED"


def test_an_old_version_never_encrypts_again(rig1: Rig, client: XksClient) -> None:
    xksproxy("keys", "create", "rot-new", "-c", str(rig1.config))
    ok(rig1.config, "keys", "rotate", "rot-new")
    seen(lambda: cm_version(encrypt(client, "rot-new")) == 2)
    assert {cm_version(encrypt(client, "rot-new")) for _ in range(20)} == {2}


def test_a_fresh_ciphertext_decrypts_at_once_on_every_worker_after_rotations(
    rig1: Rig, client: XksClient
) -> None:
    """Right after each rotation, a ciphertext one worker made with the new version must decrypt
    on the other, whose cached view may be from just before the rotation (each request is a new
    connection, which the kernel hands to either worker).  KMS does not retry a 400."""
    xksproxy("keys", "create", "fresh", "-c", str(rig1.config))
    refused: list[tuple[int, int, str | None]] = []
    for _ in range(10):
        before = cm_version(encrypt(client, "fresh"))
        ok(rig1.config, "keys", "rotate", "fresh")
        end = time.monotonic() + TTL + 1.0  # until every worker has seen the new version
        while time.monotonic() < end:
            enc = encrypt(client, "fresh")
            resp = client.decrypt("fresh", **decrypt_fields(enc))
            if resp.status != 200:
                refused.append((cm_version(enc), before, resp.error_name))
    assert refused == [], refused


def test_a_version_with_two_objects_is_left_out_and_the_rest_serves(
    rig1: Rig, client: XksClient
) -> None:
    """Two objects for one version (two commands that raced, before key commands took locks):
    that version is never served and the key's other versions serve on, without a 500 or an
    internal detail sent to KMS; the commands report it and refuse to add a version."""
    cfg = rig1.config
    xksproxy("keys", "create", "dup", "-c", str(cfg))
    v1 = encrypt(client, "dup")
    ok(cfg, "keys", "rotate", "dup")
    seen(lambda: cm_version(encrypt(client, "dup")) == 2)
    v2 = encrypt(client, "dup")
    hsm_tool("duplicate", str(cfg), "softhsm-1", "dup", "2")
    seen(lambda: cm_version(encrypt(client, "dup")) == 1)  # the newest usable version
    assert client.decrypt("dup", **decrypt_fields(v1)).status == 200
    refused = client.decrypt("dup", **decrypt_fields(v2))
    assert refused.status == 400 and refused.error_name == "InvalidCiphertextException"
    meta = client.metadata("dup")
    assert meta.status == 200 and meta.json["keyStatus"] == "ENABLED"
    listed = listed_key(cfg, "dup")
    problem = "damaged on softhsm-1: version 2 has 2 objects of different material, not served"
    assert problem in listed["problems"]
    line = assert_one_line_failure(run(cfg, "keys", "rotate", "dup"))
    assert "damaged" in line and "version 2 has 2 objects" in line
    checked = run(cfg, "check")
    assert checked.returncode == 1, checked.stdout
    assert "key dup: version 2 has 2 objects of different material" in checked.stdout
    assert "1 key(s) need keys repair" in checked.stderr
    # One HSM, two keys for one version: nothing tells which is right; a person decides.
    (left,) = ok(cfg, "keys", "repair", "dup")["repaired"]
    assert left.startswith("left alone: version 2 on softhsm-1 has 2 objects")


RACERS = 8


def test_key_commands_on_one_key_wait_for_each_other(rig1: Rig) -> None:
    """Concurrent rotations of one key (the rotate-due timer and an operator) take turns on the
    key's lock: consecutive versions, never two objects for one."""
    cfg = rig1.config
    xksproxy("keys", "create", "race", "-c", str(cfg))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "keys", "rotate", "race", "-c", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RACERS)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * RACERS, [err for _, err in outs]
    versions = list(range(1, RACERS + 2))
    assert sorted(json.loads(out)["version"] for out, _ in outs) == versions[1:]
    listed = listed_key(cfg, "race")
    assert listed["versions"] == versions and listed["problems"] == []


def test_a_key_command_gives_up_on_a_held_lock_and_changes_nothing(rig1: Rig) -> None:
    cfg = rig1.config
    xksproxy("keys", "create", "held", "-c", str(cfg))
    assert "keys" in read_config(cfg)
    short = rig1.variant("short-wait", {"keys": {"lock_wait_seconds": 1}}, new_ports=False)
    before = state_of(cfg)
    locks = KeyLocks(rig1.dir / "locks", 0)
    with locks.hold("held"):
        line = assert_one_line_failure(run(short, "keys", "rotate", "held"))
        assert "being changed by another key command" in line and f"pid {os.getpid()}" in line
        assert state_of(cfg) == before
        xksproxy("keys", "create", "not-held", "-c", str(short))  # other keys do not wait
        assert ok(short, "keys", "rotate", "not-held")["version"] == 2
    assert ok(short, "keys", "rotate", "held")["version"] == 2


def test_a_version_the_key_does_not_have_does_not_decrypt(rig1: Rig, client: XksClient) -> None:
    xksproxy("keys", "create", "rot-cm", "-c", str(rig1.config))
    enc = encrypt(client, "rot-cm")
    forged = dict(enc, ciphertextMetadata=base64.b64encode(b"\x01\x00\x00\x00\x07").decode())
    resp = client.decrypt("rot-cm", **decrypt_fields(forged))
    assert resp.status == 400 and resp.error_name == "InvalidCiphertextException"


def test_rotate_on_two_hsms_gives_the_same_kcv_and_show_lists_it(rig2: MultiRig) -> None:
    rig2.create("r2")
    out = ok(rig2.config, "keys", "rotate", "r2")
    assert out["version"] == 2
    assert len(set(out["kcv"].values())) == 1 and set(out["kcv"]) == set(rig2.names)
    view = ok(rig2.config, "keys", "show", "r2", "--json")
    assert view["currentVersion"] == 2 and view["keyStatus"] == "ENABLED"
    assert [v["version"] for v in view["versions"]] == [2, 1]
    assert [v["state"] for v in view["versions"]] == ["current", "decrypt-only"]
    assert {v["origin"] for v in view["versions"]} == {"generated"}
    for v in view["versions"]:
        objects.parse_time(v["created"])
        assert len(set(v["kcv"].values())) == 1, v
    assert view["versions"][0]["kcv"]["softhsm-1"] == out["kcv"]["softhsm-1"]
    assert view["problems"] == []
    text = run(rig2.config, "keys", "show", "r2").stdout
    assert "current" in text and "decrypt-only" in text and out["kcv"]["softhsm-2"] in text


def test_show_names_a_missing_copy(rig2: MultiRig) -> None:
    only = rig2.only("softhsm-1")
    ok(only, "keys", "create", "r2-half")
    view = ok(rig2.config, "keys", "show", "r2-half", "--json")
    assert view["problems"] == ["missing on softhsm-2"]


def test_rotate_refuses_a_key_missing_on_an_hsm(rig2: MultiRig) -> None:
    ok(rig2.only("softhsm-1"), "keys", "create", "r2-missing")
    before = state_of(rig2.config)
    line = assert_one_line_failure(run(rig2.config, "keys", "rotate", "r2-missing"))
    assert "missing on softhsm-2" in line and "replicate" in line
    assert state_of(rig2.config) == before


@pytest.mark.parametrize(
    ("key", "needle"),
    [("nope", "does not exist"), ("bad/id", "key ids are"), ("no-usage", "usage none")],
)
def test_rotate_refuses_bad_keys(rig1: Rig, key: str, needle: str) -> None:
    before = state_of(rig1.config)
    line = assert_one_line_failure(run(rig1.config, "keys", "rotate", key))
    assert needle in line
    assert state_of(rig1.config) == before


# ---- rotation period -----------------------------------------------------------------------


@pytest.mark.parametrize("days", ["89", "2561", "ten", "0"])
def test_rotation_period_out_of_range_is_refused(rig1: Rig, days: str) -> None:
    xksproxy("keys", "create", "per-bad", "-c", str(rig1.config), check=False)
    before = state_of(rig1.config)
    proc = run(rig1.config, "keys", "rotation-period", "per-bad", "--days", days)
    assert (proc.returncode == 2 and "90 and 2560" in proc.stderr) or "number" in proc.stderr
    assert state_of(rig1.config) == before


def test_rotation_period_needs_days_or_off(rig1: Rig) -> None:
    proc = run(rig1.config, "keys", "rotation-period", "foo")
    assert proc.returncode == 2 and "--days" in proc.stderr


@needs_faketime
def test_rotate_due_rotates_only_keys_past_their_period(rig2: MultiRig) -> None:
    for key in ("due-a", "due-b", "due-off"):
        rig2.create(key)
    ok(rig2.config, "keys", "rotation-period", "due-a", "--days", "90")
    ok(rig2.config, "keys", "rotation-period", "due-b", "--days", "180")
    ok(rig2.config, "keys", "rotation-period", "due-off", "--days", "90")
    ok(rig2.config, "keys", "rotation-period", "due-off", "--off")
    now = ok(rig2.config, "keys", "rotate-due")
    assert "due-a" in now["notDue"] and now["rotated"] == {}
    before = state_of(rig2.config)
    dry = ok(rig2.config, "keys", "rotate-due", "--dry-run", faked="+91 days")
    assert dry["due"].get("due-a") == 2 and "due-b" in dry["notDue"]
    assert state_of(rig2.config) == before
    out = ok(rig2.config, "keys", "rotate-due", faked="+91 days")
    assert out["rotated"].get("due-a") == 2 and "due-b" in out["notDue"]
    assert "due-off" not in out["rotated"] and "due-off" not in out["notDue"]
    listing = rig2.listing()
    assert listing["due-a"]["versions"] == [1, 2] and listing["due-a"]["consistent"]
    assert listing["due-b"]["versions"] == [1]
    # The new version's period starts at its creation: not due again 91 days after the first.
    again = ok(rig2.config, "keys", "rotate-due", faked="+91 days")
    assert "due-a" not in again["rotated"]


@needs_faketime
def test_rotate_due_skips_a_disabled_key(rig2: MultiRig) -> None:
    rig2.create("due-disabled")
    ok(rig2.config, "keys", "rotation-period", "due-disabled", "--days", "90")
    ok(rig2.config, "keys", "disable", "due-disabled")
    out = ok(rig2.config, "keys", "rotate-due", faked="+91 days")
    assert out["skipped"].get("due-disabled") == "DISABLED"
    assert rig2.listing()["due-disabled"]["versions"] == [1]


# ---- disable and enable, seen by the running proxy -----------------------------------------


def test_disable_and_enable_reach_the_running_proxy(rig1: Rig, client: XksClient) -> None:
    xksproxy("keys", "create", "toggle", "-c", str(rig1.config))
    enc = encrypt(client, "toggle")
    ok(rig1.config, "keys", "disable", "toggle")
    seen(lambda: error_of(client.encrypt("toggle", plaintext="AAAA")) == "InvalidStateException")
    resp = client.decrypt("toggle", **decrypt_fields(enc))
    assert resp.status == 400 and resp.error_name == "InvalidStateException"
    assert client.metadata("toggle").json["keyStatus"] == "DISABLED"
    ok(rig1.config, "keys", "enable", "toggle")
    seen(lambda: client.encrypt("toggle", plaintext="AAAA").status == 200)
    assert client.decrypt("toggle", **decrypt_fields(enc)).status == 200


def hsm_calls(metrics_port: int, call: str) -> float:
    """HSM calls of one kind (every worker's) so far, from the proxy's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = resp.read().decode()
    found = re.search(rf'xks_hsm_call_duration_seconds_count\{{call="{call}",[^}}]*\}} (\S+)', text)
    assert found, f"no {call} calls in the metrics"
    return float(found.group(1))


@contextlib.contextmanager
def many_keys(tmp_path: Path) -> Iterator[tuple[MultiRig, XksClient, int, list[str]]]:
    """A proxy on a fault-injection rig with SWEEP_MIN_KEYS + 2 keys and a TTL of TTL s."""
    rig = make_multi_rig(tmp_path / "rig", 1, "--fault-injection")
    port, metrics_port = rig.port, rig.metrics_port
    keys = [f"many-{i}" for i in range(SWEEP_MIN_KEYS + 2)]
    for key in keys:
        rig.create(key)
    edit_config(rig.config, {"hsms": {"key_cache_ttl_seconds": TTL}})
    srv = start_server(rig.config, port, tmp_path / "proxy.log")
    try:
        kms = json.loads((rig.dir / "kms-xks-config.json").read_text())
        client = XksClient.from_kms(kms, port)
        yield rig, client, metrics_port, keys
    finally:
        rig.control("softhsm-1").ok()
        stop_server(srv)


def test_many_keys_due_at_once_are_refreshed_in_one_pass(tmp_path: Path) -> None:
    """When lookups cannot keep up (each search slowed to 30 ms here, as in a big token), the
    keys due pile up and, past SWEEP_MIN_KEYS, one pass over the token refreshes them all; a
    key command still reaches the running proxy within the TTL."""
    with many_keys(tmp_path) as (rig, client, metrics_port, keys):
        rig.control("softhsm-1").slow(30, ["C_FindObjectsInit"])
        before = hsm_calls(metrics_port, "index")
        until = time.monotonic() + 4 * TTL
        while time.monotonic() < until:
            for key in keys:
                encrypt(client, key)
        assert hsm_calls(metrics_port, "index") > before
        run(rig.config, "keys", "disable", keys[-1])
        seen(
            lambda: error_of(client.encrypt(keys[-1], plaintext="AAAA")) == "InvalidStateException"
        )
        for key in keys[:-1]:
            encrypt(client, key)


def test_many_keys_in_use_are_refreshed_by_passes_alone(tmp_path: Path) -> None:
    """With SWEEP_MIN_KEYS or more keys in use, entries falling due together are refreshed by
    one pass, with no lookup of each of the first keys due just before it: on a big token
    each such lookup is a search of every object, holding a session."""
    with many_keys(tmp_path) as (_, client, metrics_port, keys):
        for key in keys:
            encrypt(client, key)
        lookups, passes = hsm_calls(metrics_port, "find_key"), hsm_calls(metrics_port, "index")
        until = time.monotonic() + 5 * TTL
        while time.monotonic() < until:
            for key in keys:
                encrypt(client, key)
        assert hsm_calls(metrics_port, "index") >= passes + 3
        # Without the passes every key would be looked up once a TTL (5 x 10 searches here).
        # A starved machine may let a few keys fall out of use and be looked up alone: at most
        # one round of them.
        assert hsm_calls(metrics_port, "find_key") - lookups <= len(keys)


# ---- scheduled deletion --------------------------------------------------------------------


@needs_faketime
def test_deletion_window_cancel_and_purge(rig1: Rig, client: XksClient) -> None:
    cfg = rig1.config
    xksproxy("keys", "create", "doomed", "-c", str(cfg))
    ok(cfg, "keys", "rotate", "doomed")
    seen(lambda: cm_version(encrypt(client, "doomed")) == 2)
    enc = encrypt(client, "doomed")
    out = ok(cfg, "keys", "schedule-deletion", "doomed", "--days", "7")
    assert out["keyStatus"] == "PENDING_DELETION"
    seen(lambda: error_of(client.encrypt("doomed", plaintext="AAAA")) == "InvalidStateException")
    assert client.decrypt("doomed", **decrypt_fields(enc)).error_name == "InvalidStateException"
    assert client.metadata("doomed").json["keyStatus"] == "DISABLED"  # the spec knows two
    # Inside the window nothing is destroyed, not even 6 days later.
    early = ok(cfg, "keys", "purge-due", faked="+6 days")
    assert "doomed" in early["notDue"] and early["purged"] == {}
    assert ok(cfg, "keys", "show", "doomed", "--json")["keyStatus"] == "PENDING_DELETION"
    # Cancelled: DISABLED, as KMS does; enabled again, the old ciphertext decrypts.
    assert ok(cfg, "keys", "cancel-deletion", "doomed")["keyStatus"] == "DISABLED"
    ok(cfg, "keys", "enable", "doomed")
    seen(lambda: client.decrypt("doomed", **decrypt_fields(enc)).status == 200)
    # Scheduled again, and purged once the window has passed: every version is gone.
    ok(cfg, "keys", "schedule-deletion", "doomed", "--days", "7")
    purged = ok(cfg, "keys", "purge-due", faked="+8 days")
    assert purged["purged"] == {"doomed": ["softhsm-1"]}
    assert "doomed" not in json.dumps(ok(cfg, "keys", "list", "--json"))
    seen(lambda: error_of(client.metadata("doomed")) == "KeyNotFoundException")
    assert client.decrypt("doomed", **decrypt_fields(enc)).error_name == "KeyNotFoundException"


@needs_faketime
def test_purge_trusts_no_clock_that_moved_back_or_leapt(tmp_path: Path) -> None:
    """The deletion window is measured on the host's clock: a clock set 8 days ahead the day
    after a run, or one behind the last run, keeps due keys (exit 1, nothing destroyed) until
    the operator says the clock is right."""
    cfg = make_rig(tmp_path / "rig").config
    for key in ("early", "late"):
        xksproxy("keys", "create", key, "-c", str(cfg))
    ok(cfg, "keys", "schedule-deletion", "early", "--days", "7")
    assert ok(cfg, "keys", "purge-due")["purged"] == {}  # a run today: recorded
    leapt = run(cfg, "keys", "purge-due", faked="+8 days")
    assert leapt.returncode == 1, leapt.stderr
    refused = json.loads(leapt.stdout)["refused"]["early"]
    assert "8.0 days past the last purge-due run" in refused and "--clock-checked" in refused
    assert "early" in json.dumps(ok(cfg, "keys", "list", "--json"))  # kept
    out = ok(cfg, "keys", "purge-due", "--clock-checked", faked="+8 days")
    assert out["purged"] == {"early": ["softhsm-1"]}  # said to be right: purged, +8 recorded
    ok(cfg, "keys", "schedule-deletion", "late", "--days", "7")  # due from today + 7 days
    behind = run(cfg, "keys", "purge-due", faked="+7 days")  # a day behind the last run
    assert behind.returncode == 1, behind.stderr
    assert "is behind the last purge-due run" in json.loads(behind.stdout)["refused"]["late"]
    assert ok(cfg, "keys", "purge-due", faked="+9 days")["purged"] == {"late": ["softhsm-1"]}


@needs_faketime
def test_purge_trusts_no_host_clock_far_from_an_hsms_own(tmp_path: Path) -> None:
    """Where a token has a clock of its own (Luna and nShield do; here the fault-injection
    module's token clock), a host clock more than 10 minutes from it purges nothing, even on
    the first run, when no run has been recorded to compare with."""
    rig = make_multi_rig(tmp_path / "rig", 2, "--fault-injection")
    rig.create("ahead")
    ok(rig.config, "keys", "schedule-deletion", "ahead", "--days", "7")
    # This host's clock 8 days ahead; HSM softhsm-2's right (8 days behind the faked time).
    clock = rig.dir / "faults" / "softhsm-2.clock"
    set_token_clock(clock, -8 * 86400)
    leapt = run(rig.config, "keys", "purge-due", faked="+8 days")
    assert leapt.returncode == 1, leapt.stderr
    refused = json.loads(leapt.stdout)["refused"]["ahead"]
    assert "192.0 hours ahead of the clock of HSM softhsm-2" in refused, refused
    assert "ahead" in rig.listing()  # kept
    set_token_clock(clock, None)  # a token without a clock: only the records are compared
    assert ok(rig.config, "keys", "purge-due", faked="+8 days")["purged"] == {"ahead": rig.names}


@needs_faketime
def test_purge_due_dry_run_destroys_nothing(rig2: MultiRig) -> None:
    rig2.create("dry-doomed")
    ok(rig2.config, "keys", "schedule-deletion", "dry-doomed", "--days", "7")
    before = state_of(rig2.config)
    out = ok(rig2.config, "keys", "purge-due", "--dry-run", faked="+8 days")
    assert out["due"]["dry-doomed"] == rig2.names
    assert state_of(rig2.config) == before


@needs_faketime
def test_purge_refuses_when_copies_disagree(rig2: MultiRig) -> None:
    rig2.create("split")
    ok(rig2.only("softhsm-1"), "keys", "schedule-deletion", "split", "--days", "7")
    before = rig2.listing()["split"]  # (other tests' keys may be purged by this purge-due)
    proc = run(rig2.config, "keys", "purge-due", faked="+8 days")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert "not pending deletion on softhsm-2" in out["refused"]["split"]
    assert rig2.listing()["split"] == before
    # cancel-deletion makes the fleet agree again (DISABLED everywhere).
    ok(rig2.config, "keys", "cancel-deletion", "split")
    entry = rig2.listing()["split"]
    assert [entry["hsms"][n]["keyStatus"] for n in rig2.names] == ["DISABLED", "DISABLED"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["schedule-deletion", "foo", "--days", "6"], "between 7 and 30"),
        (["schedule-deletion", "foo", "--days", "31"], "between 7 and 30"),
        (["schedule-deletion", "foo", "--days", "0"], "between 7 and 30"),
        (["schedule-deletion", "nope"], "does not exist"),
        (["schedule-deletion", "bad/id"], "key ids are"),
        (["cancel-deletion", "foo"], "not pending deletion"),
        (["cancel-deletion", "nope"], "does not exist"),
    ],
)
def test_deletion_commands_refuse_bad_input(rig1: Rig, args: list[str], needle: str) -> None:
    before = state_of(rig1.config)
    line = assert_one_line_failure(run(rig1.config, "keys", *args))
    assert needle in line
    assert state_of(rig1.config) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["schedule-deletion", "pending", "--days", "7"], "already pending deletion"),
        (["enable", "pending"], "cancel-deletion first"),
        (["disable", "pending"], "cancel-deletion first"),
        (["rotate", "pending"], "cancel the deletion"),
    ],
)
def test_a_pending_key_refuses_other_changes(rig1: Rig, args: list[str], needle: str) -> None:
    if run(rig1.config, "keys", "show", "pending").returncode != 0:
        xksproxy("keys", "create", "pending", "-c", str(rig1.config))
        ok(rig1.config, "keys", "schedule-deletion", "pending", "--days", "30")
    before = state_of(rig1.config)
    line = assert_one_line_failure(run(rig1.config, "keys", *args))
    assert needle in line
    assert state_of(rig1.config) == before


def test_there_is_no_way_to_delete_without_a_window() -> None:
    """No key command destroys a key at once: the only destroying one is purge-due."""
    proc = xksproxy("keys", "--help")
    commands = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert not [c for c in commands if c.startswith(("delete", "destroy", "remove"))]
    assert "purge-due" in commands and "schedule-deletion" in commands


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("custody-faults"), 2, "--fault-injection")


@pytest.mark.parametrize("function", ["C_DeriveKey", "C_CreateObject"])
def test_a_rotation_that_fails_leaves_the_key_as_it_was(faulty: MultiRig, function: str) -> None:
    key = f"rot-fail-{function}"
    faulty.create(key)
    ok(faulty.config, "keys", "disable", key)
    before = faulty.listing()[key]
    faulty.control("softhsm-2").error("CKR_DEVICE_ERROR", [function])
    try:
        line = assert_one_line_failure(run(faulty.config, "keys", "rotate", key))
    finally:
        faulty.control("softhsm-2").ok()
    assert "softhsm-2" in line and "CKR_DEVICE_ERROR" in line
    if function == "C_DeriveKey":  # before anything was recorded: every new object is gone
        assert "nothing was left on any HSM" in line
        assert faulty.listing()[key] == before
    else:  # the metadata write failed after every copy was checked: the version exists,
        # recorded on softhsm-1 only (proxies there may use it), and keys repair finishes it
        assert "version 2 exists on every HSM" in line and "keys repair" in line
        after = faulty.listing()[key]
        assert after["versions"] == [1, 2] and not after["consistent"]
        assert after["hsms"]["softhsm-2"]["unrecorded"] == [2], after
        done = ok(faulty.config, "keys", "repair", key)["repaired"]
        assert done == ["recorded version 2 on softhsm-2, as on the others"]
        assert faulty.listing()[key]["consistent"]
    # The key's state survives either way: still disabled on both.
    assert [faulty.listing()[key]["hsms"][n]["keyStatus"] for n in faulty.names] == [
        "DISABLED",
        "DISABLED",
    ]


def test_a_proxy_with_an_older_view_decrypts_a_newer_version(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two proxies on one HSM, the first caching the key for 60 s: after a rotation the second
    (just started) encrypts with version 2, and the first, still on its view of version 1,
    decrypts that ciphertext rather than calling it invalid."""
    rig = make_rig(
        tmp_path_factory.mktemp("views"), settings={"hsms": {"key_cache_ttl_seconds": 60}}
    )
    logs = tmp_path_factory.mktemp("views-logs")
    first = start_server(rig.config, rig.port, logs / "first.log")
    try:
        a = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        for _ in range(10):  # both workers cache version 1
            assert cm_version(encrypt(a, "foo")) == 1
        ok(rig.config, "keys", "rotate", "foo")
        second_cfg = rig.variant("second")
        port2, _ = ports_of(second_cfg)
        second = start_server(second_cfg, port2, logs / "second.log")
        try:
            b = XksClient("127.0.0.1", port2, rig.prefix, rig.akid, rig.secret, rig.region)
            newer = encrypt(b, "foo")
            assert cm_version(newer) == 2
        finally:
            stop_server(second)
        assert cm_version(encrypt(a, "foo")) == 1  # the first proxy's view is still version 1
        for _ in range(10):  # on either worker
            resp = a.decrypt("foo", **decrypt_fields(newer))
            assert resp.status == 200, resp.body
    finally:
        stop_server(first)


@pytest.mark.parametrize("key", ["xksproxy-import", "xksproxy-transport", "xksproxy-mine"])
def test_ids_of_the_proxys_own_objects_are_refused(rig1: Rig, key: str) -> None:
    before = state_of(rig1.config)
    line = assert_one_line_failure(run(rig1.config, "keys", "create", key))
    assert "xksproxy-" in line
    assert state_of(rig1.config) == before


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MultiRig, Server]]:
    """Two HSMs behind the fault shim and a running proxy (keys looked up every 0.5 s)."""
    directory = tmp_path_factory.mktemp("cut")
    settings = {"hsms": {"key_cache_ttl_seconds": 0.5}}
    rig = make_multi_rig(directory / "rig", 2, "--fault-injection", settings=settings)
    srv = start_server(rig.config, rig.port, directory / "proxy.log")
    yield rig, srv
    stop_server(srv)


def _client(rig: MultiRig, srv: Server) -> XksClient:
    kms = json.loads((rig.dir / "kms-xks-config.json").read_text())
    return XksClient.from_kms(kms, srv.port)


def _killed_at(
    rig: MultiRig, function: str, key: str, reached: Callable[[], bool], command: str = "rotate"
) -> None:
    """Run `keys COMMAND KEY`, hold it inside *function* on softhsm-2 until *reached* holds,
    then kill it with SIGKILL: a command cut short at that write."""
    control = rig.control("softhsm-2")
    control.hang([function])
    proc = subprocess.Popen(
        [sys.executable, "-m", "xksproxy", "keys", command, key, "-c", str(rig.config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 60
        while not reached():
            assert proc.poll() is None, f"the {command} ended before the cut"
            assert time.monotonic() < end, f"the {command} never reached {function}"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
        control.ok()


def _versions_on(rig: MultiRig, key: str, hsm: str) -> list[int]:
    proc = run(rig.only(hsm), "keys", "show", key, "--json")
    assert proc.returncode == 0, proc.stderr
    return [v["version"] for v in json.loads(proc.stdout)["versions"]]


def _whole_and_serving(
    rig: MultiRig, client: XksClient, key: str, olds: list[dict[str, Any]]
) -> None:
    """The key alike on every HSM with versions 1 and 2, and served with 2 on both workers."""
    listed = listed_key(rig.config, key)
    assert listed["consistent"] and listed["versions"] == [1, 2], listed
    seen(lambda: cm_version(encrypt(client, key)) == 2)
    assert _served(client, key, olds) == {2}


def _served(client: XksClient, key: str, olds: list[dict[str, Any]]) -> set[int]:
    """The versions the proxy encrypts with for 2 s, each ciphertext decrypted (by either HSM),
    and every older ciphertext still decrypting."""
    versions: set[int] = set()
    end = time.monotonic() + 2
    while time.monotonic() < end:
        enc = encrypt(client, key)
        versions.add(cm_version(enc))
        assert client.decrypt(key, **decrypt_fields(enc)).status == 200
    for enc in olds:
        assert client.decrypt(key, **decrypt_fields(enc)).status == 200
    return versions


def test_a_rotation_killed_before_every_hsm_has_the_version_never_serves_it(
    cut: tuple[MultiRig, Server],
) -> None:
    rig, srv = cut
    client = _client(rig, srv)
    rig.create("cut-a")
    olds = [encrypt(client, "cut-a")]
    # Killed while storing on softhsm-2: softhsm-1 holds version 2, softhsm-2 does not.
    _killed_at(
        rig, "C_DeriveKey", "cut-a", lambda: _versions_on(rig, "cut-a", "softhsm-1") == [2, 1]
    )
    assert _versions_on(rig, "cut-a", "softhsm-2") == [1]
    assert _served(client, "cut-a", olds) == {1}  # before: version 2, from softhsm-1 alone
    listed = listed_key(rig.config, "cut-a")
    assert any(p.startswith("unfinished on softhsm-1: version 2") for p in listed["problems"])
    again = run(rig.config, "keys", "rotate", "cut-a")  # the re-run finishes the job
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["version"] == 2 and "removed version 2" in again.stderr
    _whole_and_serving(rig, client, "cut-a", olds)


def test_a_rotation_killed_between_the_records_is_finished_by_repair(
    cut: tuple[MultiRig, Server],
) -> None:
    rig, srv = cut
    client = _client(rig, srv)
    rig.create("cut-b")
    olds = [encrypt(client, "cut-b")]

    def recorded_on_first() -> bool:
        view = json.loads(run(rig.only("softhsm-1"), "keys", "show", "cut-b", "--json").stdout)
        return bool(view["currentVersion"] == 2)

    # Killed writing softhsm-2's record: both hold version 2, only softhsm-1 records it.
    _killed_at(rig, "C_CreateObject", "cut-b", recorded_on_first)
    assert _versions_on(rig, "cut-b", "softhsm-2") == [2, 1]
    olds.append(encrypt(client, "cut-b"))
    assert _served(client, "cut-b", olds) <= {1, 2}  # either HSM decrypts either version
    out = ok(rig.config, "keys", "repair", "cut-b")
    assert out["repaired"] == ["recorded version 2 on softhsm-2, as on the others"]
    _whole_and_serving(rig, client, "cut-b", olds)
    assert ok(rig.config, "keys", "repair", "cut-b")["repaired"] == []


def test_repair_keeps_the_copy_the_other_hsms_hold(cut: tuple[MultiRig, Server]) -> None:
    """Version 2 held twice on softhsm-1 (the second of other material): softhsm-2's copy says
    which is right; until the repair the proxy serves the key without that object."""
    rig, srv = cut
    client = _client(rig, srv)
    rig.create("dup2")
    ok(rig.config, "keys", "rotate", "dup2")
    seen(lambda: cm_version(encrypt(client, "dup2")) == 2)
    olds = [encrypt(client, "dup2")]
    hsm_tool("duplicate", str(rig.config), "softhsm-1", "dup2", "2")
    assert _served(client, "dup2", olds) <= {1, 2}  # softhsm-2 serves version 2 on
    out = ok(rig.config, "keys", "repair", "dup2")
    (line,) = out["repaired"]
    assert line.startswith("version 2 on softhsm-1: kept the object with KCV E:"), line
    _whole_and_serving(rig, client, "dup2", olds)


def test_a_create_killed_half_way_is_never_served_and_a_rerun_finishes_it(
    cut: tuple[MultiRig, Server],
) -> None:
    rig, srv = cut
    client = _client(rig, srv)

    def on_first() -> bool:
        objs = hsm_tool("objects", str(rig.config), "softhsm-1", "half").stdout
        return "SECRET_KEY" in objs

    # Killed while storing on softhsm-2: softhsm-1 holds version 1, no HSM its metadata.
    _killed_at(rig, "C_DeriveKey", "half", on_first, command="create")
    assert client.metadata("half").error_name == "KeyNotFoundException"  # KMS cannot adopt it
    listed = listed_key(rig.config, "half")
    assert any("unfinished keys create" in p for p in listed["problems"]), listed
    checked = run(rig.config, "check")
    assert checked.returncode == 1 and "key half: an unfinished keys create" in checked.stdout
    again = run(rig.config, "keys", "create", "half")
    assert again.returncode == 0, again.stderr
    assert "of an unfinished create from softhsm-1" in again.stderr
    listed = listed_key(rig.config, "half")
    assert listed["consistent"] and listed["versions"] == [1], listed
    seen(lambda: client.metadata("half").status == 200)
    assert _served(client, "half", [encrypt(client, "half")]) == {1}
