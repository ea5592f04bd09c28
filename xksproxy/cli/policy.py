"""``policy test``: a prefix's admission rule simulated on a request body."""

from __future__ import annotations

import argparse
from pathlib import Path

from xksproxy.cli.common import EX_FAIL, CliError, config_of, prefix_arg


def cmd_policy_test(args: argparse.Namespace) -> int:
    """Simulate a prefix's policy on a request body: exit 0 allow, 1 deny (docs/authz.md)."""
    from xksproxy.authz import HEALTH_EXEMPT, NO_POLICY, NOT_LISTED, api_of
    from xksproxy.errors import ValidationError
    from xksproxy.models import KEY_ID_RE, parse_body, parse_metadata
    from xksproxy.tenancy import admission_in

    config = config_of(args)
    prefix = prefix_arg(args.prefix)
    if not KEY_ID_RE.fullmatch(args.key_id):  # the key ids the API's paths take
        raise CliError(f"--key-id {args.key_id!r}: 1-128 characters of A-Z a-z 0-9 . _ -", 2)
    if prefix not in config.prefixes:
        raise CliError(f'--prefix {prefix!r}: {config.path} has no [prefixes."{prefix}"]', 2)
    try:
        body = Path(args.request).read_bytes()
    except OSError as exc:
        raise CliError(f"--request {args.request}: cannot read: {exc.strerror}", 2) from exc
    try:
        data = parse_body(body)
        op = data.get("requestMetadata", {}).get("kmsOperation")
        api = args.api or api_of(op)
        meta = parse_metadata(data, api)
    except (ValidationError, AttributeError) as exc:
        why = exc.message if isinstance(exc, ValidationError) else "requestMetadata is no object"
        raise CliError(f"--request {args.request}: {why}", 2) from exc
    policy = config.prefixes[prefix].policy
    decision = admission_in(config, prefix).admit(args.key_id, meta, api=api)
    lines = {
        "prefix": prefix,
        "key id": args.key_id,
        "api": api,
        "operation": meta.kms_operation,
        "principal": meta.aws_principal_arn,
    }
    verdict = "allow" if decision.decision == "allow" else "deny"
    statement, mode = decision.statement, "-"
    if decision is NOT_LISTED:
        statement = statement[:-1] + ": KeyNotFoundException)"
    elif policy is not None and decision not in (HEALTH_EXEMPT, NO_POLICY):
        mode = policy.mode
        if decision.decision == "would_deny":
            mode += " (the proxy would allow it and log authz_would_deny)"
    print(f"decision: {verdict}")
    print(f"statement: {statement}")
    print(f"mode: {mode}")
    for name, value in lines.items():
        print(f"{name}: {value}")
    return 0 if verdict == "allow" else EX_FAIL
