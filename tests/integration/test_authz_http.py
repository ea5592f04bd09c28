"""Secondary authorization over HTTP, against a real proxy (SIGHUP reloads included), and the
``policy test`` command (the evaluator and policy files: tests/unit/test_authz.py).
"""

# ruff: noqa: E501 -- the tables keep one case per line, to be read as a table.

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import xksproxy
from tests.support.configs import edit_config
from tests.support.policies import (
    ACCT,
    DECRYPTOR,
    ENCRYPTOR,
    KEY_ARN,
    allow,
    deny,
    pol,
    prefix_config,
)
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import Response, XksClient, health_meta


def test_serve_exits_78_on_a_bad_policy(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"Statement": []}))
    proc = xksproxy(
        "serve", "-c", str(prefix_config(tmp_path, {"policy_file": "bad.json"})), check=False
    )
    assert proc.returncode == 78
    assert 'prefixes."t".policy_file' in proc.stderr and "Statement: required" in proc.stderr


# ---- over HTTP, against a real proxy ------------------------------------------------------

HTTP_POLICY = pol(
    allow(Sid="EncryptorEncrypts", Principal={"AWS": ENCRYPTOR}, Action=["kms:Encrypt", "kms:GenerateDataKey*"]),
    allow(Sid="DecryptorDecrypts", Principal={"AWS": DECRYPTOR}, Action="kms:Decrypt"),
    allow(Sid="AnyoneDescribes", Action=["kms:CreateKey", "kms:DescribeKey"]),
    deny(Sid="NoStrangers", Principal={"AWS": "arn:aws:iam::*:role/stranger*"}),
)  # fmt: skip
DENY_ALL = pol(deny(Sid="DenyAll"))


@pytest.fixture(scope="module")
def authz_rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    rig = make_rig(tmp_path_factory.mktemp("authz-rig"))
    (rig.dir / "policy.json").write_text(json.dumps(HTTP_POLICY))
    (rig.dir / "tenant-b.json").write_text(json.dumps(DENY_ALL))
    policies = {
        rig.prefix: {"policy_file": "policy.json"},
        rig.other_prefix: {"policy_file": "tenant-b.json", "policy_mode": "audit-only"},
    }
    edit_config(rig.config, {"prefixes": policies})
    return rig


