"""A full log disk (a real tmpfs filled up): the proxy fails closed and visibly (every request
500 in the specification's JSON, /ping 503, xks_log_writable 0, no traceback) and recovers by
itself, with no restart, once there is room again."""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import b64
from tests.support.commands import xksproxy
from tests.support.configs import edit_config
from tests.support.disks import fill, small_tmpfs
from tests.support.files import write_secret
from tests.support.metrics import scrape, value
from tests.support.proxies import spawn_proxy
from tests.support.rigs import make_rig
from tests.support.waiting import until, until_in
from tests.support.xks_client import XksClient


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "logs"
    mount.mkdir()
    with small_tmpfs(mount, "512k"):
        yield mount


def ping(port: int) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_log_disk_fails_closed_visibly_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    rig = make_rig(tmp_path / "rig", settings={"server": {"workers": 1}})
    log, errors = small_disk / "proxy.log", tmp_path / "stderr.txt"
    proc = spawn_proxy(rig.config, log, stderr=errors)
    try:
        until_in(log, '"listening"')
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        metrics = rig.metrics_port
        assert client.encrypt("foo", plaintext=b64(b"before")).status == 200

        filler = small_disk / "filler"
        fill(filler)
        # The log's last page may still hold a few lines: the first refusal comes within a page.
        for _ in range(100):
            first = client.encrypt("foo", plaintext=b64(b"during"))
            if first.status != 200:
                break
        assert first.status == 500
        assert first.headers["content-type"].startswith("application/json")
        assert first.json == {
            "errorName": "InternalException",
            "errorMessage": "the audit log cannot be written",
        }
        assert b"ciphertext" not in first.body  # the answer is withheld, not sent unaudited
        assert client.health().status == 500  # health too: it cannot be audited either
        assert ping(rig.port) == (503, {"status": "audit log not writable"})
        until(lambda: value(scrape(metrics)[2], "xks_log_writable") == 0, "xks_log_writable 0")

        os.unlink(filler)  # room again: the proxy finds out by itself
        until(lambda: ping(rig.port)[0] == 200, "/ping 200 again")
        assert client.encrypt("foo", plaintext=b64(b"after")).status == 200
        samples = scrape(metrics)[2]
        assert value(samples, "xks_log_writable") == 1
        assert value(samples, "xks_log_lines_lost_total") >= 1
        text = log.read_text(errors="replace")
        (again,) = [json.loads(line) for line in text.splitlines() if "log_writable_again" in line]
        assert again["lines_lost"] >= 1
        # Every whole line is JSON: a line the full disk tore is ended before the next one.
        tail = text[text.index('"log_writable_again"') :].splitlines()[1:]
        assert all(json.loads(line) for line in tail if line)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in errors.read_text()


def test_with_an_audit_chain_the_lost_line_is_said_and_the_log_still_verifies(
    small_disk: Path, tmp_path: Path
) -> None:
    """The chained line a full disk refused (its request got 500) is named by the proxy's
    chained recovery line; `audit verify` reports it as a note and the chain as intact.
    A removal of a genuine line still fails."""
    rig = make_rig(tmp_path / "rig")
    key = write_secret(rig.dir / "secrets" / "audit-key", secrets.token_hex(32))
    chained = {"server": {"workers": 1}, "logging": {"audit_chain_key_file": "secrets/audit-key"}}
    edit_config(rig.config, chained)
    log, errors = small_disk / "proxy.log", tmp_path / "stderr.txt"
    proc = spawn_proxy(rig.config, log, stderr=errors)
    try:
        until_in(log, '"listening"')
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        assert client.encrypt("foo", plaintext=b64(b"before")).status == 200
        filler = small_disk / "filler"
        fill(filler)
        for _ in range(100):
            if client.encrypt("foo", plaintext=b64(b"during")).status == 500:
                break
        else:
            raise AssertionError("the full disk was never felt")
        os.unlink(filler)
        until(lambda: ping(rig.port)[0] == 200, "/ping 200 again")
        assert client.encrypt("foo", plaintext=b64(b"after")).status == 200
    finally:
        proc.terminate()
        proc.wait(30)
    verify = ["audit", "verify", "--key-file", str(key), "--require-closed"]
    done = xksproxy(*verify, str(log), check=False)
    assert done.returncode == 0, done.stderr
    assert "was not written" in done.stderr and "intact" in done.stdout
    (again,) = [json.loads(x) for x in log.read_text().splitlines() if "log_writable_again" in x]
    assert again["chain_lost"] == again["seq"] - 1 and "chain" in again
    # Without the recovery line the gap is unexplained (and a torn write, if the disk tore
    # one, is a broken audit line): either is reported.
    lines = log.read_bytes().splitlines()
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"\n".join(x for x in lines if b"log_writable_again" not in x) + b"\n")
    done = xksproxy(*verify, str(cut), check=False)
    assert done.returncode == 1, done.stderr
    assert ": removed: " in done.stderr or ": altered: " in done.stderr, done.stderr
