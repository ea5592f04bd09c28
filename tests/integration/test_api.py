"""The XKS wire API against a real proxy process and SoftHSM (the conformance cases of
docs/spec-notes.md §8)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support.api import assert_error, b64
from tests.support.byok import wrap_with_cryptography
from tests.support.commands import xksproxy
from tests.support.files import write_secret
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import (
    XksClient,
    decrypt_fields,
    health_meta,
    key_meta,
    signer_clock,
)
from xksproxy.service import decode_cm, encode_cm, hsm_aad

B64_AAD = base64.b64encode(b"project=nile,department=marketing").decode()

# The whole suite runs on plain SoftHSM (None) and on SoftHSM behind the PKCS#11 shim behaving
# as each vendor's library does for AES-GCM (xksproxy/dev/faultinject, docs/vendors.md): SoftHSM
# takes any IV, so plain SoftHSM alone proves nothing about an HSM that makes its own.
# Profile -> the IV length its Encrypt returns.
PROFILES: dict[str | None, int] = {
    None: 12,
    "cloudhsm": 12,
    "luna-fips": 16,
    "luna": 12,
    "nshield": 12,
    "protectserver-fips": 12,
}
# The profiles whose HSM does not take a 16-byte IV to decrypt.
NO_IV16 = {"cloudhsm"}


@pytest.fixture(scope="module", params=list(PROFILES), ids=lambda p: p or "softhsm-plain")
def profile(request: pytest.FixtureRequest) -> str | None:
    name: str | None = request.param
    return name


@pytest.fixture(scope="module")
def rig(profile: str | None, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(tmp_path_factory.mktemp("rig"), emulate=profile)


@pytest.fixture(scope="module")
def server(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(rig.config, rig.port, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield srv
    stop_server(srv)


def encrypt_ok(client: XksClient, key: str = "foo", **fields: Any) -> dict[str, Any]:
    fields.setdefault("plaintext", b64(os.urandom(32)))
    resp = client.encrypt(key, **fields)
    assert resp.status == 200, resp.body
    data: dict[str, Any] = resp.json
    return data


# ---- routing: §8 cases 1, 2 --------------------------------------------------------------


@pytest.mark.parametrize(
    "api", ["/health", "/keys/foo/metadata", "/keys/foo/encrypt", "/keys/foo/decrypt"]
)
def test_get_on_api_uri_is_405(client: XksClient, api: str) -> None:
    resp = client.raw("GET", client.base + api)
    assert resp.status == 405
    assert resp.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "path",
    [
        "/example/xks/invalid/kms/xks/v1/health",
        "/invalid/kms/xks/v1/health",
        "/example/xks/kms/xks/v1/keys/foo/metadata/extra",
        "/example/xks/kms/xks/v1/keys/foo/rotate",
        "/example/xks/kms/xks/v2/keys/foo/encrypt",
        "/example/xks/kms/xks/v1/health/",
        "/kms/xks/v1/health",
        "/example/xks/kms/xks/v1/keys/" + "k" * 129 + "/encrypt",
    ],
)
def test_unknown_path_is_404_invalid_uri_path(client: XksClient, path: str) -> None:
    body = json.dumps({"requestMetadata": health_meta()}).encode()
    resp = client.raw("POST", path, body, client.signed(path, body))
    assert_error(resp, 404, "InvalidUriPathException")


def test_ping_needs_no_authentication(client: XksClient) -> None:
    resp = client.raw("GET", "/ping")
    assert resp.status == 200
    assert resp.json == {"status": "ok"}


# ---- GetHealthStatus: §8 cases 3, 4, 5 ----------------------------------------------------


def test_health_reports_the_hsm(client: XksClient) -> None:
    resp = client.health()
    assert resp.status == 200
    body = resp.json
    assert isinstance(body["xksProxyFleetSize"], int) and body["xksProxyFleetSize"] >= 1
    assert body["xksProxyVendor"] and body["xksProxyModel"] and body["ekmVendor"]
    details = body["ekmFleetDetails"]
    assert 1 <= len(details) <= 10
    assert details[0]["id"] == "softhsm-1"
    assert "SoftHSM" in details[0]["model"]
    assert details[0]["healthStatus"] == "ACTIVE"


@pytest.mark.parametrize(
    "operation",
    [
        "CreateCustomKeyStore",
        "ConnectCustomKeyStore",
        "UpdateCustomKeyStore",
        "KmsHealthCheck",
        "SomeFutureOperation",
    ],
)
def test_health_accepts_every_kms_operation(client: XksClient, operation: str) -> None:
    assert client.health(operation).status == 200


@pytest.mark.parametrize(
    "body", [{}, {"requestMetadata": {}}, {"requestMetadata": None}, {"requestMetadata": "x"}]
)
def test_health_without_request_metadata_is_400(client: XksClient, body: dict[str, Any]) -> None:
    assert_error(client.call("/health", body), 400, "ValidationException")


# ---- SigV4: §8 cases 7, 8, 9, 10 ----------------------------------------------------------


def test_wrong_access_key_id_is_401(client: XksClient) -> None:
    resp = client.call("/health", {"requestMetadata": health_meta()}, akid="A" * 24)
    assert_error(resp, 401, "AuthenticationFailedException")


def test_wrong_secret_is_401(client: XksClient) -> None:
    resp = client.call("/health", {"requestMetadata": health_meta()}, secret="x" * 44)
    assert_error(resp, 401, "AuthenticationFailedException")


def test_wrong_service_name_is_401(client: XksClient) -> None:
    resp = client.call("/health", {"requestMetadata": health_meta()}, service="kms")
    assert_error(resp, 401, "AuthenticationFailedException")


def test_wrong_region_is_401(client: XksClient) -> None:
    resp = client.call("/health", {"requestMetadata": health_meta()}, region="eu-west-1")
    assert_error(resp, 401, "AuthenticationFailedException")


def test_no_authorization_header_is_401(client: XksClient) -> None:
    body = json.dumps({"requestMetadata": health_meta()}).encode()
    resp = client.raw("POST", client.base + "/health", body, {"Content-Type": "application/json"})
    assert_error(resp, 401, "AuthenticationFailedException")


@pytest.mark.parametrize(("minutes", "status"), [(6, 401), (-6, 401), (4, 200), (-4, 200)])
def test_clock_skew(client: XksClient, minutes: int, status: int) -> None:
    when = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(
        minutes=minutes
    )
    with signer_clock(when):
        resp = client.health()
    assert resp.status == status, resp.body


def test_body_changed_after_signing_is_401(client: XksClient) -> None:
    path = client.base + "/health"
    body = json.dumps({"requestMetadata": health_meta()}).encode()
    headers = client.signed(path, body)
    tampered = body.replace(b"KmsHealthCheck", b"KmsHealthCheckX")
    assert_error(client.raw("POST", path, tampered, headers), 401, "AuthenticationFailedException")


def test_path_changed_after_signing_is_401(client: XksClient) -> None:
    body = json.dumps({"requestMetadata": key_meta("CreateKey")}).encode()
    headers = client.signed(client.base + "/keys/foo/metadata", body)
    resp = client.raw("POST", client.base + "/keys/enc-only/metadata", body, headers)
    assert_error(resp, 401, "AuthenticationFailedException")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_aws_sigv4_signature_is_accepted(rig: Rig, server: Server) -> None:
    """curl signs content-type;host;x-amz-date, as the spec's appendix and test client do."""
    body = json.dumps(
        {
            "requestMetadata": key_meta("Encrypt"),
            "plaintext": b64(b"hello"),
            "encryptionAlgorithm": "AES_GCM",
        }
    )
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--aws-sigv4",
            f"aws:amz:{rig.region}:kms-xks-proxy",
            "--user",
            f"{rig.akid}:{rig.secret}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "-w",
            "\n%{http_code}",
            f"http://127.0.0.1:{server.port}/example/xks/kms/xks/v1/keys/foo/encrypt",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    payload, code = out.rsplit("\n", 1)
    assert code == "200", payload
    assert len(base64.b64decode(json.loads(payload)["ciphertext"])) == 5