@pytest.fixture(scope="module")
def authz_server(authz_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("authz-logs") / "proxy.log"
    srv = start_server(authz_rig.config, authz_rig.port, log)
    yield srv
    stop_server(srv)


@pytest.fixture
def client(authz_rig: Rig, authz_server: Server) -> XksClient:
    r = authz_rig
    return XksClient("127.0.0.1", authz_server.port, r.prefix, r.akid, r.secret, r.region)


def request_meta(op: str, principal: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": principal,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": op,
        "kmsRequestId": os.urandom(8).hex(),
    }


def encrypt(client: XksClient, principal: str, key: str = "foo") -> Response:
    body = {
        "requestMetadata": request_meta("Encrypt", principal),
        "encryptionAlgorithm": "AES_GCM",
        "plaintext": base64.b64encode(b"secret data").decode(),
    }
    return client.call(f"/keys/{key}/encrypt", body)


def decrypt(
    client: XksClient, principal: str, enc: dict[str, Any], key: str = "foo", op: str = "Decrypt"
) -> Response:
    body = {
        "requestMetadata": request_meta(op, principal),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": enc["ciphertext"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
    }
    return client.call(f"/keys/{key}/decrypt", body)


def assert_denied(resp: Response) -> None:
    assert resp.status == 403, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json
    assert body["errorName"] == "AccessDeniedException"
    msg = body["errorMessage"]
    assert len(msg) < 512 and all(0x20 <= ord(c) <= 0x7E for c in msg)
    for leak in ("Sid", "Statement", "NoStrangers", "DenyAll", "policy.json"):
        assert leak not in msg  # the deciding statement goes to the log only


def log_events(server: Server, event: str) -> list[dict[str, Any]]:
    out = []
    for line in server.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def test_one_role_encrypts_the_other_decrypts(client: XksClient) -> None:
    enc = encrypt(client, ENCRYPTOR)
    assert enc.status == 200, enc.body
    assert_denied(decrypt(client, ENCRYPTOR, enc.json))
    assert_denied(encrypt(client, DECRYPTOR))
    dec = decrypt(client, DECRYPTOR, enc.json)
    assert dec.status == 200, dec.body
    assert base64.b64decode(dec.json["plaintext"]) == b"secret data"


def test_deny_is_logged_with_its_statement(client: XksClient, authz_server: Server) -> None:
    stranger = f"arn:aws:iam::{ACCT}:role/stranger-1"
    resp = client.metadata("foo", request_meta("CreateKey", stranger))
    assert_denied(resp)
    records = [
        r for r in log_events(authz_server, "authz_deny") if r["aws_principal_arn"] == stranger
    ]
    assert records, authz_server.log_text()[-2000:]
    rec = records[-1]
    assert rec["statement"] == "NoStrangers"
    assert (rec["prefix"], rec["key_id"], rec["kms_operation"]) == (
        "example/xks",
        "foo",
        "CreateKey",
    )
    assert rec["mode"] == "enforce"
    audit = [
        r for r in log_events(authz_server, "xks_request") if r.get("aws_principal_arn") == stranger
    ]
    assert audit[-1]["status"] == 403 and audit[-1]["authz_statement"] == "NoStrangers"
    # A default deny names no statement.
    assert_denied(encrypt(client, DECRYPTOR))
    assert any(
        r["statement"] == "no statement allows" and r["aws_principal_arn"] == DECRYPTOR
        for r in log_events(authz_server, "authz_deny")
    )


def test_everyone_may_describe(client: XksClient) -> None:
    resp = client.metadata("foo", request_meta("CreateKey", f"arn:aws:iam::{ACCT}:user/anyone"))
    assert resp.status == 200, resp.body


@pytest.mark.parametrize("claimed", ["Encrypt", "GenerateDataKey", "GenerateDataKeyX", "CreateKey"])
def test_the_kms_operation_in_the_body_cannot_open_another_api(
    client: XksClient, authz_server: Server, claimed: str
) -> None:
    """The encryptor may only encrypt (kms:Encrypt, kms:GenerateDataKey*): claiming one of
    those operations, or one that kms:GenerateDataKey* matches, in a Decrypt request is denied
    (before the binding to the API, each of these decrypted)."""
    enc = encrypt(client, ENCRYPTOR)
    assert enc.status == 200, enc.body
    assert_denied(decrypt(client, ENCRYPTOR, enc.json, op=claimed))
    assert any(
        r["statement"] == "kmsOperation of another API" and r["kms_operation"] == claimed
        for r in log_events(authz_server, "authz_deny")
    )
    assert decrypt(client, DECRYPTOR, enc.json, op="ReEncrypt").status == 403  # not allowed it
    assert decrypt(client, DECRYPTOR, enc.json).status == 200


def test_unknown_operation_is_denied_never_400(client: XksClient) -> None:
    resp = client.metadata("foo", request_meta("SomeFutureOperation", ENCRYPTOR))
    assert_denied(resp)


def test_validation_comes_before_authorization(client: XksClient) -> None:
    body = {"requestMetadata": request_meta("Encrypt", DECRYPTOR), "encryptionAlgorithm": "X"}
    resp = client.call("/keys/foo/encrypt", body)
    assert resp.status == 400 and resp.error_name == "ValidationException"


def test_audit_only_allows_and_logs_would_deny(authz_rig: Rig, authz_server: Server) -> None:
    r = authz_rig
    other = XksClient(
        "127.0.0.1", authz_server.port, r.other_prefix, r.other_akid, r.other_secret, r.region
    )
    who = f"arn:aws:iam::{ACCT}:role/trial-{os.urandom(4).hex()}"
    resp = encrypt(other, who)
    assert resp.status == 200, resp.body
    records = [
        x for x in log_events(authz_server, "authz_would_deny") if x["aws_principal_arn"] == who
    ]
    assert len(records) == 1
    assert (records[0]["statement"], records[0]["mode"]) == ("DenyAll", "audit-only")
    assert records[0]["prefix"] == "tenant-b"
    assert not [x for x in log_events(authz_server, "authz_deny") if x["aws_principal_arn"] == who]


def test_decisions_are_counted(authz_rig: Rig, authz_server: Server, client: XksClient) -> None:

    encrypt(client, ENCRYPTOR)
    assert_denied(encrypt(client, DECRYPTOR))
    url = f"http://127.0.0.1:{authz_rig.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for decision in ("allow", "deny"):
        assert f'xks_authz_decisions_total{{decision="{decision}",prefix="example/xks"}}' in text
    other = XksClient(
        "127.0.0.1", authz_server.port, authz_rig.other_prefix, authz_rig.other_akid,
        authz_rig.other_secret, authz_rig.region,
    )  # fmt: skip
    assert encrypt(other, ENCRYPTOR).status == 200
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'xks_authz_decisions_total{decision="would_deny",prefix="tenant-b"}' in text


def test_sighup_applies_a_changed_policy_and_health_is_exempt(
    authz_rig: Rig, authz_server: Server, client: XksClient
) -> None:
    path = authz_rig.dir / "policy.json"
    good = path.read_text()
    try:
        path.write_text(json.dumps(DENY_ALL))
        authz_server.sighup()
        assert_denied(encrypt(client, ENCRYPTOR))
        assert_denied(client.metadata("foo", request_meta("CreateKey", ENCRYPTOR)))
        # §8 case 6: health answers under a deny-all policy, whatever the operation.
        for op in ("KmsHealthCheck", "ConnectCustomKeyStore", "SomethingNew"):
            resp = client.health(op)
            assert resp.status == 200, resp.body
    finally:
        path.write_text(good)
        authz_server.sighup()
    assert encrypt(client, ENCRYPTOR).status == 200


def test_sighup_with_a_broken_policy_keeps_the_old_one(
    authz_rig: Rig, authz_server: Server, client: XksClient
) -> None:
    path = authz_rig.dir / "policy.json"
    good = path.read_text()
    rejected = len(log_events(authz_server, "reload_rejected"))
    try:
        path.write_text(json.dumps(pol(allow(Effect="Allw"))))
        authz_server.sighup()
        records = log_events(authz_server, "reload_rejected")
        assert len(records) > rejected
        assert any("Statement[0].Effect" in p for p in records[-1]["problems"])
        # The old policy is still in force: A encrypts, B may not.
        assert encrypt(client, ENCRYPTOR).status == 200
        assert_denied(encrypt(client, DECRYPTOR))
        assert client.call("/health", {"requestMetadata": health_meta()}).status == 200
    finally:
        path.write_text(good)
        authz_server.sighup()


# ---- xksproxy policy test -----------------------------------------------------------------


def policy_test(
    rig: Rig, tmp_path: Path, body: Any, prefix: str = "example/xks", key: str = "foo",
    *more: str,
) -> Any:  # fmt: skip
    req = tmp_path / "req.json"
    req.write_text(body if isinstance(body, str) else json.dumps(body))
    return xksproxy(
        "policy", "test", "-c", str(rig.config), "--prefix", prefix, "--key-id", key,
        "--request", str(req), *more, check=False,
    )  # fmt: skip


def test_policy_test_binds_the_operation_to_the_api(authz_rig: Rig, tmp_path: Path) -> None:
    body = {"requestMetadata": request_meta("Encrypt", ENCRYPTOR)}
    proc = policy_test(authz_rig, tmp_path, body, "example/xks", "foo", "--api", "decrypt")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "statement: kmsOperation of another API" in proc.stdout
    assert "api: decrypt" in proc.stdout
    assert policy_test(authz_rig, tmp_path, body).returncode == 0  # to its own API: allowed


def test_policy_test_allow(authz_rig: Rig, tmp_path: Path) -> None:
    proc = policy_test(authz_rig, tmp_path, {"requestMetadata": request_meta("Encrypt", ENCRYPTOR)})
    assert proc.returncode == 0, proc.stderr
    assert "decision: allow" in proc.stdout and "statement: EncryptorEncrypts" in proc.stdout
    assert "mode: enforce" in proc.stdout


def test_policy_test_deny(authz_rig: Rig, tmp_path: Path) -> None:
    stranger = f"arn:aws:iam::{ACCT}:role/stranger"
    proc = policy_test(authz_rig, tmp_path, {"requestMetadata": request_meta("Encrypt", stranger)})
    assert proc.returncode == 1, proc.stderr
    assert "decision: deny" in proc.stdout and "statement: NoStrangers" in proc.stdout
    proc = policy_test(authz_rig, tmp_path, {"requestMetadata": request_meta("Decrypt", ENCRYPTOR)})
    assert proc.returncode == 1
    assert "statement: no statement allows" in proc.stdout


def test_policy_test_audit_only_reports_the_deny(authz_rig: Rig, tmp_path: Path) -> None:
    body = {"requestMetadata": request_meta("Encrypt", ENCRYPTOR)}
    proc = policy_test(authz_rig, tmp_path, body, prefix="tenant-b")
    assert proc.returncode == 1
    assert "statement: DenyAll" in proc.stdout and "audit-only" in proc.stdout


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"requestMetadata": {}}, "requestMetadata is missing or empty"),
        ({"requestMetadata": {"kmsOperation": "Encrypt", "kmsRequestId": "r"}}, "awsPrincipalArn is required"),
        ({"requestMetadata": "x"}, "requestMetadata"),
    ],
)  # fmt: skip
def test_policy_test_bad_request_file(
    authz_rig: Rig, tmp_path: Path, body: Any, message: str
) -> None:
    proc = policy_test(authz_rig, tmp_path, body)
    assert proc.returncode == 2
    assert message in proc.stderr and "--request" in proc.stderr


