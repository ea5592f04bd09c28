"""Key commands killed at their writes (strace's fault injection: SIGKILL at the N-th
``write``/``pwrite64`` of the command's process, swept over N).  SoftHSM writes an object's file
once per attribute, so the sweep leaves every kind of partial object a crash can: objects
without a value, versions on one HSM only, metadata on some HSMs only.

After each kill: listing never breaks; no HSM's copy would encrypt with a version another HSM
lacks (what a proxy encrypts with is the newest recorded version, ``versions`` less
``unrecorded``); and running the command again leaves the key whole and alike everywhere."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.byok import ByokRig, wrap_with_cryptography
from tests.support.disks import fill, small_tmpfs
from tests.support.paths import ROOT
from tests.support.rigs import MultiRig, make_multi_rig

# One write in STRIDE, so that the suite stays within CI's time (about 7 minutes here); the
# random phase below covers every write over successive runs.
STRIDE = 8  # neighbouring writes leave alike states (one attribute more)
SMALL_STRIDE = 5  # commands with few writes (schedule-deletion, purge-due)
WIDE_STRIDE = 13  # replicate: many writes, each point costs 6 processes
IMPORT_STRIDE = 19  # import: as many writes, and import-params makes an RSA-3072 key each time
# Which write of each stride is killed: random per run, so that successive runs cover every
# write while each stays within CI's time.  A failure names its write (``when``);
# XKS_KILL_PHASE=<when - 1> repeats it.  XKS_KILL_STRIDE=1 kills at every write (a long run).
PHASE = int(os.environ.get("XKS_KILL_PHASE", random.randrange(1 << 16)))
FULL = os.environ.get("XKS_KILL_STRIDE") == "1"


def points(total: int, stride: int) -> range:
    """The writes to kill at, of *total*: one per *stride*, from this run's phase."""
    if FULL:
        return range(1, total + 1)
    return range(1 + PHASE % stride, total + 1, stride)


pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed (scripts/bootstrap)"
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("kills") / "rig", 2)


def token_files(rig: MultiRig) -> dict[Path, bytes]:
    """Each SoftHSM token's own file (label, PIN hashes, flags)."""
    found = [*rig.dir.glob("hsms/*/tokens/*/token.object"), *rig.dir.glob("tokens/*/token.object")]
    assert found, rig.dir  # (a rig of one HSM keeps its token in tokens/, of several in hsms/)
    return {p: p.read_bytes() for p in found}


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
    for when in points(total, STRIDE):
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
    for when in points(total, STRIDE):
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
    for when in points(total, SMALL_STRIDE):
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
    rig = make_multi_rig(tmp_path / "rig", 2)  # its own: no other test's key is due here
    rig.create("twin-purged")
    scheduled_8_days_ago(rig, "twin-purged")
    total = writes(rig, "keys", "purge-due")  # purges the twin
    assert total > 4, total
    for when in points(total, SMALL_STRIDE):
        key = f"purged-{when}"
        rig.create(key)
        scheduled_8_days_ago(rig, key)
        killed(rig, when, "keys", "purge-due")
        entry(rig, key)  # listing never breaks
        again = rig.run("keys", "purge-due")
        assert again.returncode == 0, (when, again.stderr)
        assert entry(rig, key) is None, when  # gone from every HSM


@pytest.fixture(scope="module")
def rig1(tmp_path_factory: pytest.TempPathFactory) -> MultiRig:
    return make_multi_rig(tmp_path_factory.mktemp("kills1") / "rig", 1)


@pytest.mark.timeout(900)
def test_create_on_one_hsm_killed_at_every_write(rig1: MultiRig) -> None:
    total = writes(rig1, "keys", "create", "solo-create")
    assert total > 5, total
    repaired = 0
    for when in points(total, SMALL_STRIDE):
        key = f"solo-{when}"
        killed(rig1, when, "keys", "create", key)
        left = entry(rig1, key)  # listing never breaks
        if left is not None and left["keyStatus"] == "CREATING":  # shown, with its remedy
            assert any("keys create again finishes it" in p for p in left["problems"]), left
            # keys repair removes what never served; keys create then makes the key anew
            done = rig1.run("keys", "repair", key)
            assert done.returncode == 0 and "unfinished create" in done.stdout, done.stderr
            assert entry(rig1, key) is None
            repaired += 1
        again = rig1.run("keys", "create", key)
        if again.returncode != 0:
            assert "already exists" in again.stderr, (when, again.stderr)
        assert_whole(entry(rig1, key), [1])
    assert repaired > 0  # the sweep met a create cut short after its first record