def test_second_credential_of_a_prefix_works(rig: Rig, client: XksClient) -> None:
    resp = client.call(
        "/health", {"requestMetadata": health_meta()}, akid=rig.akid2, secret=rig.secret2
    )
    assert resp.status == 200


def test_credential_of_another_prefix_is_401(rig: Rig, client: XksClient) -> None:
    resp = client.call(
        "/health", {"requestMetadata": health_meta()}, akid=rig.other_akid, secret=rig.other_secret
    )
    assert_error(resp, 401, "AuthenticationFailedException")


def test_other_prefix_serves_with_its_own_credential(rig: Rig, server: Server) -> None:
    other = XksClient(
        "127.0.0.1", server.port, rig.other_prefix, rig.other_akid, rig.other_secret, rig.region
    )
    assert other.health().status == 200
    assert other.encrypt("foo", plaintext=b64(b"x")).status == 200


def test_credential_removed_at_runtime_is_refused_after_sighup(
    rig: Rig, server: Server, client: XksClient
) -> None:
    added = json.loads(
        xksproxy("credentials", "add", "-c", str(rig.config), "--prefix", rig.prefix).stdout
    )["XksProxyAuthenticationCredential"]
    akid, secret = added["AccessKeyId"], added["RawSecretAccessKey"]
    server.sighup()
    assert (
        client.call("/health", {"requestMetadata": health_meta()}, akid=akid, secret=secret).status
        == 200
    )
    xksproxy(
        "credentials",
        "remove",
        "-c",
        str(rig.config),
        "--prefix",
        rig.prefix,
        "--access-key-id",
        akid,
    )
    server.sighup()
    resp = client.call("/health", {"requestMetadata": health_meta()}, akid=akid, secret=secret)
    assert_error(resp, 401, "AuthenticationFailedException")
    assert client.health().status == 200  # the others keep working, no restart