def test_policy_test_bad_arguments(authz_rig: Rig, tmp_path: Path) -> None:
    body = {"requestMetadata": request_meta("Encrypt", ENCRYPTOR)}
    assert policy_test(authz_rig, tmp_path, body, prefix="nope").returncode == 2
    assert policy_test(authz_rig, tmp_path, body, key="bad/key").returncode == 2
    proc = xksproxy(
        "policy", "test", "-c", str(authz_rig.config), "--prefix", "example/xks", "--key-id", "k",
        "--request", str(tmp_path / "missing.json"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_policy_test_bad_policy_is_exit_78(authz_rig: Rig, tmp_path: Path) -> None:
    cfg = tmp_path / "xksproxy.toml"
    broken = {"prefixes": {authz_rig.prefix: {"policy_file": "broken.json"}}}
    edit_config(authz_rig.config, broken, to=cfg)
    (tmp_path / "broken.json").write_text("[]")
    # Relative paths of the copy resolve in tmp_path: point the other files back at the rig.
    for name in ("tenant-b.json",):
        (tmp_path / name).write_text((authz_rig.dir / name).read_text())
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"requestMetadata": request_meta("Encrypt", ENCRYPTOR)}))
    proc = xksproxy(
        "policy", "test", "-c", str(cfg), "--prefix", "example/xks", "--key-id", "k",
        "--request", str(req), check=False,
    )  # fmt: skip
    assert proc.returncode == 78
    assert "the policy must be a JSON object" in proc.stderr
