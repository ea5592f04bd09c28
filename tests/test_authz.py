"""Secondary authorization (docs/spec-notes.md §6, §8 cases 6 and 29; docs/authz.md).

The evaluator as a decision table, policy-file validation, a real proxy enforcing policies over
HTTP (with SIGHUP reloads), and the ``policy test`` command.
"""

# ruff: noqa: E501 -- the decision tables keep one case per line, to be read as a table.

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Rig, Server, free_port, make_rig, start_server, stop_server, xksproxy
from tests.xks_client import Response, XksClient, health_meta
from xksproxy import authz
from xksproxy.authz import (
    API_OPERATIONS,
    HEALTH_EXEMPT,
    NO_POLICY,
    NO_STATEMENT,
    NOT_LISTED,
    NOT_OF_API,
    Admission,
    Decision,
    Policy,
    evaluate,
    key_arn_parts,
    load_policy,
    parse_key_list,
    parse_policy,
)
from xksproxy.configfile import load_config
from xksproxy.errors import ConfigError
from xksproxy.models import RequestMetadata

ACCT = "123456789012"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCT}:key/a1b2c3d4-5678-90ab-cdef-EXAMPLE11111"
ENCRYPTOR = f"arn:aws:iam::{ACCT}:role/encryptor"
DECRYPTOR = f"arn:aws:iam::{ACCT}:role/decryptor"


def compile_policy(data: Any, mode: str = "enforce") -> Policy:
    problems: list[str] = []
    policy = parse_policy(data, mode, "test", problems)
    assert not problems, problems
    return policy


def meta(
    op: str = "Encrypt", principal: str | None = ENCRYPTOR, **kw: str | None
) -> RequestMetadata:
    fields: dict[str, Any] = {"kms_key_arn": KEY_ARN}
    fields.update(kw)
    return RequestMetadata(
        kms_request_id="r-1", kms_operation=op, aws_principal_arn=principal, **fields
    )


def api_of(m: RequestMetadata) -> str:
    """The key API a documented kmsOperation is sent to (ReEncrypt: encrypt, of its two);
    encrypt for an undocumented one."""
    return next((api for api, ops in API_OPERATIONS.items() if m.kms_operation in ops), "encrypt")


def allow(**kw: Any) -> dict[str, Any]:
    st = {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}
    st.update(kw)
    return st


def deny(**kw: Any) -> dict[str, Any]:
    return allow(Effect="Deny", **kw)