def test_bad_credentials_file_on_reload_keeps_the_old_one(
    rig: Rig, server: Server, client: XksClient
) -> None:
    path = rig.dir / "credentials.json"
    good = path.read_bytes()
    try:
        path.write_text("{not json")
        server.sighup()
        assert "reload_rejected" in server.log_text()
        assert client.health().status == 200
    finally:
        path.write_bytes(good)
        server.sighup()


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_reload_that_would_remove_every_credential_is_rejected(
    rig: Rig, server: Server, client: XksClient, how: str
) -> None:
    """A credentials file gone missing or left with no credential is not applied as "no
    prefixes" (every request then 404, health included): the reload is rejected and the
    credentials in force are kept, unless sigv4.allow_no_credentials says otherwise."""
    path = rig.dir / "credentials.json"
    good = path.read_bytes()
    offset = len(server.log_text())
    try:
        if how == "deleted":
            path.unlink()
        else:
            write_secret(path, json.dumps({"version": 1, "prefixes": {}}))
        server.sighup()
        rejected = [
            json.loads(line)
            for line in server.log_text()[offset:].splitlines()
            if '"reload_rejected"' in line
        ]
        assert len(rejected) == server.workers
        assert "the credentials in force are kept" in rejected[0]["problems"][0]
        assert client.health().status == 200
    finally:
        write_secret(path, good.decode())
        server.sighup()


# ---- GetKeyMetadata: §8 cases 11, 12, 13, 14 ----------------------------------------------


def test_key_metadata(client: XksClient) -> None:
    resp = client.metadata("foo")
    assert resp.status == 200
    body = resp.json
    assert body["keySpec"] == "AES_256"
    assert {"ENCRYPT", "DECRYPT"} <= set(body["keyUsage"])
    assert len(body["keyUsage"]) <= 10
    assert body["keyStatus"] == "ENABLED"


