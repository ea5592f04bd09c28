"""Key commands killed at their writes (strace's fault injection: SIGKILL at the N-th
``write``/``pwrite64`` of the command's process, swept over N).  SoftHSM writes an object's file
once per attribute, so the sweep leaves every kind of partial object a crash can: objects
without a value, versions on one HSM only, metadata on some HSMs only.

After each kill: listing never breaks; no HSM's copy would encrypt with a version another HSM
lacks (what a proxy encrypts with is the newest recorded version, ``versions`` less
``unrecorded``); and running the command again leaves the key whole and alike everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tests.test_multi_hsm_keys import MultiRig, make

STRIDE = 5  # every fifth write: neighbouring writes leave alike states (one attribute more)
SMALL_STRIDE = 3  # commands with few writes (schedule-deletion, purge-due)

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed (scripts/bootstrap)"
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    ports = ("--port", str(free_port()), "--metrics-port", str(free_port()))
    return make(tmp_path_factory.mktemp("kills") / "rig", 2, *ports)


def token_files(rig: MultiRig) -> dict[Path, bytes]:
    """Each SoftHSM token's own file (label, PIN hashes, flags)."""
    return {p: p.read_bytes() for p in rig.dir.glob("hsms/*/tokens/*/token.object")}


def killed(rig: MultiRig, when: int, *args: str) -> bool:
    """`xksproxy ARGS -c CONFIG`, killed at its *when*-th write; False if it finished first.
    Only the command's own process is traced (not ldconfig, which ctypes runs).

    SoftHSM rewrites its token file in place at every login (truncate, then write): a kill
    between the two leaves it empty and the whole token unreadable ("token not found").  That
    is SoftHSM's own file, which no key command writes and no production HSM keeps so; it is
    put back as it was, and only what the key command left is judged."""
    saved = token_files(rig)
    proc = subprocess.run(
        ["strace", "-qq", "-o", "/dev/null", "-e", "trace=write,pwrite64",
         "-e", f"inject=write,pwrite64:signal=KILL:when={when}",
         sys.executable, "-m", "xksproxy", *args, "-c", str(rig.config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    for path, data in saved.items():
        if path.read_bytes() != data:
            path.write_bytes(data)
    return proc.returncode != 0


def writes(rig: MultiRig, *args: str) -> int:
    """How many writes a whole run of the command makes (it runs, and is not killed)."""
    out = rig.dir / "count.txt"
    subprocess.run(
        ["strace", "-qq", "-c", "-o", str(out), "-e", "trace=write,pwrite64",
         sys.executable, "-m", "xksproxy", *args, "-c", str(rig.config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=True,
    )  # fmt: skip
    total = [
        line.split() for line in out.read_text().splitlines() if line.strip().endswith("total")
    ]
    return int(total[0][3])


def entry(rig: MultiRig, key: str) -> dict[str, Any] | None:
    """The key in `keys list --json`, which must not fail whatever a kill left."""
    proc = rig.run("keys", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    found = [k for k in json.loads(proc.stdout) if k["keyId"] == key]
    return found[0] if found else None


def assert_never_serves_a_version_an_hsm_lacks(listed: dict[str, Any] | None) -> None:
    if listed is None:
        return
    copies = {h: c for h, c in listed["hsms"].items() if c is not None and c["versions"]}
    if any("unfinished keys create" in p for p in listed["problems"]):
        return  # not served at all
    for hsm, copy in copies.items():
        recorded = set(copy["versions"]) - set(copy["unrecorded"])
        if not recorded:
            continue
        current = max(recorded)
        for other, theirs in copies.items():
            assert current in theirs["versions"], (hsm, current, other, listed)


def recorded(listed: dict[str, Any] | None, version: int) -> bool:
    """Whether some HSM's copy records *version* (so proxies may encrypt with it)."""
    copies = [] if listed is None else [c for c in listed["hsms"].values() if c is not None]
    return any(version in c["versions"] and version not in c["unrecorded"] for c in copies)


def assert_whole(listed: dict[str, Any] | None, versions: list[int]) -> None:
    assert listed is not None and listed["consistent"], listed
    assert listed["versions"] == versions, listed
    assert all(c is not None and not c["unrecorded"] for c in listed["hsms"].values()), listed


@pytest.mark.timeout(900)
def test_rotate_killed_at_every_write(rig: MultiRig) -> None:
    rig.create("twin")
    total = writes(rig, "keys", "rotate", "twin")
    assert total > 20, total  # the sweep covers a real run's writes
    cut = 0
    for when in range(1, total + 1, STRIDE):
        key = f"rot-{when}"
        rig.create(key)
        cut += killed(rig, when, "keys", "rotate", key)
        left = entry(rig, key)
        assert_never_serves_a_version_an_hsm_lacks(left)
        again = rig.run("keys", "rotate", key)
        assert again.returncode == 0, (when, again.stderr)
        # Version 2 recorded on some HSM may be in use: the re-run records it on the others
        # and rotates to 3; recorded nowhere, it never served and is made again.
        assert_whole(entry(rig, key), [1, 2, 3] if recorded(left, 2) else [1, 2])
    assert cut >= (total // STRIDE) - 2, cut  # (the last writes are the report's)


@pytest.mark.timeout(900)
def test_create_killed_at_every_write(rig: MultiRig) -> None:
    total = writes(rig, "keys", "create", "twin-create")
    assert total > 10, total
    for when in range(1, total + 1, STRIDE):
        key = f"new-{when}"
        killed(rig, when, "keys", "create", key)
        assert_never_serves_a_version_an_hsm_lacks(entry(rig, key))
        again = rig.run("keys", "create", key)
        if again.returncode != 0:  # the kill came after the key was whole
            assert "already exists" in again.stderr, (when, again.stderr)
        assert_whole(entry(rig, key), [1])


def statuses(listed: dict[str, Any] | None) -> set[str]:
    copies = [] if listed is None else [c for c in listed["hsms"].values() if c is not None]
    return {c["keyStatus"] for c in copies}


@pytest.mark.timeout(900)
def test_schedule_deletion_killed_at_every_write(rig: MultiRig) -> None:
    rig.create("twin-doomed")
    total = writes(rig, "keys", "schedule-deletion", "twin-doomed", "--days", "7")
    assert total > 4, total
    for when in range(1, total + 1, SMALL_STRIDE):
        key = f"doomed-{when}"
        rig.create(key)
        killed(rig, when, "keys", "schedule-deletion", key, "--days", "7")
        assert entry(rig, key) is not None  # listed, whatever was written
        again = rig.run("keys", "schedule-deletion", key, "--days", "7")
        if again.returncode != 0:  # the kill came after every copy was pending
            assert "already pending deletion" in again.stderr, (when, again.stderr)
        listed = entry(rig, key)
        assert listed is not None and listed["consistent"], (when, listed)
        assert statuses(listed) == {"PENDING_DELETION"}, (when, listed)


def scheduled_8_days_ago(rig: MultiRig, key: str) -> None:
    """Schedule *key*'s deletion on a clock 8 days back: due now (purge-due runs on the real
    clock, under strace; faketime would fork a child strace does not follow)."""
    done = subprocess.run(
        ["faketime", "-8 days", sys.executable, "-m", "xksproxy", "keys", "schedule-deletion",
         key, "--days", "7", "-c", str(rig.config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed")
def test_purge_due_killed_at_every_write(tmp_path: Path) -> None:
    ports = ("--port", str(free_port()), "--metrics-port", str(free_port()))
    rig = make(tmp_path / "rig", 2, *ports)  # its own: no other test's key is due here
    rig.create("twin-purged")
    scheduled_8_days_ago(rig, "twin-purged")
    total = writes(rig, "keys", "purge-due")  # purges the twin
    assert total > 4, total
    for when in range(1, total + 1, SMALL_STRIDE):
        key = f"purged-{when}"
        rig.create(key)
        scheduled_8_days_ago(rig, key)
        killed(rig, when, "keys", "purge-due")
        entry(rig, key)  # listing never breaks
        again = rig.run("keys", "purge-due")
        assert again.returncode == 0, (when, again.stderr)
        assert entry(rig, key) is None, when  # gone from every HSM