def pol(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


ROLES = pol(
    allow(Sid="Enc", Principal={"AWS": ENCRYPTOR}, Action=["kms:Encrypt", "kms:GenerateDataKey*"]),
    allow(Sid="Dec", Principal={"AWS": DECRYPTOR}, Action="kms:Decrypt"),
)
VIA = {"kms_via_service": "ebs", "aws_source_vpc": "vpc-1", "aws_source_vpce": "vpce-1"}

# (name, policy, key id, request metadata, expected decision, expected deciding statement)
TABLE: list[tuple[str, dict[str, Any], str, RequestMetadata, str, str]] = [
    ("allow", ROLES, "k", meta("Encrypt", ENCRYPTOR), "allow", "Enc"),
    ("allow other role", ROLES, "k", meta("Decrypt", DECRYPTOR), "allow", "Dec"),
    ("deny: role A may not decrypt", ROLES, "k", meta("Decrypt", ENCRYPTOR), "deny", NO_STATEMENT),
    ("deny: role B may not encrypt", ROLES, "k", meta("Encrypt", DECRYPTOR), "deny", NO_STATEMENT),
    ("action wildcard", ROLES, "k", meta("GenerateDataKeyWithoutPlaintext"), "allow", "Enc"),
    ("action case-insensitive", pol(allow(Sid="A", Action="KMS:encrypt")), "k", meta(), "allow", "A"),
    ("principal wildcard", pol(allow(Sid="A", Principal={"AWS": "arn:aws:iam::*:role/enc*"})), "k", meta(), "allow", "A"),
    ("principal ? wildcard", pol(allow(Sid="A", Principal={"AWS": ["x", "arn:aws:iam::123456789012:role/?ncryptor"]})), "k", meta(), "allow", "A"),
    ("principal no match", pol(allow(Sid="A", Principal={"AWS": "arn:aws:iam::*:role/other"})), "k", meta(), "deny", NO_STATEMENT),
    ("service principal literal", pol(allow(Sid="A", Principal={"AWS": "AWS Internal"})), "k", meta(principal="AWS Internal"), "allow", "A"),
    ("key wildcard", pol(allow(Sid="A", Resource="app-*")), "app-1", meta(), "allow", "A"),
    ("key ? wildcard", pol(allow(Sid="A", Resource="app-?")), "app-12", meta(), "deny", NO_STATEMENT),
    ("key literal list", pol(allow(Sid="A", Resource=["a", "b.c"])), "b.c", meta(), "allow", "A"),
    ("key case-sensitive", pol(allow(Sid="A", Resource="App")), "app", meta(), "deny", NO_STATEMENT),
    ("explicit deny wins", pol(allow(Sid="A"), deny(Sid="D", Resource="secret-*")), "secret-1", meta(), "deny", "D"),
    ("deny before allow in file order too", pol(deny(Sid="D"), allow(Sid="A")), "k", meta(), "deny", "D"),
    ("deny without Sid named by index", pol(allow(Sid="A"), deny()), "k", meta(), "deny", "Statement[1]"),
    ("allow without Sid named by index", pol(allow()), "k", meta(), "allow", "Statement[0]"),
    ("default deny", pol(allow(Sid="A", Resource="other")), "k", meta(), "deny", NO_STATEMENT),
    ("unknown operation allowed by kms:*", pol(allow(Sid="A")), "k", meta("FutureOp"), "allow", "A"),
    ("unknown operation denied by kms:*", pol(allow(Sid="A"), deny(Sid="D", Action="kms:*", Resource="x*")), "x1", meta("FutureOp"), "deny", "D"),
    ("unknown operation not matched by a literal", pol(allow(Sid="A", Action="kms:Encrypt")), "k", meta("FutureOp"), "deny", NO_STATEMENT),
    ("ViaService equals", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "ebs"}})), "k", meta(**VIA), "allow", "A"),
    ("ViaService differs", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "s3"}})), "k", meta(**VIA), "deny", NO_STATEMENT),
    ("ViaService absent vs StringEquals", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "ebs"}})), "k", meta(), "deny", NO_STATEMENT),
    ("ViaService absent vs StringLike *", pol(allow(Sid="A", Condition={"StringLike": {"kms:ViaService": "*"}})), "k", meta(), "deny", NO_STATEMENT),
    ("ViaService absent vs StringNotEquals", pol(allow(Sid="A", Condition={"StringNotEquals": {"kms:ViaService": "ebs"}})), "k", meta(), "allow", "A"),
    ("ViaService absent vs StringNotLike", pol(allow(Sid="A", Condition={"StringNotLike": {"kms:ViaService": "e*"}})), "k", meta(), "allow", "A"),
    ("StringNotEquals any of a list", pol(allow(Sid="A", Condition={"StringNotEquals": {"kms:ViaService": ["s3", "ebs"]}})), "k", meta(**VIA), "deny", NO_STATEMENT),
    ("condition key case-insensitive", pol(allow(Sid="A", Condition={"StringEquals": {"KMS:VIASERVICE": "ebs"}})), "k", meta(**VIA), "allow", "A"),
    ("StringEquals takes * literally", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "e*"}})), "k", meta(**VIA), "deny", NO_STATEMENT),
    ("SourceVpc", pol(allow(Sid="A", Condition={"StringEquals": {"aws:SourceVpc": "vpc-1"}})), "k", meta(**VIA), "allow", "A"),
    ("SourceVpc absent", pol(allow(Sid="A", Condition={"StringEquals": {"aws:SourceVpc": "vpc-1"}})), "k", meta(), "deny", NO_STATEMENT),
    ("SourceVpce like", pol(allow(Sid="A", Condition={"StringLike": {"aws:SourceVpce": "vpce-?"}})), "k", meta(**VIA), "allow", "A"),
    ("deny outside VPC endpoint", pol(allow(Sid="A"), deny(Sid="D", Condition={"StringNotLike": {"aws:SourceVpce": "vpce-*"}})), "k", meta(), "deny", "D"),
    ("KeyAccount from kmsKeyArn", pol(allow(Sid="A", Condition={"StringEquals": {"kms:KeyAccount": ACCT}})), "k", meta(), "allow", "A"),
    ("KeyAccount other", pol(allow(Sid="A"), deny(Sid="D", Condition={"StringNotEquals": {"kms:KeyAccount": "999999999999"}})), "k", meta(), "deny", "D"),
    ("KeyRegion from kmsKeyArn", pol(allow(Sid="A", Condition={"StringLike": {"kms:KeyRegion": "us-*"}})), "k", meta(), "allow", "A"),
    ("KeyRegion other", pol(allow(Sid="A", Condition={"StringEquals": {"kms:KeyRegion": "eu-west-1"}})), "k", meta(), "deny", NO_STATEMENT),
    ("kmsKeyArn absent (GetKeyMetadata)", pol(allow(Sid="A", Condition={"StringEquals": {"kms:KeyRegion": "us-east-1"}})), "k", meta("CreateKey", kms_key_arn=None), "deny", NO_STATEMENT),
    ("all conditions must hold", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "ebs", "aws:SourceVpc": "vpc-2"}})), "k", meta(**VIA), "deny", NO_STATEMENT),
    ("all operators must hold", pol(allow(Sid="A", Condition={"StringEquals": {"kms:ViaService": "ebs"}, "StringLike": {"aws:SourceVpc": "vpc-*"}})), "k", meta(**VIA), "allow", "A"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "key_id", "request_meta", "decision", "statement"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_decision_table(
    policy: dict[str, Any],
    key_id: str,
    request_meta: RequestMetadata,
    decision: str,
    statement: str,
) -> None:
    got = evaluate(compile_policy(policy), key_id, request_meta, api=api_of(request_meta))
    assert (got.decision, got.statement) == (decision, statement)
    assert got.allowed is (decision == "allow")


def test_policy_test_takes_the_api_a_kms_operation_is_sent_to() -> None:
    assert [authz.api_of(op) for op in ("CreateKey", "ReEncrypt", "Decrypt")] == [
        "metadata",
        "encrypt",
        "decrypt",
    ]
    assert authz.api_of("KmsHealthCheck") == authz.api_of("ConnectCustomKeyStore") == "health"
    assert authz.api_of("SomethingNew") == authz.api_of(None) == "metadata"


def test_admission_is_health_then_key_list_then_policy() -> None:
    """The one rule the handler and ``policy test`` share (Admission.admit)."""
    roles = compile_policy(ROLES)
    listed = parse_key_list(["k-*"], "test", [])
    assert listed is not None
    both = Admission(listed, roles)
    assert both.admit("other", meta(), api="health") is HEALTH_EXEMPT  # never evaluated
    assert both.admit("other", meta(), api="encrypt") is NOT_LISTED
    assert not NOT_LISTED.allowed
    assert both.admit("k-1", meta("Decrypt"), api="decrypt") == Decision("deny", NO_STATEMENT)
    assert both.admit("k-1", meta("Encrypt"), api="encrypt") == Decision("allow", "Enc")
    assert Admission(listed, None).admit("k-1", meta(), api="encrypt") is NO_POLICY
    assert Admission(None, None).admit("anything", meta(), api="decrypt").allowed


@pytest.mark.parametrize(
    ("name", "policy", "key_id", "request_meta", "decision", "statement"),
    TABLE,
    ids=[t[0] for t in TABLE],
)
def test_audit_only_lets_every_would_deny_through(
    name: str,
    policy: dict[str, Any],
    key_id: str,
    request_meta: RequestMetadata,
    decision: str,
    statement: str,
) -> None:
    got = evaluate(
        compile_policy(policy, "audit-only"), key_id, request_meta, api=api_of(request_meta)
    )
    assert got.decision == ("allow" if decision == "allow" else "would_deny")
    assert got.statement == statement
    assert got.allowed


@pytest.mark.parametrize(
    ("arn", "parts"),
    [
        (KEY_ARN, (ACCT, "us-east-1")),
        ("arn:aws:kms:us-east-1:123456789012:/key/x", (ACCT, "us-east-1")),  # the spec's example
        ("arn:aws-cn:kms:cn-north-1:111122223333:key/x", ("111122223333", "cn-north-1")),
        ("not an arn", (None, None)),
        ("arn:aws:kms", (None, None)),
        (None, (None, None)),
    ],
)
def test_account_and_region_from_key_arn(
    arn: str | None, parts: tuple[str | None, str | None]
) -> None:
    assert key_arn_parts(arn) == parts


# ---- policy files: each problem is a ConfigError naming its path --------------------------

BAD_POLICIES: list[tuple[str, Any, str]] = [
    ("not an object", [], "the policy must be a JSON object"),
    ("unknown top field", {"Statement": [allow()], "Id": "x"}, "Id: unknown field"),
    ("bad version", {"Version": "2008-10-17", "Statement": [allow()]}, "Version: must be"),
    ("no statements", {"Statement": []}, "Statement: required, a non-empty list"),
    ("missing statements", {"Version": "2012-10-17"}, "Statement: required"),
    ("statement not object", {"Statement": ["x"]}, "Statement[0]: must be an object"),
    ("unknown statement field", pol(allow(NotAction="kms:Decrypt")), "Statement[0].NotAction: unknown field"),
    ("bad effect", pol(allow(Effect="allow")), 'Statement[0].Effect: required, "Allow" or "Deny"'),
    ("missing effect", {"Statement": [{"Principal": "*", "Action": "kms:*", "Resource": "*"}]}, "Statement[0].Effect"),
    ("missing principal", {"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}, "Statement[0].Principal: required"),
    ("bad principal", pol(allow(Principal={"Service": "ebs.amazonaws.com"})), "Statement[0].Principal"),
    ("empty principal list", pol(allow(Principal={"AWS": []})), "Statement[0].Principal.AWS: must be"),
    ("missing action", {"Statement": [{"Effect": "Allow", "Principal": "*", "Resource": "*"}]}, "Statement[0].Action: required"),
    ("action without kms:", pol(allow(Action="Encrypt")), "Statement[0].Action: 'Encrypt' is not kms:"),
    ("action typo", pol(allow(Action="kms:Encrpyt")), "Statement[0].Action: 'kms:Encrpyt' is no kmsOperation"),
    ("action not string", pol(allow(Action=[1])), "Statement[0].Action: 1 is not"),
    ("missing resource", {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}, "Statement[0].Resource: required"),
    ("resource is an arn", pol(allow(Resource="arn:aws:kms:*")), "Statement[0].Resource: 'arn:aws:kms:*' is not an external key id"),
    ("bad sid", pol(allow(Sid="no spaces")), "Statement[0].Sid: must be"),
    ("duplicate sid", pol(allow(Sid="A"), allow(Sid="A")), "Statement[1].Sid: 'A' is used twice"),
    ("bad operator", pol(allow(Condition={"StringEqualsIgnoreCase": {"kms:ViaService": "x"}})), "Statement[0].Condition.StringEqualsIgnoreCase: unknown operator"),
    ("bad condition key", pol(allow(Condition={"StringEquals": {"aws:PrincipalTag/x": "x"}})), "Statement[0].Condition.StringEquals.aws:PrincipalTag/x: unknown condition key"),
    ("empty operator block", pol(allow(Condition={"StringEquals": {}})), "Statement[0].Condition.StringEquals: must be a non-empty object"),
    ("condition not object", pol(allow(Condition=["x"])), "Statement[0].Condition: must be an object"),
    ("second statement bad", pol(allow(), allow(Effect="Maybe")), "Statement[1].Effect"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "problem"), [b[1:] for b in BAD_POLICIES], ids=[b[0] for b in BAD_POLICIES]
)
def test_bad_policy_is_a_config_problem_with_its_path(
    tmp_path: Path, data: Any, problem: str
) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_policy(path, "enforce", 'prefixes."t".policy_file')
    assert any(
        p.startswith(f'prefixes."t".policy_file: {path}: ') and problem in p
        for p in err.value.problems
    ), err.value.problems


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "is not valid JSON"),
        ('{"Statement": [], "Statement": []}', "appears twice"),
        (None, "cannot read"),
    ],
)
def test_unreadable_policy_file(tmp_path: Path, text: str | None, problem: str) -> None:
    path = tmp_path / "p.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path, "enforce", "where")
    assert problem in err.value.problems[0] and err.value.problems[0].startswith("where: ")


