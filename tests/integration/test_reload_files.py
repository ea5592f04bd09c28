"""Files a reload reads that are no files to read: a FIFO, a device, a file too big.  Each
rejects the reload (the old state is kept) without holding the event loop: requests are served
while the reload is refused (a real two-worker proxy, SIGHUP)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.support.configs import edit_config
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import XksClient

ALLOW_ALL = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}  # fmt: skip


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    rig = make_rig(tmp_path_factory.mktemp("reload-files"))
    (rig.dir / "policy.json").write_text(json.dumps(ALLOW_ALL))
    edit_config(rig.config, {"prefixes": {rig.prefix: {"policy_file": "policy.json"}}})
    return rig


@pytest.fixture(scope="module")
def server(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(rig.config, rig.port, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield srv
    stop_server(srv)


def rejected_after_sighup(server: Server, client: XksClient) -> list[str]:
    """SIGHUP; while the workers reload, requests are answered; the reload's problems."""
    offset = len(server.log_text())
    started = time.monotonic()
    server.sighup()  # returns once every worker logged reload_applied or reload_rejected
    took = time.monotonic() - started
    assert client.health().status == 200
    lines = [json.loads(line) for line in server.log_text()[offset:].splitlines()
             if '"reload_rejected"' in line]  # fmt: skip
    assert len(lines) == server.workers, server.log_text()[offset:]
    assert took < 5, took
    problems: list[str] = lines[0]["problems"]
    return problems


@pytest.mark.parametrize("kind", ["fifo", "device", "too big"])
def test_a_policy_file_that_is_no_file_rejects_the_reload(
    rig: Rig, server: Server, kind: str
) -> None:
    client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
    policy = rig.dir / "policy.json"
    saved = policy.read_bytes()
    policy.unlink()
    try:
        if kind == "fifo":
            os.mkfifo(policy)  # opened the old way, it blocked every worker's loop for good
        elif kind == "device":
            policy.symlink_to("/dev/zero")  # read the old way: 5 s per worker, then MemoryError
        else:
            policy.write_bytes(b" " * (2 << 20) + saved)
        problems = rejected_after_sighup(server, client)
        expected = {"fifo": "is not a regular file", "device": "is not a regular file",
                    "too big": "is larger than"}[kind]  # fmt: skip
        assert any(expected in p for p in problems), problems
    finally:
        policy.unlink()
        policy.write_bytes(saved)
        offset = len(server.log_text())
        server.sighup()
    assert server.log_text()[offset:].count('"reload_applied"') == server.workers
