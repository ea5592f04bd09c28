"""Rotating the SigV4 credential and the TLS certificate under load loses no request.

A real proxy (2 workers, TLS) serves Encrypt from four client threads, each on its own
keep-alive connection and also opening new ones, while the operator's procedure runs: a new
certificate and key written over the old files and SIGHUP; a new credential added, SIGHUP, the
clients moved to it, the old credential removed, SIGHUP (docs/operations/credentials.md).  Every
request must be answered 200.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import b64
from tests.support.commands import xksproxy
from tests.support.proxies import stop_server
from tests.support.tls import TlsRig, make_cert
from tests.support.xks_client import key_meta, sign


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRig]:
    tls = TlsRig(tmp_path_factory.mktemp("reload-load"), "ecdsa")
    yield tls
    stop_server(tls.server)


class Load:
    """Client threads sending Encrypt until stopped; each result counted."""

    def __init__(self, rig: TlsRig, cafile: Path) -> None:
        self.rig = rig
        self.ctx = ssl.create_default_context(cafile=str(cafile))
        self.credential = (rig.rig.akid, rig.rig.secret)
        self.results: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(4)]

    def request(self, conn: http.client.HTTPSConnection) -> str:
        path = "/example/xks/kms/xks/v1/keys/foo/encrypt"
        url = f"https://127.0.0.1:{self.rig.port}{path}"
        body = json.dumps(
            {
                "requestMetadata": key_meta("Encrypt"),
                "plaintext": b64(b"rotate me"),
                "encryptionAlgorithm": "AES_GCM",
            }
        ).encode()
        akid, secret = self.credential
        headers = sign("POST", url, body, akid, secret, region=self.rig.rig.region)
        headers["Content-Type"] = "application/json"
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return str(response.status)

    def run(self, index: int) -> None:
        while not self.stop.is_set():
            # Half of the threads keep one connection, half open a new one every 20 requests.
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.rig.port, context=self.ctx, timeout=10
            )
            try:
                for _ in range(20 if index % 2 else 10_000):
                    if self.stop.is_set():
                        break
                    try:
                        outcome = self.request(conn)
                    except (OSError, http.client.HTTPException) as exc:
                        outcome = type(exc).__name__
                    with self.lock:
                        self.results[outcome] += 1
                    if outcome != "200":
                        break  # counted; a new connection for the next one
            finally:
                conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_credential_and_certificate_rotation_under_load_lose_no_request(
    rig: TlsRig, tmp_path: Path
) -> None:
    # Another subject: a client trusting both self-signed certificates finds each one's issuer.
    new_cert, new_key = make_cert(tmp_path, "ecdsa", name="xks-renewed.example.com")
    both = tmp_path / "both.pem"
    both.write_bytes(rig.cert.read_bytes() + new_cert.read_bytes())
    config = str(rig.rig.config)
    with Load(rig, both) as load:
        time.sleep(1.0)
        # 1. The certificate: new files over the old ones, then SIGHUP.
        shutil.copyfile(new_cert, rig.cert)
        shutil.copyfile(new_key, rig.cert.with_suffix(".key"))
        rig.server.sighup()
        time.sleep(1.0)
        # 2. The credential: add, reload, move the clients, remove the old one, reload.
        added = json.loads(
            xksproxy("credentials", "add", "-c", config, "--prefix", "example/xks").stdout
        )
        new = added["XksProxyAuthenticationCredential"]
        rig.server.sighup()
        time.sleep(0.5)
        old_akid = load.credential[0]
        load.credential = (new["AccessKeyId"], new["RawSecretAccessKey"])
        time.sleep(0.5)  # requests signed with the old credential have all been answered
        xksproxy(
            "credentials", "remove", "-c", config, "--prefix", "example/xks",
            "--access-key-id", old_akid,
        )  # fmt: skip
        rig.server.sighup()
        time.sleep(1.0)
    log = rig.server.log_text()
    assert log.count('"reload_applied"') >= 3 * rig.server.workers
    assert '"reload_rejected"' not in log
    assert set(load.results) == {"200"}, load.results
    assert load.results["200"] > 100, load.results
