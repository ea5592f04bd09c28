"""Mutual TLS against a real proxy (2 workers): the right client certificate is served, every
wrong one fails the handshake, in TLS 1.2 and 1.3; SIGHUP changes the CA and the name.

Certificates are made here (xksproxy.http.certs); none comes from outside the test.
"""

from __future__ import annotations

import datetime
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.configs import edit_config
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, dev_rig, make_rig
from tests.support.tls import signed_health
from tests.support.xks_client import health_meta, sign
from xksproxy.http.certs import Authority

KMS_NAME = "cks.kms.us-east-1.amazonaws.com"
HEALTH = "/example/xks/kms/xks/v1/health"
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@dataclass
class Certs:
    dir: Path
    server_ca: Authority
    client_ca: Authority
    server: tuple[Path, Path]
    client_ca_file: Path

    def client(self, stem: str) -> tuple[Path, Path]:
        return self.dir / f"{stem}.crt", self.dir / f"{stem}.key"


def make_certs(directory: Path) -> Certs:
    server_ca = Authority.create("test server CA")
    client_ca = Authority.create("test client CA")
    other_ca = Authority.create("some other CA")
    server = server_ca.issue(
        directory, "server", "xks.example.com", ip_addresses=("127.0.0.1",), valid=None
    )
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    client_ca.issue(directory, "good", KMS_NAME)
    client_ca.issue(directory, "partner", "xks-client.example.com")
    client_ca.issue(directory, "cn-only", KMS_NAME, dns_names=[])
    client_ca.issue(directory, "wrong-name", "cks.kms.eu-west-1.amazonaws.com")
    client_ca.issue(directory, "wildcard", "*.kms.us-east-1.amazonaws.com")
    client_ca.issue(directory, "cn-right-san-wrong", KMS_NAME, dns_names=["evil.example.com"])
    client_ca.issue(directory, "expired", KMS_NAME, valid=(now - 3 * day, now - day))
    client_ca.issue(directory, "not-yet-valid", KMS_NAME, valid=(now + day, now + 3 * day))
    other_ca.issue(directory, "other-ca", KMS_NAME)
    client_ca.issue(directory, "server-only", KMS_NAME, server_only=True)
    Authority.create(KMS_NAME, ca=False).write(directory, "self-signed")
    ca_file = directory / "client-ca.pem"
    ca_file.write_bytes(client_ca.pem)
    return Certs(directory, server_ca, client_ca, server, ca_file)


class MtlsRig:
    def __init__(self, directory: Path, name: str = KMS_NAME) -> None:
        self.certs = make_certs(directory)
        cert, key = self.certs.server
        tls = {
            "cert_file": str(cert),
            "key_file": str(key),
            "client_ca_file": str(self.certs.client_ca_file),
            "client_subject_name": name,
        }
        self.rig: Rig = make_rig(directory / "rig", settings={"server": {"tls": tls}})
        self.port = self.rig.port
        self.server: Server = start_server(self.rig.config, self.port, directory / "proxy.log")

    def context(
        self, client: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.certs.server_ca.pem.decode())
        ctx.minimum_version = ctx.maximum_version = version
        if client is not None:
            ctx.load_cert_chain(*self.certs.client(client))
        return ctx

    def health(self, ctx: ssl.SSLContext) -> int:
        return signed_health(self.rig, self.port, ctx)

    def refused(self, ctx: ssl.SSLContext) -> str:
        """Connect, handshake and read: the stage that failed.  The server aborts the handshake
        when it checks the client's certificate; in TLS 1.2 the client is still in its own
        handshake then, in TLS 1.3 it has finished its side and learns it at its first read.
        (asyncio closes without sending the alert OpenSSL makes, so the client sees EOF.)"""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        stage = "handshake"
        with raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="xks.example.com") as tls:
                    stage = "read"
                    tls.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                    data = tls.recv(1024)
            except (ssl.SSLError, ConnectionError):
                return stage
        if data == b"":  # closed: no HTTP answer
            return stage
        raise AssertionError(f"the server answered: {data[:80]!r}")

    def rejections(self, kind: str) -> int:
        return sum(
            1
            for line in self.server.log_text().splitlines()
            if '"tls_client_rejected"' in line and json.loads(line)["kind"] == kind
        )