def test_key_metadata_accepts_legacy_describe_key_fields(client: XksClient) -> None:
    meta = key_meta("DescribeKey")  # carries kmsKeyArn and kmsViaService, dropped in 1.0.3
    meta["SourceIdentity"] = "someone"
    assert client.metadata("foo", meta).status == 200


@pytest.mark.parametrize(
    ("key", "usage", "status"),
    [
        ("enc-only", ["ENCRYPT"], "ENABLED"),
        ("dec-only", ["DECRYPT"], "ENABLED"),
        ("no-usage", [], "ENABLED"),
        ("disabled", ["ENCRYPT", "DECRYPT"], "DISABLED"),
    ],
)
def test_key_metadata_reflects_the_hsm(
    client: XksClient, key: str, usage: list[str], status: str
) -> None:
    body = client.metadata(key).json
    assert body["keyUsage"] == usage
    assert body["keyStatus"] == status


@pytest.mark.parametrize("api", ["metadata", "encrypt", "decrypt"])
def test_unknown_key_is_404(client: XksClient, api: str) -> None:
    body: dict[str, Any] = {"requestMetadata": key_meta("Encrypt")}
    if api == "encrypt":
        body.update(plaintext=b64(b"x"), encryptionAlgorithm="AES_GCM")
    if api == "decrypt":
        body.update(decrypt_fields(encrypt_ok(client)), encryptionAlgorithm="AES_GCM")
    assert_error(client.call(f"/keys/nope/{api}", body), 404, "KeyNotFoundException")


def test_health_key_is_not_a_kms_key(client: XksClient) -> None:
    assert_error(client.metadata("xksproxy-health"), 404, "KeyNotFoundException")


@pytest.mark.parametrize("api", ["metadata", "encrypt", "decrypt"])
@pytest.mark.parametrize("meta", [None, {}, "x", []])
def test_missing_request_metadata_is_400(client: XksClient, api: str, meta: Any) -> None:
    body: dict[str, Any] = {"plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"}
    if meta is not None:
        body["requestMetadata"] = meta
    assert_error(client.call(f"/keys/foo/{api}", body), 400, "ValidationException")


@pytest.mark.parametrize("field", ["awsPrincipalArn", "kmsRequestId", "kmsOperation", "kmsKeyArn"])
def test_encrypt_requires_each_metadata_field(client: XksClient, field: str) -> None:
    meta = key_meta("Encrypt")
    del meta[field]
    resp = client.encrypt("foo", requestMetadata=meta, plaintext=b64(b"x"))
    assert_error(resp, 400, "ValidationException")


def test_unknown_kms_operation_is_not_rejected(client: XksClient) -> None:
    meta = key_meta("SomethingNew")
    assert client.encrypt("foo", requestMetadata=meta, plaintext=b64(b"x")).status == 200


def test_long_arns_work(client: XksClient) -> None:
    meta = key_meta("Encrypt")
    meta["awsPrincipalArn"] = "arn:aws:iam::123456789012:role/" + "r" * 2000
    meta["kmsKeyArn"] = "arn:aws:kms:us-east-1:123456789012:key/" + "k" * 2000
    assert client.encrypt("foo", requestMetadata=meta, plaintext=b64(b"x")).status == 200


@pytest.mark.parametrize("field", ["awsPrincipalArn", "kmsKeyArn", "kmsViaService", "kmsOperation"])
def test_metadata_longer_than_the_longest_arn_is_400_and_not_logged(
    client: XksClient, server: Server, field: str
) -> None:
    meta = key_meta("Encrypt")
    meta[field] = "arn:aws:iam::123456789012:role/" + "L" * 2007 + "MARKER-TAIL"  # 2,049 chars
    assert len(meta[field]) == 2049
    offset = len(server.log_text())
    resp = client.encrypt("foo", requestMetadata=meta, plaintext=b64(b"x"))
    assert_error(resp, 400, "ValidationException")
    assert "MARKER-TAIL" not in server.log_text()[offset:]


