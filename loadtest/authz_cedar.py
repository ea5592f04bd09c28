"""The same authorization decisions as ``loadtest/authz_cost.py``, made by cedarpy.

The 10-statement key policy of ``authz_cost.py`` written as 10 Cedar ``forbid``/``permit``
policies (Cedar's ``like`` has no ``?``: ``shared-??`` became ``shared-*``), and the same three
requests (allowed by the first Allow, allowed by a late statement with conditions, denied by
default). Each decision is asserted, then the best of 5 ``timeit`` runs is printed, in
microseconds per request, three ways:

* ``is_authorized(request, policy_text, entities)``: 5,000 calls, the policy text parsed
  on every call;
* ``batch``: ``is_authorized_batch`` of 1000 requests, 20 calls (policy text parsed once per
  batch: an amortised lower bound);
* ``parsed-once``: ``is_authorized(request, PolicySet, entities)``, 5,000 calls, the policy set
  parsed once at load and only the request and its two entities passed per call, as a proxy
  would.

cedarpy is never a project dependency: install it in a throwaway venv and run from the
repository root (this module imports nothing from ``xksproxy``)::

    python3 -m venv /tmp/cedar-venv && /tmp/cedar-venv/bin/pip install cedarpy
    /tmp/cedar-venv/bin/python -m loadtest.authz_cedar
"""

import timeit
from typing import Any

import cedarpy  # type: ignore[import-not-found]

ACCT = "111122223333"
ROLE = f"arn:aws:iam::{ACCT}:role"
USER = f"arn:aws:iam::{ACCT}:user"
# Built from short pieces; the text is exactly the one the figures in docs/authz.md came from.
POLICIES = (
    "\n"
    "forbid(principal, action, resource) when"
    ' { !(["us-east-1","eu-west-1"].contains(context.keyRegion)) };\n'
    f'forbid(principal, action, resource) when {{ context.keyAccount != "{ACCT}" }};\n'
    "forbid(principal, action in"
    ' [Action::"Encrypt", Action::"GenerateDataKey", Action::"GenerateDataKeyWithoutPlaintext"],'
    ' resource) when { resource.id like "legacy-*" };\n'
    "permit(principal, action in"
    ' [Action::"Encrypt", Action::"GenerateDataKey", Action::"GenerateDataKeyWithoutPlaintext",'
    ' Action::"ReEncrypt"], resource)\n'
    f'  when {{ principal.arn like "{ROLE}/app-*"'
    ' && (resource.id like "app-*" || resource.id like "shared-*") };\n'
    'permit(principal, action == Action::"Decrypt", resource)\n'
    f'  when {{ principal.arn like "{ROLE}/app-reader-*" && resource.id like "app-*" }};\n'
    "permit(principal, action in"
    ' [Action::"Encrypt", Action::"Decrypt", Action::"GenerateDataKeyWithoutPlaintext"],'
    " resource)\n"
    f'  when {{ (principal.arn like "{ROLE}/ebs-*" || principal.arn like "{USER}/ops-*")\n'
    '          && resource.id like "ebs-*" && context has viaService'
    ' && context.viaService == "ebs" };\n'
    "permit(principal, action, resource)\n"
    f'  when {{ principal.arn like "{ROLE}/batch-*" && resource.id like "batch-*"\n'
    '          && context has sourceVpce && context.sourceVpce like "vpce-0a1b*"'
    ' && context has sourceVpc && context.sourceVpc == "vpc-1234" };\n'
    'permit(principal, action in [Action::"CreateKey", Action::"DescribeKey"], resource)\n'
    f'  when {{ principal.arn == "{ROLE}/kms-admin" }};\n'
    'permit(principal, action == Action::"DescribeKey", resource)\n'
    f'  when {{ principal.arn like "{ROLE}/audit-*" }};\n'
    'permit(principal, action == Action::"Decrypt", resource)\n'
    f'  when {{ principal.arn == "{ROLE}/backup"'
    ' && (resource.id like "backup-*" || resource.id like "app-*")\n'
    '          && !(context has viaService && context.viaService like "s3*") };\n'
)

Request = dict[str, Any]
Entities = list[dict[str, Any]]


def request(op: str, principal: str, key: str, via: str | None = None) -> tuple[Request, Entities]:
    ctx = {"keyAccount": ACCT, "keyRegion": "us-east-1"}
    if via:
        ctx["viaService"] = via
    entities: Entities = [
        {"uid": {"type": "Principal", "id": principal}, "attrs": {"arn": principal}, "parents": []},
        {"uid": {"type": "Key", "id": key}, "attrs": {"id": key}, "parents": []},
    ]
    req: Request = {
        "principal": f'Principal::"{principal}"',
        "action": f'Action::"{op}"',
        "resource": f'Key::"{key}"',
        "context": ctx,
    }
    return req, entities


# name -> ((request, entities), expected decision)
REQUESTS: dict[str, tuple[tuple[Request, Entities], str]] = {
    "allow_first_allow": (
        request("Encrypt", f"arn:aws:iam::{ACCT}:role/app-writer", "app-orders"),
        "Allow",
    ),
    "allow_late_with_conditions": (
        request("Decrypt", f"arn:aws:iam::{ACCT}:role/backup", "backup-7", "ebs"),
        "Allow",
    ),
    "default_deny": (
        request("Decrypt", f"arn:aws:iam::{ACCT}:role/stranger", "app-orders"),
        "Deny",
    ),
}

# The loop variables of the timed callables below are bound as default arguments (typed
# nested functions rather than lambdas: mypy cannot infer a lambda with default arguments).
if __name__ == "__main__":
    n = 5_000
    for name, ((req, ents), want) in REQUESTS.items():
        got = cedarpy.is_authorized(req, POLICIES, ents)
        assert got.decision.value == want, (name, got.decision, got.diagnostics.errors)

        def call_text(req: Request = req, ents: Entities = ents) -> Any:
            return cedarpy.is_authorized(req, POLICIES, ents)

        best = min(timeit.repeat(call_text, number=n, repeat=5)) / n
        print(f"{name:28s} {best * 1e6:8.2f} us/request")
    # Lower bound: one call for a batch of 1000 requests parses the policy set once.
    for name, ((req, ents), _want) in REQUESTS.items():
        batch = [req] * 1000

        def call_batch(batch: list[Request] = batch, ents: Entities = ents) -> Any:
            return cedarpy.is_authorized_batch(batch, POLICIES, ents)

        best = min(timeit.repeat(call_batch, number=20, repeat=5)) / 20 / 1000
        print(f"batch {name:22s} {best * 1e6:8.2f} us/request")
    # The fair hot path: the policy set parsed once at load (PolicySet); per request only the
    # request and its two entities (principal, key) are passed, as a proxy would.
    ps = cedarpy.PolicySet.from_str(POLICIES)
    for name, ((req, ents), want) in REQUESTS.items():
        assert cedarpy.is_authorized(req, ps, ents).decision.value == want

        def call_parsed(req: Request = req, ents: Entities = ents) -> Any:
            return cedarpy.is_authorized(req, ps, ents)

        best = min(timeit.repeat(call_parsed, number=n, repeat=5)) / n
        print(f"parsed-once {name:16s} {best * 1e6:8.2f} us/request")
