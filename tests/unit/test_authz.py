"""Secondary authorization (docs/spec-notes.md §6, §8 cases 6 and 29; docs/authz.md): the
evaluator as a decision table, and policy-file and configuration validation.  A real proxy
enforcing policies over HTTP, and the ``policy test`` command: tests/integration/test_authz_http.py.
"""


# ruff: noqa: E501 -- the decision tables keep one case per line, to be read as a table.

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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


def test_config_loads_policy_relative_to_config_file(tmp_path: Path) -> None:
    (tmp_path / "pol.json").write_text(json.dumps(ROLES))
    cfg = load_config(prefix_config(tmp_path, {"policy_file": "pol.json"}))
    prefix = cfg.prefix("t")
    assert prefix.policy_file == tmp_path / "pol.json"
    assert prefix.policy is not None and prefix.policy.mode == "enforce"
    cfg = load_config(
        prefix_config(tmp_path, {"policy_file": "pol.json", "policy_mode": "audit-only"})
    )
    assert cfg.prefix("t").policy is not None
    assert cfg.prefix("t").policy.mode == "audit-only"  # type: ignore[union-attr]
    assert load_config(prefix_config(tmp_path, {"enabled": True})).prefix("t").policy is None


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"policy_file": "missing.json"}, 'prefixes."t".policy_file: cannot read'),
        ({"policy_file": "pol.json", "policy_mode": "log"}, 'prefixes."t".policy_mode: must be'),
        ({"policy_mode": "enforce"}, 'prefixes."t".policy_mode: has no effect without'),
        ({"policy_file": ""}, 'prefixes."t".policy_file: must not be empty'),
        ({"policy": 1}, 'prefixes."t".policy: unknown setting'),
        ({"policy_file": "bad.json"}, 'prefixes."t".policy_file: '),
    ],
    ids=["missing", "bad-mode", "mode-alone", "empty", "unknown", "bad-policy"],
)
def test_config_policy_problems(tmp_path: Path, settings: dict[str, Any], problem: str) -> None:
    (tmp_path / "pol.json").write_text(json.dumps(ROLES))
    (tmp_path / "bad.json").write_text(json.dumps(pol(allow(Effect="Perhaps"))))
    with pytest.raises(ConfigError) as err:
        load_config(prefix_config(tmp_path, settings))
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


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