def test_a_long_kms_request_id_is_served_and_logged_cut_short(
    client: XksClient, server: Server
) -> None:
    """kmsRequestId is opaque and must not be validated; the audit line keeps 2,048 chars."""
    meta = key_meta("Encrypt")
    meta["kmsRequestId"] = "r" * 2048 + "MARKER-TAIL" * 1000
    offset = len(server.log_text())
    assert client.encrypt("foo", requestMetadata=meta, plaintext=b64(b"x")).status == 200
    logged = server.log_text()[offset:]
    assert "r" * 2048 in logged and "MARKER-TAIL" not in logged


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_a_body_not_in_utf8_is_400(client: XksClient, encoding: str) -> None:
    body = {"requestMetadata": key_meta("Encrypt"), "encryptionAlgorithm": "AES_GCM",
            "plaintext": b64(b"x")}  # fmt: skip
    raw = json.dumps(body).encode(encoding)
    assert_error(client.call("/keys/foo/encrypt", raw), 400, "ValidationException")


# ---- Encrypt validation: §8 cases 15, 16 --------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},  # no plaintext
        {"plaintext": None},
        {"plaintext": 12},
        {"plaintext": ""},
        {"plaintext": "not base64!"},
        {"plaintext": "SGVsbG8"},  # missing padding
        {"plaintext": "-_-_"},  # URL-safe alphabet
        {"plaintext": "SGVsbG8=\n"},
        {"plaintext": "SGVsbG9="},  # non-canonical padding bits
        {"plaintext": b64(b"x"), "additionalAuthenticatedData": "***"},
    ],
)
def test_encrypt_bad_input_is_400(client: XksClient, fields: dict[str, Any]) -> None:
    assert_error(client.encrypt("foo", **fields), 400, "ValidationException")


@pytest.mark.parametrize("alg", [None, "", "AES_CBC", "aes_gcm", "SYMMETRIC_DEFAULT", 1])
def test_encryption_algorithm_must_be_aes_gcm(client: XksClient, alg: Any) -> None:
    fields: dict[str, Any] = {"plaintext": b64(b"x"), "encryptionAlgorithm": alg}
    if alg is None:
        fields.pop("encryptionAlgorithm")
        body = {"requestMetadata": key_meta("Encrypt"), **fields}
        resp = client.call("/keys/foo/encrypt", body)
    else:
        resp = client.encrypt("foo", **fields)
    assert_error(resp, 400, "ValidationException")


@pytest.mark.parametrize("alg", ["SHA_512", "sha_256", "", 5])
def test_cdiv_algorithm_must_be_sha_256(client: XksClient, alg: Any) -> None:
    resp = client.encrypt("foo", plaintext=b64(b"x"), ciphertextDataIntegrityValueAlgorithm=alg)
    assert_error(resp, 400, "ValidationException")


# ---- Encrypt / Decrypt: §8 cases 17-23, 25 ------------------------------------------------


def test_encrypt_output_shape(client: XksClient, profile: str | None) -> None:
    pt = os.urandom(100)
    a = encrypt_ok(client, plaintext=b64(pt))
    b = encrypt_ok(client, plaintext=b64(pt))
    assert len(base64.b64decode(a["initializationVector"])) == PROFILES[profile]
    assert len(base64.b64decode(a["authenticationTag"])) == 16
    assert len(base64.b64decode(a["ciphertext"])) == len(pt)
    assert len(base64.b64decode(a["ciphertextMetadata"])) <= 20
    assert a["initializationVector"] != b["initializationVector"]
    assert a["ciphertext"] != b["ciphertext"]
    assert "ciphertextDataIntegrityValue" not in a


@pytest.mark.parametrize("aad", [None, B64_AAD])
def test_round_trip(client: XksClient, aad: str | None) -> None:
    pt = b64(os.urandom(48))
    fields = (
        {"plaintext": pt} if aad is None else {"plaintext": pt, "additionalAuthenticatedData": aad}
    )
    enc = encrypt_ok(client, **fields)
    dec = client.decrypt("foo", **decrypt_fields(enc, aad))
    assert dec.status == 200
    assert dec.json == {"plaintext": pt}