@pytest.fixture(scope="module")
def mtls_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsRig]:
    rig = MtlsRig(tmp_path_factory.mktemp("mtls"))
    yield rig
    stop_server(rig.server)


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("client", ["good", "cn-only"])
def test_the_right_client_certificate_is_served(
    mtls_rig: MtlsRig, client: str, version: ssl.TLSVersion
) -> None:
    assert mtls_rig.health(mtls_rig.context(client, version)) == 200


REJECTS = {
    "wrong-name": "name",
    "wildcard": "name",
    "cn-right-san-wrong": "name",
    "other-ca": "untrusted",
    "self-signed": "untrusted",
    "expired": "expired",
    "not-yet-valid": "expired",
    "server-only": "purpose",  # extendedKeyUsage without clientAuth
}


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("client", sorted(REJECTS))
def test_a_wrong_client_certificate_fails_the_handshake(
    mtls_rig: MtlsRig, client: str, version: ssl.TLSVersion
) -> None:
    kind = REJECTS[client]
    before = mtls_rig.rejections(kind)
    stage = mtls_rig.refused(mtls_rig.context(client, version))
    assert stage == ("handshake" if version == ssl.TLSVersion.TLSv1_2 else "read")
    assert mtls_rig.rejections(kind) == before + 1  # logged once, with its kind


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
def test_no_client_certificate_fails_the_handshake(
    mtls_rig: MtlsRig, version: ssl.TLSVersion
) -> None:
    mtls_rig.refused(mtls_rig.context(None, version))


def test_rejections_are_counted(mtls_rig: MtlsRig) -> None:
    mtls_rig.refused(mtls_rig.context("wrong-name"))
    url = f"http://127.0.0.1:{mtls_rig.rig.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    (line,) = [
        ln
        for ln in text.splitlines()
        if ln.startswith('xks_tls_client_rejected_total{kind="name"}')
    ]
    assert float(line.split()[-1]) >= 1