def assert_target_serves_only_the_sources_versions(
    listed: dict[str, Any] | None, source: str, target: str
) -> None:
    """A copy cut short may lack versions (the target had none of the key before), but what it
    would encrypt with is a version the source holds, with the source's material."""
    assert listed is not None
    theirs, ours = listed["hsms"][source], listed["hsms"][target]
    if ours is None or not set(ours["versions"]) - set(ours["unrecorded"]):
        return
    current = str(max(set(ours["versions"]) - set(ours["unrecorded"])))
    assert ours["kcv"][current] == theirs["kcv"][current], listed


@pytest.mark.timeout(900)
def test_replicate_killed_at_every_write(rig: MultiRig) -> None:
    """A key with two versions on the first HSM only, copied to the second."""
    one = rig.only(rig.names[0])
    copy = ("keys", "replicate", "--from", rig.names[0], "--to", rig.names[1])

    def on_first_only(key: str) -> None:
        assert rig.run("keys", "create", key, config=one).returncode == 0
        assert rig.run("keys", "rotate", key, config=one).returncode == 0

    on_first_only("twin-copied")
    total = writes(rig, *copy, "twin-copied")
    assert total > 10, total
    for when in points(total, WIDE_STRIDE):
        key = f"copied-{when}"
        on_first_only(key)
        killed(rig, when, *copy, key)
        assert_target_serves_only_the_sources_versions(entry(rig, key), *rig.names)
        again = rig.run(*copy, key)
        assert again.returncode == 0, (when, again.stderr)
        assert_whole(entry(rig, key), [1, 2])


@pytest.mark.timeout(900)
def test_import_killed_at_every_write(rig: MultiRig, tmp_path: Path) -> None:
    """An imported second version; the re-run uses the same token and wrapped material."""
    byok = ByokRig(rig, {})

    def prepared(key: str) -> Path:
        rig.create(key)
        out = tmp_path / key
        byok.params(key, out, "RSAES_OAEP_SHA_1")
        wrap_with_cryptography(out, "RSAES_OAEP_SHA_1", os.urandom(32))
        return out

    total = writes(rig, *import_args("twin-imported", prepared("twin-imported")))
    assert total > 10, total
    for when in points(total, IMPORT_STRIDE):
        key = f"imported-{when}"
        out = prepared(key)
        killed(rig, when, *import_args(key, out))
        assert_never_serves_a_version_an_hsm_lacks(entry(rig, key))
        again = rig.run(*import_args(key, out))
        if again.returncode != 0:  # the kill came after the token was used up
            assert f"already used: it made version 2 of '{key}'" in again.stderr, again.stderr
        assert_whole(entry(rig, key), [1, 2])


def import_args(key: str, out: Path) -> tuple[str, ...]:
    return (
        "keys", "import", key, "--wrapped-key-material", str(out / "EncryptedKeyMaterial.bin"),
        "--import-token", str(out / "ImportToken.bin"),
    )  # fmt: skip


@pytest.fixture
def full_token_disk(tmp_path: Path) -> Iterator[tuple[MultiRig, Path]]:
    """A 2-HSM rig whose second HSM keeps its token on a small tmpfs; yields the rig and a
    file that fills that file system (delete it to make room)."""
    rig = make_multi_rig(tmp_path / "rig", 2)
    rig.create("full")
    tokens = rig.dir / "hsms" / rig.names[1] / "tokens"
    saved = tmp_path / "saved-tokens"
    shutil.copytree(tokens, saved)
    with small_tmpfs(tokens, "1m"):
        shutil.copytree(saved, tokens, dirs_exist_ok=True)
        yield rig, tokens / "filler"


def test_rotate_on_a_full_token_disk_serves_nothing_new_and_finishes_later(
    full_token_disk: tuple[MultiRig, Path],
) -> None:
    rig, filler = full_token_disk
    fill(filler)
    failed = rig.run("keys", "rotate", "full")
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1, failed.stderr
    assert rig.names[1] in failed.stderr, failed.stderr
    listed = entry(rig, "full")
    assert "nothing was left on any HSM" in failed.stderr, failed.stderr
    assert_whole(listed, [1])  # version 2 rolled back on the first HSM too: nothing serves it
    filler.unlink()
    again = rig.run("keys", "rotate", "full")
    assert again.returncode == 0, again.stderr
    assert_whole(entry(rig, "full"), [1, 2])
