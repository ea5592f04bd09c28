"""Native TLS: TLS 1.2+ with the spec's cipher suites, against a real proxy process."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.configs import edit_config, read_config
from tests.support.metrics import scrape, value
from tests.support.proxies import stop_server
from tests.support.rigs import make_rig
from tests.support.tls import TlsRig, make_cert
from tests.support.xks_client import health_meta, sign


@pytest.fixture(scope="module", params=["rsa", "ecdsa"])
def tls_rig(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRig]:
    rig = TlsRig(tmp_path_factory.mktemp(f"tls-{request.param}"), str(request.param))
    yield rig
    stop_server(rig.server)


def test_tls13_works(tls_rig: TlsRig) -> None:
    assert tls_rig.health(tls_rig.client(ssl.TLSVersion.TLSv1_3)) == 200


def test_tls12_with_a_spec_suite_works(tls_rig: TlsRig) -> None:
    suite = "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA384"
    assert tls_rig.health(tls_rig.client(ssl.TLSVersion.TLSv1_2, suite)) == 200


def test_tls12_with_a_suite_outside_the_spec_is_refused(tls_rig: TlsRig) -> None:
    ctx = tls_rig.client(
        ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    with pytest.raises(ssl.SSLError):
        tls_rig.health(ctx)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_is_refused(tls_rig: TlsRig, version: ssl.TLSVersion) -> None:
    ctx = tls_rig.client(version, "DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        tls_rig.health(ctx)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_tls(tls_rig: TlsRig) -> None:
    r = tls_rig.rig
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(tls_rig.cert),
            "--aws-sigv4",
            f"aws:amz:{r.region}:kms-xks-proxy",
            "--user",
            f"{r.akid}:{r.secret}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"requestMetadata": health_meta()}),
            "-w",
            "\n%{http_code}",
            f"https://127.0.0.1:{tls_rig.port}/example/xks/kms/xks/v1/health",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.endswith("\n200"), out


def serve_with_tls(tmp_path: Path, cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """`serve` on a rig whose [server.tls] names *cert* and *key*, stdin closed, at most 60 s."""
    tls = {"cert_file": str(cert), "key_file": str(key)}
    rig = make_rig(tmp_path / "rig", settings={"server": {"tls": tls}})
    return subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(rig.config)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=60,
        check=False,
    )


def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    proc = serve_with_tls(tmp_path, bad, bad)
    assert proc.returncode == 78
    assert "server.tls" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_encrypted_key_is_refused_in_one_line_without_a_prompt(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "ecdsa")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:s3cret",
         "-out", str(encrypted)],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = serve_with_tls(tmp_path, cert, encrypted)
    assert proc.returncode == 78, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if "server.tls" in line]
    assert problems == [
        "xksproxy: config: server.tls.key_file: the private key is encrypted; give the proxy an"
        " unencrypted key readable only by its user (openssl pkey -in KEY -out PLAIN)"
    ], proc.stderr
    assert "PEM pass phrase" not in proc.stderr + proc.stdout


def test_a_directory_as_key_file_is_named_a_directory(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "ecdsa")
    directory = tmp_path / "keys.d"
    directory.mkdir()
    proc = serve_with_tls(tmp_path, cert, directory)
    assert proc.returncode == 78
    assert f"server.tls.key_file: {directory} is a directory, not a file" in proc.stderr


# ---- certificate reload on SIGHUP ------------------------------------------------------------


@pytest.fixture(scope="module")
def reload_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRig]:
    rig = TlsRig(tmp_path_factory.mktemp("tls-reload"), "ecdsa")
    yield rig
    stop_server(rig.server)


def served_certificate(port: int) -> bytes:
    """The DER certificate a new connection is given."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def replace_files(rig: TlsRig, directory: Path, kind: str) -> None:
    """A new certificate and key written over the files the configuration names."""
    directory.mkdir()
    cert, key = make_cert(directory, kind)
    shutil.copyfile(cert, rig.cert)
    shutil.copyfile(key, rig.cert.with_suffix(".key"))


def expiry_metric(rig: TlsRig) -> float:
    return value(scrape(rig.rig.metrics_port)[2], "xks_tls_certificate_expiry_timestamp_seconds")


def not_after(der: bytes) -> float:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def test_sighup_serves_a_new_certificate_and_keeps_open_connections(
    reload_rig: TlsRig, tmp_path: Path
) -> None:
    before = served_certificate(reload_rig.port)
    assert expiry_metric(reload_rig) == not_after(before)
    trusting_old = ssl.create_default_context(cafile=str(reload_rig.cert))
    kept = http.client.HTTPSConnection("127.0.0.1", reload_rig.port, context=trusting_old)
    path = "/example/xks/kms/xks/v1/health"
    url = f"https://127.0.0.1:{reload_rig.port}{path}"
    body = json.dumps({"requestMetadata": health_meta()}).encode()

    def ask(conn: http.client.HTTPSConnection) -> int:
        r = reload_rig.rig
        conn.request("POST", path, body, sign("POST", url, body, r.akid, r.secret, region=r.region))
        response = conn.getresponse()
        response.read()
        return response.status

    try:
        assert ask(kept) == 200  # a keep-alive connection made under the old certificate
        replace_files(reload_rig, tmp_path / "new", "ecdsa")
        reload_rig.server.sighup()
        assert '"reload_applied"' in reload_rig.server.log_text()
        after = served_certificate(reload_rig.port)
        assert after != before
        assert all(served_certificate(reload_rig.port) == after for _ in range(6))  # workers
        assert expiry_metric(reload_rig) == not_after(after)
        assert ask(kept) == 200  # the connection open across the reload still serves
    finally:
        kept.close()
    assert reload_rig.health(reload_rig.client(ssl.TLSVersion.TLSv1_3)) == 200  # trusts new


def test_a_bad_new_certificate_is_rejected_and_the_old_one_kept(
    reload_rig: TlsRig, tmp_path: Path
) -> None:
    before = served_certificate(reload_rig.port)
    good = reload_rig.cert.read_bytes()
    rejected = reload_rig.server.log_text().count('"reload_rejected"')
    reload_rig.cert.write_text("not a certificate")
    try:
        reload_rig.server.sighup()
    finally:
        reload_rig.cert.write_bytes(good)
    assert reload_rig.server.log_text().count('"reload_rejected"') > rejected
    assert "server.tls: cannot load the certificate or key" in reload_rig.server.log_text()
    assert all(served_certificate(reload_rig.port) == before for _ in range(6))


def test_switching_tls_off_on_sighup_is_rejected(reload_rig: TlsRig) -> None:
    config = reload_rig.rig.config
    saved = config.read_bytes()
    rejected = reload_rig.server.log_text().count('"reload_rejected"')
    assert "tls" in read_config(config)["server"]
    edit_config(config, {"server": {"tls": None}})
    try:
        reload_rig.server.sighup()
    finally:
        config.write_bytes(saved)
    assert reload_rig.server.log_text().count('"reload_rejected"') > rejected
    assert "switching TLS on or off needs a restart" in reload_rig.server.log_text()
    served_certificate(reload_rig.port)  # still TLS