def test_largest_spec_sizes_round_trip(client: XksClient) -> None:
    pt, aad = b64(os.urandom(4300)), b64(os.urandom(8192))
    enc = encrypt_ok(client, plaintext=pt, additionalAuthenticatedData=aad)
    dec = client.decrypt("foo", **decrypt_fields(enc, aad))
    assert dec.json == {"plaintext": pt}


def test_plaintext_up_to_the_configured_limit_round_trips(client: XksClient) -> None:
    pt = b64(os.urandom(65536))
    enc = encrypt_ok(client, plaintext=pt)
    assert client.decrypt("foo", **decrypt_fields(enc)).json == {"plaintext": pt}


def test_plaintext_over_the_configured_limit_is_501(client: XksClient) -> None:
    resp = client.encrypt("foo", plaintext=b64(os.urandom(65537)))
    assert_error(resp, 501, "UnsupportedOperationException")


def test_body_over_the_hard_cap_is_413(client: XksClient) -> None:
    body = json.dumps({"requestMetadata": key_meta("Encrypt"), "pad": "x" * 300_000}).encode()
    path = client.base + "/keys/foo/encrypt"
    resp = client.raw("POST", path, body, client.signed(path, body))
    assert resp.status == 413
    assert resp.json["errorName"] == "UnsupportedOperationException"


@pytest.mark.parametrize("aad", [None, B64_AAD])
def test_decrypt_with_missing_or_other_aad_fails(client: XksClient, aad: str | None) -> None:
    enc = encrypt_ok(client, additionalAuthenticatedData=B64_AAD)
    wrong = None if aad is not None else b64(b"project=nile,department=sales")
    resp = client.decrypt("foo", **decrypt_fields(enc, wrong))
    assert_error(resp, 400, "InvalidCiphertextException")


def test_decrypt_with_aad_that_encrypt_did_not_have_fails(client: XksClient) -> None:
    enc = encrypt_ok(client)
    assert_error(
        client.decrypt("foo", **decrypt_fields(enc, B64_AAD)), 400, "InvalidCiphertextException"
    )


def flip(value: str, bit: int = 0) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    return b64(bytes(raw))


@pytest.mark.parametrize("field", ["ciphertext", "authenticationTag", "initializationVector"])
@pytest.mark.parametrize("bit", [0, 7, 45])
def test_one_flipped_bit_fails(client: XksClient, field: str, bit: int) -> None:
    enc = encrypt_ok(client)
    fields = decrypt_fields(enc)
    fields[field] = flip(fields[field], bit)
    resp = client.decrypt("foo", **fields)
    assert_error(resp, 400, "InvalidCiphertextException")
    assert (
        resp.json["errorMessage"]
        == client.decrypt(
            "foo",
            **{**decrypt_fields(enc), "ciphertextMetadata": flip(enc["ciphertextMetadata"], 39)},
        ).json["errorMessage"]
    )  # the message never says which check failed


