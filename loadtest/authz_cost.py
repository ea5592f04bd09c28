"""Per-request cost of ``xksproxy.authz.evaluate`` (measurement, not a test).

Compiles a 10-statement key policy (3 Deny with Region/account conditions and a key wildcard,
7 Allow with principal/key/action wildcards and ViaService/SourceVpc/SourceVpce conditions)
once, asserts each decision, then prints the best of 5 ``timeit`` runs of 200,000
``evaluate`` calls, in microseconds per request, for three requests: allowed by the first
Allow, allowed by a late statement with conditions, and denied by default. The Cedar
counterpart is ``loadtest/authz_cedar.py``; the figures are quoted in ``docs/authz.md``.

Run from the repository root, in the project's venv::

    python -m loadtest.authz_cost
"""

import timeit
from typing import Any

from xksproxy.authz import Decision, evaluate, parse_policy
from xksproxy.models import RequestMetadata

ACCT = "111122223333"
POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "DenyOutsideRegion",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "kms:*",
            "Resource": "*",
            "Condition": {"StringNotEquals": {"kms:KeyRegion": ["us-east-1", "eu-west-1"]}},
        },
        {
            "Sid": "DenyOtherAccounts",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "kms:*",
            "Resource": "*",
            "Condition": {"StringNotEquals": {"kms:KeyAccount": ACCT}},
        },
        {
            "Sid": "DenyLegacyKeys",
            "Effect": "Deny",
            "Principal": "*",
            "Action": ["kms:Encrypt", "kms:GenerateDataKey*"],
            "Resource": "legacy-*",
        },
        {
            "Sid": "AppEncrypt",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/app-*"},
            "Action": ["kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt"],
            "Resource": ["app-*", "shared-??"],
        },
        {
            "Sid": "AppDecrypt",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/app-reader-*"},
            "Action": "kms:Decrypt",
            "Resource": "app-*",
        },
        {
            "Sid": "EbsViaService",
            "Effect": "Allow",
            "Principal": {
                "AWS": [f"arn:aws:iam::{ACCT}:role/ebs-*", f"arn:aws:iam::{ACCT}:user/ops-?"]
            },
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKeyWithoutPlaintext"],
            "Resource": "ebs-*",
            "Condition": {"StringEquals": {"kms:ViaService": "ebs"}},
        },
        {
            "Sid": "VpcOnly",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/batch-*"},
            "Action": "kms:*",
            "Resource": "batch-*",
            "Condition": {
                "StringLike": {"aws:SourceVpce": "vpce-0a1b*"},
                "StringEquals": {"aws:SourceVpc": "vpc-1234"},
            },
        },
        {
            "Sid": "Admins",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/kms-admin"},
            "Action": ["kms:CreateKey", "kms:DescribeKey"],
            "Resource": "*",
        },
        {
            "Sid": "Auditors",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/audit-*"},
            "Action": "kms:DescribeKey",
            "Resource": "*",
        },
        {
            "Sid": "Backup",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/backup"},
            "Action": "kms:Decrypt",
            "Resource": ["backup-*", "app-*"],
            "Condition": {"StringNotLike": {"kms:ViaService": "s3*"}},
        },
    ],
}


def meta(
    op: str,
    principal: str,
    via: str | None = None,
    vpc: str | None = None,
    vpce: str | None = None,
) -> RequestMetadata:
    return RequestMetadata(
        kms_request_id="5112f4d6-db54-4af4-ae30-c55a22a8dfae",
        kms_operation=op,
        aws_principal_arn=principal,
        kms_key_arn=f"arn:aws:kms:us-east-1:{ACCT}:key/a1b2c3d4-5678-90ab-cdef-EXAMPLE11111",
        kms_via_service=via,
        aws_source_vpc=vpc,
        aws_source_vpce=vpce,
    )


# name -> (key id, metadata, expected decision)
REQUESTS: dict[str, tuple[str, RequestMetadata, str]] = {
    "allow_first_allow": (
        "app-orders",
        meta("Encrypt", f"arn:aws:iam::{ACCT}:role/app-writer"),
        "allow",
    ),
    "allow_late_with_conditions": (
        "backup-7",
        meta("Decrypt", f"arn:aws:iam::{ACCT}:role/backup", via="ebs"),
        "allow",
    ),
    "default_deny": ("app-orders", meta("Decrypt", f"arn:aws:iam::{ACCT}:role/stranger"), "deny"),
}

if __name__ == "__main__":
    problems: list[str] = []
    policy = parse_policy(POLICY, "enforce", "bench", problems)
    assert not problems, problems
    n = 200_000
    for name, (key, m, want) in REQUESTS.items():
        api = "encrypt" if m.kms_operation == "Encrypt" else "decrypt"
        assert evaluate(policy, key, m, api=api).decision == want, name

        # The loop variables are bound as default arguments (a typed lambda, in effect).
        def call(key: str = key, m: RequestMetadata = m, api: str = api) -> Decision:
            return evaluate(policy, key, m, api=api)

        best = min(timeit.repeat(call, number=n, repeat=5)) / n
        print(f"{name:28s} {best * 1e6:6.2f} us/request")
