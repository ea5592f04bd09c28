"""An HSM whose token is lost and then restored from backup comes back by itself: while it is
UNAVAILABLE the proxy reopens it on a schedule (a real proxy on a SoftHSM rig whose token
directory is moved away and back)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.support.api import b64
from tests.support.proxies import start_server, stop_server
from tests.support.rigs import make_rig
from tests.support.waiting import until
from tests.support.xks_client import XksClient


def state(client: XksClient) -> str:
    resp = client.health()
    if resp.status != 200:
        return f"HTTP {resp.status}"
    value: str = resp.json["ekmFleetDetails"][0]["healthStatus"]
    return value


def test_a_token_restored_from_backup_is_served_again_without_a_restart(tmp_path: Path) -> None:
    health = {"interval_seconds": 0.5, "reopen_unavailable_after_seconds": 2}
    rig = make_rig(tmp_path / "rig", settings={"health": health, "server": {"workers": 1}})
    tokens = rig.dir / "tokens"
    (token,) = list(tokens.iterdir())
    backup = tmp_path / "backup"
    shutil.copytree(token, backup)
    srv = start_server(rig.config, rig.port, tmp_path / "proxy.log")
    try:
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        assert client.encrypt("foo", plaintext=b64(b"x")).status == 200
        shutil.rmtree(token)  # the token is lost
        until(lambda: state(client) == "UNAVAILABLE", "UNAVAILABLE after the loss", 30)
        time.sleep(3)  # unavailable past reopen_unavailable_after_seconds: reopens start
        shutil.copytree(backup, token)  # ... and restored from backup
        until(lambda: state(client) == "ACTIVE", "ACTIVE after the restore", 60)
        assert client.encrypt("foo", plaintext=b64(b"x")).status == 200
        log = srv.log_text()
        # Reopened because its token no longer showed the health key, or for being UNAVAILABLE
        # so long: which of the two comes first depends on when the loss is first seen.
        assert '"hsm_reopen"' in log
    finally:
        stop_server(srv)