def test_changed_ciphertext_metadata_fails(client: XksClient) -> None:
    enc = encrypt_ok(client)
    fields = decrypt_fields(enc)
    fields["ciphertextMetadata"] = flip(enc["ciphertextMetadata"], 39)
    assert_error(client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def test_dropped_ciphertext_metadata_fails(client: XksClient) -> None:
    fields = decrypt_fields(encrypt_ok(client))
    del fields["ciphertextMetadata"]
    assert_error(client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def test_ciphertext_metadata_swapped_into_aad_fails(client: XksClient) -> None:
    """§2.2: "no AAD + CM=M" must not verify as "AAD=M + no CM"."""
    enc = encrypt_ok(client)
    fields = decrypt_fields(enc, enc["ciphertextMetadata"])
    del fields["ciphertextMetadata"]
    assert_error(client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def test_truncated_ciphertext_fails(client: XksClient) -> None:
    enc = encrypt_ok(client)
    fields = decrypt_fields(enc)
    fields["ciphertext"] = b64(base64.b64decode(enc["ciphertext"])[:-1])
    assert_error(client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def test_ciphertext_of_another_key_fails(client: XksClient) -> None:
    enc = encrypt_ok(client, key="enc-only")
    assert_error(client.decrypt("foo", **decrypt_fields(enc)), 400, "InvalidCiphertextException")


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("ciphertextMetadata", bytes(21)),
        ("initializationVector", bytes(11)),
        ("initializationVector", bytes(13)),
        ("initializationVector", bytes(32)),
        ("authenticationTag", bytes(15)),
        ("authenticationTag", bytes(17)),
        ("ciphertext", b""),
    ],
)
def test_decrypt_field_lengths_are_400(client: XksClient, field: str, raw: bytes) -> None:
    fields = decrypt_fields(encrypt_ok(client))
    fields[field] = b64(raw)
    assert_error(client.decrypt("foo", **fields), 400, "ValidationException")


@pytest.mark.parametrize("missing", ["ciphertext", "initializationVector", "authenticationTag"])
def test_decrypt_required_fields(client: XksClient, missing: str) -> None:
    fields = decrypt_fields(encrypt_ok(client))
    del fields[missing]
    assert_error(client.decrypt("foo", **fields), 400, "ValidationException")


def test_decrypt_accepts_a_16_byte_iv_but_it_must_authenticate(client: XksClient) -> None:
    fields = decrypt_fields(encrypt_ok(client))
    fields["initializationVector"] = b64(bytes(16))
    assert_error(client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def cdiv(aad: str | None, enc: dict[str, Any]) -> str:
    parts = [
        aad or "",
        enc.get("ciphertextMetadata", ""),
        enc["initializationVector"],
        enc["ciphertext"],
        enc["authenticationTag"],
    ]
    return b64(hashlib.sha256(b"".join(base64.b64decode(p) for p in parts)).digest())


@pytest.mark.parametrize("aad", [None, B64_AAD])
def test_cdiv_matches_local_computation_and_decrypts(client: XksClient, aad: str | None) -> None:
    pt = b64(os.urandom(32))
    fields: dict[str, Any] = {"plaintext": pt, "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}
    if aad:
        fields["additionalAuthenticatedData"] = aad
    enc = encrypt_ok(client, **fields)
    assert enc["ciphertextDataIntegrityValue"] == cdiv(aad, enc)
    assert client.decrypt("foo", **decrypt_fields(enc, aad)).json == {"plaintext": pt}


# ---- key usage and state: §8 cases 26, 27, 28 ---------------------------------------------


def test_encrypt_only_key(client: XksClient) -> None:
    enc = encrypt_ok(client, key="enc-only")
    assert_error(client.decrypt("enc-only", **decrypt_fields(enc)), 400, "InvalidKeyUsageException")
    resp = client.encrypt(
        "enc-only", plaintext=b64(b"x"), ciphertextDataIntegrityValueAlgorithm="SHA_256"
    )
    assert_error(resp, 400, "InvalidKeyUsageException")


@pytest.mark.parametrize("key", ["dec-only", "no-usage"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"additionalAuthenticatedData": B64_AAD},
        {"ciphertextDataIntegrityValueAlgorithm": "SHA_256"},
    ],
)
def test_key_that_cannot_encrypt(client: XksClient, key: str, extra: dict[str, str]) -> None:
    resp = client.encrypt(key, plaintext=b64(b"x"), **extra)
    assert_error(resp, 400, "InvalidKeyUsageException")


def test_no_usage_key_cannot_decrypt(client: XksClient) -> None:
    fields = decrypt_fields(encrypt_ok(client))
    assert_error(client.decrypt("no-usage", **fields), 400, "InvalidKeyUsageException")


def test_disabled_key_refuses_crypto(client: XksClient) -> None:
    assert_error(client.encrypt("disabled", plaintext=b64(b"x")), 400, "InvalidStateException")
    fields = decrypt_fields(encrypt_ok(client))
    assert_error(client.decrypt("disabled", **fields), 400, "InvalidStateException")


@pytest.mark.parametrize(
    "api", ["/health", "/keys/foo/metadata", "/keys/foo/encrypt", "/keys/foo/decrypt"]
)
def test_disabled_prefix_refuses_every_api(rig: Rig, server: Server, api: str) -> None:
    creds = rig.credentials()["prefixes"]
    assert isinstance(creds, dict)
    cred = creds["off"][0]
    off = XksClient(
        "127.0.0.1", server.port, "off", cred["access_key_id"], cred["secret"], rig.region
    )
    body = {
        "requestMetadata": key_meta("Encrypt"),
        "plaintext": b64(b"x"),
        "encryptionAlgorithm": "AES_GCM",
    }
    assert_error(off.call(api, body), 400, "InvalidStateException")


# ---- key material from outside, rotation and IV lengths, per vendor profile -------------------


def import_material(rig: Rig, key: str, material: bytes, out: Any) -> None:
    """``keys import-params`` and ``keys import`` of *material* (a new key or its next version)."""
    cfg = ("-c", str(rig.config))
    xksproxy("keys", "import-params", key, "--wrapping-algorithm", "RSAES_OAEP_SHA_1",
             "--wrapping-key-spec", "RSA_3072", "--out", str(out), *cfg)  # fmt: skip
    wrap_with_cryptography(out, "RSAES_OAEP_SHA_1", material)
    xksproxy("keys", "import", key, "--wrapped-key-material", str(out / "EncryptedKeyMaterial.bin"),
             "--import-token", str(out / "ImportToken.bin"), *cfg)  # fmt: skip


def sealed_fields(material: bytes, version: int, iv: bytes, plaintext: bytes) -> dict[str, str]:
    """A Decrypt request's fields for *plaintext* sealed by software AES-GCM under *material*,
    in the proxy's format (CM naming *version*, bound into the AAD)."""
    cm, aad = encode_cm(version), b"tenant=interop"
    sealed = AESGCM(material).encrypt(iv, plaintext, hsm_aad(aad, cm))
    return {
        "ciphertext": b64(sealed[:-16]),
        "authenticationTag": b64(sealed[-16:]),
        "initializationVector": b64(iv),
        "ciphertextMetadata": b64(cm),
        "additionalAuthenticatedData": b64(aad),
    }


def test_imported_and_rotated_versions_work_with_software_aes_gcm(
    rig: Rig, client: XksClient, profile: str | None, tmp_path: Any
) -> None:
    """Versions 1 and 2 imported (known material), 3 made by `keys rotate`: ciphertexts made
    outside the proxy under 1 and 2 with the IV length this HSM makes decrypt through it; a
    16-byte IV only where the HSM takes one (else InvalidCiphertextException, never a 500);
    Encrypt uses version 3 with the HSM's IV, and its output decrypts."""
    key, materials = f"interop-{profile or 'plain'}", [os.urandom(32), os.urandom(32)]
    for i, material in enumerate(materials):
        import_material(rig, key, material, tmp_path / f"v{i + 1}")
    xksproxy("keys", "rotate", key, "-c", str(rig.config))
    for version, material in enumerate(materials, start=1):
        for n in sorted({PROFILES[profile], 12, 16}):
            plaintext = os.urandom(40)
            resp = client.decrypt(key, **sealed_fields(material, version, os.urandom(n), plaintext))
            if n == 16 and profile in NO_IV16:
                assert_error(resp, 400, "InvalidCiphertextException")
            else:
                assert resp.status == 200, resp.body
                assert base64.b64decode(resp.json["plaintext"]) == plaintext
    enc = encrypt_ok(client, key, additionalAuthenticatedData=B64_AAD)
    assert decode_cm(base64.b64decode(enc["ciphertextMetadata"])) == 3
    assert len(base64.b64decode(enc["initializationVector"])) == PROFILES[profile]
    assert client.decrypt(key, **decrypt_fields(enc, B64_AAD)).status == 200