def write_config(tmp_path: Path, prefix_lines: str) -> Path:
    (tmp_path / "libfake-pkcs11.so").write_bytes(b"\x7fELF")
    cfg = tmp_path / "xksproxy.toml"
    cfg.write_text(
        '[[hsms]]\nname = "h"\nmodule = "libfake-pkcs11.so"\ntoken_label = "t"\n'
        'pin_env = "PIN"\n\n[prefixes."t"]\n' + prefix_lines
    )
    return cfg


def test_config_loads_policy_relative_to_config_file(tmp_path: Path) -> None:
    (tmp_path / "pol.json").write_text(json.dumps(ROLES))
    cfg = load_config(write_config(tmp_path, 'policy_file = "pol.json"\n'))
    prefix = cfg.prefix("t")
    assert prefix.policy_file == tmp_path / "pol.json"
    assert prefix.policy is not None and prefix.policy.mode == "enforce"
    cfg = load_config(
        write_config(tmp_path, 'policy_file = "pol.json"\npolicy_mode = "audit-only"\n')
    )
    assert cfg.prefix("t").policy is not None
    assert cfg.prefix("t").policy.mode == "audit-only"  # type: ignore[union-attr]
    assert load_config(write_config(tmp_path, "enabled = true\n")).prefix("t").policy is None


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ('policy_file = "missing.json"\n', 'prefixes."t".policy_file: cannot read'),
        ('policy_file = "pol.json"\npolicy_mode = "log"\n', 'prefixes."t".policy_mode: must be'),
        ('policy_mode = "enforce"\n', 'prefixes."t".policy_mode: has no effect without'),
        ('policy_file = ""\n', 'prefixes."t".policy_file: must not be empty'),
        ("policy = 1\n", 'prefixes."t".policy: unknown setting'),
        ('policy_file = "bad.json"\n', 'prefixes."t".policy_file: '),
    ],
)
def test_config_policy_problems(tmp_path: Path, lines: str, problem: str) -> None:
    (tmp_path / "pol.json").write_text(json.dumps(ROLES))
    (tmp_path / "bad.json").write_text(json.dumps(pol(allow(Effect="Perhaps"))))
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, lines))
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_serve_exits_78_on_a_bad_policy(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"Statement": []}))
    proc = xksproxy(
        "serve", "-c", str(write_config(tmp_path, 'policy_file = "bad.json"\n')), check=False
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
    rig = make_rig(tmp_path_factory.mktemp("authz-rig"), free_port())
    (rig.dir / "policy.json").write_text(json.dumps(HTTP_POLICY))
    (rig.dir / "tenant-b.json").write_text(json.dumps(DENY_ALL))
    with rig.config.open("a") as f:
        f.write(f'\n[prefixes."{rig.prefix}"]\npolicy_file = "policy.json"\n')
        f.write(f'\n[prefixes."{rig.other_prefix}"]\npolicy_file = "tenant-b.json"\n')
        f.write('policy_mode = "audit-only"\n')
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
    import urllib.request

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
    cfg.write_text(authz_rig.config.read_text().replace('"policy.json"', '"broken.json"'))
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


# ---- the kmsOperation narrows, never widens: bound to the API called -----------------------

ENCRYPT_ONLY = pol(allow(Sid="Enc", Action=["kms:Encrypt", "kms:GenerateDataKey*"]))
BINDING = [
    # (name, policy, api, operation, decision, statement)
    ("Encrypt claimed on decrypt", ENCRYPT_ONLY, "decrypt", "Encrypt", "deny", NOT_OF_API),
    ("GenerateDataKey claimed on decrypt", ENCRYPT_ONLY, "decrypt", "GenerateDataKey", "deny", NOT_OF_API),
    ("Decrypt claimed on encrypt", pol(allow(Sid="A")), "encrypt", "Decrypt", "deny", NOT_OF_API),
    ("CreateKey claimed on encrypt", pol(allow(Sid="A")), "encrypt", "CreateKey", "deny", NOT_OF_API),
    ("health operation on metadata", pol(allow(Sid="A")), "metadata", "KmsHealthCheck", "deny", NOT_OF_API),
    ("ReEncrypt on encrypt", pol(allow(Sid="R", Action="kms:ReEncrypt")), "encrypt", "ReEncrypt", "allow", "R"),
    ("ReEncrypt on decrypt", pol(allow(Sid="R", Action="kms:ReEncrypt")), "decrypt", "ReEncrypt", "allow", "R"),
    ("DescribeKey on metadata", pol(allow(Sid="D", Action="kms:DescribeKey")), "metadata", "DescribeKey", "allow", "D"),
    ("unknown, matched by a wildcard, on decrypt", ENCRYPT_ONLY, "decrypt", "GenerateDataKeyX", "deny", NOT_OF_API),
    ("unknown, on encrypt, the API's all allowed", pol(allow(Sid="A", Action=["kms:Encrypt", "kms:ReEncrypt", "kms:GenerateDataKey*"])), "encrypt", "GenerateDataKeyX", "allow", "A"),
    ("unknown, on encrypt, ReEncrypt not allowed", ENCRYPT_ONLY, "encrypt", "GenerateDataKeyX", "deny", NOT_OF_API),
    ("unknown under kms:*", pol(allow(Sid="A")), "decrypt", "FutureOp", "allow", "A"),
    ("unknown, an explicit deny of the API's operation", pol(allow(Sid="A"), deny(Sid="D", Action="kms:Decrypt")), "decrypt", "FutureOp", "deny", NOT_OF_API),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "api", "operation", "decision", "statement"),
    [b[1:] for b in BINDING],
    ids=[b[0] for b in BINDING],
)
@pytest.mark.parametrize("mode", ["enforce", "audit-only"])
def test_the_operation_is_bound_to_the_api(
    policy: dict[str, Any], api: str, operation: str, decision: str, statement: str, mode: str
) -> None:
    got = evaluate(compile_policy(policy, mode), "k", meta(operation), api=api)
    want = decision if mode == "enforce" or decision == "allow" else "would_deny"
    assert (got.decision, got.statement) == (want, statement)