def test_no_session_resumption(mtls_rig: MtlsRig) -> None:
    """A resumed session would skip the client certificate check: every connection is a full
    handshake (TLS 1.2 tickets and session ids, TLS 1.3 tickets).  Eight connections each, each
    offering the last one's session: with two workers, some land on the worker that made it
    (with OpenSSL's defaults those resume)."""
    for version in VERSIONS:
        ctx = mtls_rig.context("good", version)
        session = None
        for _ in range(8):
            raw = socket.create_connection(("127.0.0.1", mtls_rig.port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="xks.example.com", session=session) as tls:
                tls.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert tls.recv(64).startswith(b"HTTP/1.1 200")
                assert not tls.session_reused
                session = tls.session
                # TLS 1.3: one ticket still comes (see mtls.require_client), though useless.
                assert session is not None
                assert session.has_ticket == (version == ssl.TLSVersion.TLSv1_3)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_client_certificate(mtls_rig: MtlsRig, tmp_path: Path) -> None:
    server_ca = tmp_path / "server-ca.pem"
    server_ca.write_bytes(mtls_rig.certs.server_ca.pem)
    r = mtls_rig.rig

    def curl(client: str) -> subprocess.CompletedProcess[str]:
        cert, key = mtls_rig.certs.client(client)
        return subprocess.run(
            [
                *(
                    "curl",
                    "-sS",
                    "--cacert",
                    str(server_ca),
                    "--cert",
                    str(cert),
                    "--key",
                    str(key),
                ),
                *("--aws-sigv4", f"aws:amz:{r.region}:kms-xks-proxy"),
                *("--user", f"{r.akid}:{r.secret}", "-H", "Content-Type: application/json"),
                *("-w", "\n%{http_code}", "-d", json.dumps({"requestMetadata": health_meta()})),
                f"https://127.0.0.1:{mtls_rig.port}{HEALTH}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    ok = curl("good")
    assert ok.returncode == 0 and ok.stdout.endswith("\n200"), ok
    refused = curl("wrong-name")
    assert refused.returncode != 0 and "200" not in refused.stdout, refused


# ---- reload ---------------------------------------------------------------------------------


@pytest.fixture
def reload_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsRig]:
    rig = MtlsRig(tmp_path_factory.mktemp("mtls-reload"))
    yield rig
    stop_server(rig.server)


def set_tls(rig: MtlsRig, **settings: str) -> None:
    """Change [server.tls] settings; an empty value removes the setting."""
    tls = {k: v or None for k, v in settings.items()}
    edit_config(rig.rig.config, {"server": {"tls": tls}})


def test_sighup_changes_the_client_name(reload_rig: MtlsRig) -> None:
    assert reload_rig.health(reload_rig.context("good")) == 200
    set_tls(reload_rig, client_subject_name="cks.kms.eu-west-1.amazonaws.com")
    reload_rig.server.sighup()
    assert '"reload_applied"' in reload_rig.server.log_text()
    for _ in range(4):  # both workers
        assert reload_rig.health(reload_rig.context("wrong-name")) == 200
        reload_rig.refused(reload_rig.context("good"))


def test_sighup_replaces_the_client_ca_and_drops_the_old(
    reload_rig: MtlsRig, tmp_path: Path
) -> None:
    new_ca = Authority.create("next client CA")
    new_ca.issue(reload_rig.certs.dir, "new-ca-client", KMS_NAME)
    keep_alive_ctx = reload_rig.context("good")
    url = f"https://127.0.0.1:{reload_rig.port}{HEALTH}"
    kept = http.client.HTTPSConnection("127.0.0.1", reload_rig.port, context=keep_alive_ctx)
    body = json.dumps({"requestMetadata": health_meta()}).encode()
    r = reload_rig.rig

    def ask() -> int:
        kept.request(
            "POST", HEALTH, body, sign("POST", url, body, r.akid, r.secret, region=r.region)
        )
        response = kept.getresponse()
        response.read()
        return response.status

    try:
        assert ask() == 200
        reload_rig.certs.client_ca_file.write_bytes(new_ca.pem)  # the old CA taken out
        reload_rig.server.sighup()
        assert '"reload_applied"' in reload_rig.server.log_text()
        for _ in range(4):
            assert reload_rig.health(reload_rig.context("new-ca-client")) == 200
            reload_rig.refused(reload_rig.context("good"))
        assert ask() == 200  # a connection made before the reload keeps its verdict
    finally:
        kept.close()


def test_a_bad_client_ca_on_sighup_keeps_the_old(reload_rig: MtlsRig) -> None:
    good = reload_rig.certs.client_ca_file.read_bytes()
    reload_rig.certs.client_ca_file.write_text("not a certificate")
    try:
        reload_rig.server.sighup()
    finally:
        reload_rig.certs.client_ca_file.write_bytes(good)
    log = reload_rig.server.log_text()
    assert '"reload_rejected"' in log and "server.tls.client_ca_file" in log
    assert reload_rig.health(reload_rig.context("good")) == 200


def test_switching_mutual_tls_off_on_sighup_is_rejected(reload_rig: MtlsRig) -> None:
    set_tls(reload_rig, client_ca_file="", client_subject_name="")
    reload_rig.server.sighup()
    log = reload_rig.server.log_text()
    assert "switching mutual TLS on or off needs a restart" in log
    reload_rig.refused(reload_rig.context(None))  # still demands a certificate


# ---- configuration --------------------------------------------------------------------------


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"client_subject_name": "cks.kms.us-east-1.amazonaws.com"}, "go together"),
        ({"client_ca_file": "{ca}"}, "go together"),
        ({"client_ca_file": "{ca}", "client_subject_name": "*.kms.amazonaws.com"}, "DNS name"),
        ({"client_ca_file": "{ca}", "client_subject_name": "CKS.KMS.example"}, "lower case"),
        ({"client_ca_file": "missing.pem", "client_subject_name": "a.example"}, "does not exist"),
        ({"client_ca_file": "{junk}", "client_subject_name": "a.example"}, "cannot load CA"),
    ],
    ids=["name-alone", "ca-alone", "wildcard", "upper-case", "missing-ca", "junk-ca"],
)
def test_bad_mutual_tls_settings_are_config_errors(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    certs = make_certs(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    cert, key = certs.server
    tls = {"cert_file": str(cert), "key_file": str(key)}
    tls.update({k: v.format(ca=certs.client_ca_file, junk=junk) for k, v in extra.items()})
    config = dev_rig(tmp_path / "rig", settings={"server": {"tls": tls}}).config
    proc = serve_once(config)
    assert proc.returncode == 78, proc
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_another_required_name_is_served_and_warned_about(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The required name is configurable: a rig pinned to a name KMS does not present serves
    that name's certificate, refuses KMS's, and says at start that KMS would be refused."""
    rig = MtlsRig(tmp_path_factory.mktemp("mtls-other-name"), "xks-client.example.com")
    try:
        assert rig.health(rig.context("partner")) == 200
        rig.refused(rig.context("good"))
        assert rig.server.log_text().count('"tls_client_name_not_kms"') == 1  # not per worker
    finally:
        stop_server(rig.server)
    assert "Traceback" not in rig.server.log_text()
