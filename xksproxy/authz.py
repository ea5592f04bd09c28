"""Secondary authorization (docs/spec-notes.md §6): IAM-style JSON policies on requestMetadata.

A policy is read and checked once, at config load, into compiled statements; a request then
costs a few set lookups and (only for wildcard patterns) one precompiled regex match per field.
Explicit Deny wins, then any Allow; with neither the request is denied (default deny).  The
grammar and its semantics are documented in docs/authz.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xksproxy.errors import ConfigError
from xksproxy.models import RequestMetadata
from xksproxy.secretfiles import SecretFileError, read_regular_bytes

MODES = ("enforce", "audit-only")
NO_STATEMENT = "no statement allows"  # the deciding "statement" of a default deny
# kmsOperation values KMS documents (docs/spec-notes.md §1.1).  A literal action outside this
# list is refused at load as a likely typo; wildcards (kms:*, kms:Generate*) match any value.
KNOWN_OPERATIONS = (
    "CreateKey",
    "DescribeKey",
    "Encrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "Decrypt",
    "CreateCustomKeyStore",
    "ConnectCustomKeyStore",
    "UpdateCustomKeyStore",
    "KmsHealthCheck",
)
_KNOWN_ACTIONS = frozenset("kms:" + op.lower() for op in KNOWN_OPERATIONS)
# The kmsOperation values KMS sends to each key API (the XKS proxy API specification, on
# requestMetadata.kmsOperation: GetKeyMetadata <- CreateKey; Encrypt <- Encrypt, ReEncrypt,
# GenerateDataKey, GenerateDataKeyWithoutPlaintext; Decrypt <- Decrypt, ReEncrypt).  AWS's own
# test client also sends DescribeKey to GetKeyMetadata.  The body's kmsOperation is the
# caller's claim, so under a policy it may narrow what a request is allowed, never widen it:
# - a documented operation of another API is denied (a principal allowed only kms:Encrypt must
#   not decrypt by writing "Encrypt" into a Decrypt request);
# - an operation KMS does not document (a future one) is allowed only if the policy allows it
#   and also every documented operation of the API it came to (a wildcard such as
#   kms:Generate* cannot let "GenerateAnything" decrypt).
# The specification forbids only refusing an unknown value as invalid (400); a deny (403) is
# allowed.
API_OPERATIONS: dict[str, tuple[str, ...]] = {
    "metadata": ("CreateKey", "DescribeKey"),
    "encrypt": ("Encrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext"),
    "decrypt": ("Decrypt", "ReEncrypt"),
}


def api_of(operation: object) -> str:
    """The key API a kmsOperation is sent to (ReEncrypt: encrypt, the first of its two), or
    "health" for KMS's key store operations; "metadata" for anything else (``policy test``)."""
    for api, operations in API_OPERATIONS.items():
        if operation in operations:
            return api
    return "health" if operation in KNOWN_OPERATIONS else "metadata"


NOT_OF_API = "kmsOperation of another API"  # the deciding "statement" of those denies
OPERATORS = ("StringEquals", "StringNotEquals", "StringLike", "StringNotLike")
# Condition key (IAM matches them case-insensitively) -> the request value it reads.
CONDITION_KEYS = (
    "kms:ViaService",
    "aws:SourceVpc",
    "aws:SourceVpce",
    "kms:KeyAccount",
    "kms:KeyRegion",
)
_CONDITION_KEYS = {k.lower(): k for k in CONDITION_KEYS}
_ACTION_RE = re.compile(r"^kms:[A-Za-z0-9*?]{1,64}$", re.IGNORECASE)
_RESOURCE_RE = re.compile(r"^[A-Za-z0-9._*?-]{1,128}$")
_SID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_VALUE = 2048  # ARNs up to 2048 characters must work (docs/spec-notes.md §1.1)


class _Matcher:
    """A set of patterns compiled once: literals in a frozenset, wildcards in one regex."""

    __slots__ = ("any", "exact", "regex")

    def __init__(self, patterns: Sequence[str], *, wildcards: bool, fold: bool = False) -> None:
        if fold:
            patterns = [p.lower() for p in patterns]
        globs = [p for p in patterns if wildcards and ("*" in p or "?" in p)]
        self.any = wildcards and "*" in patterns
        self.exact = frozenset(p for p in patterns if p not in globs)
        self.regex = (
            re.compile("|".join(_glob(p) for p in globs), re.DOTALL)
            if globs and not self.any
            else None
        )

    def __call__(self, value: str | None) -> bool:
        if self.any:
            return True
        if value is None:
            return False
        return value in self.exact or (
            self.regex is not None and self.regex.fullmatch(value) is not None
        )


@dataclass(frozen=True)
class KeyList:
    """A prefix's key allow-list: the external key ids it serves, ``*`` and ``?`` wildcards."""

    patterns: tuple[str, ...]
    match: _Matcher = field(repr=False, compare=False)

    def __contains__(self, key_id: str) -> bool:
        return self.match(key_id)


def parse_key_list(value: Any, where: str, problems: list[str]) -> KeyList | None:
    """A ``keys`` setting: a list of key ids and patterns (``[]`` serves no key)."""
    if not isinstance(value, list):
        problems.append(f'{where}: must be a list of key ids or patterns, like ["orders-*"]')
        return None
    bad = [v for v in value if not isinstance(v, str) or not _RESOURCE_RE.match(v)]
    for v in bad:
        problems.append(
            f"{where}: {v!r} is not a key id or pattern (1-128 of A-Z a-z 0-9 . _ - * ?)"
        )
    if bad:
        return None
    return KeyList(tuple(value), _Matcher(value, wildcards=True))


def _glob(pattern: str) -> str:
    return (
        "(?:"
        + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        + ")"
    )


@dataclass(frozen=True, slots=True)
class _Condition:
    key: str  # canonical condition key
    negate: bool
    match: _Matcher

    def holds(self, ctx: dict[str, str | None]) -> bool:
        value = ctx[self.key]
        if self.negate:  # IAM: a negated operator holds when the key is absent
            return value is None or not self.match(value)
        return value is not None and self.match(value)


@dataclass(frozen=True, slots=True)
class Statement:
    label: str  # Sid, or "Statement[i]" without one
    deny: bool
    principal: _Matcher
    action: _Matcher
    resource: _Matcher
    conditions: tuple[_Condition, ...]

    def matches(
        self, op: str, key_id: str, principal: str | None, ctx: Callable[[], dict[str, str | None]]
    ) -> bool:
        if not (self.action(op) and self.resource(key_id) and self.principal(principal)):
            return False
        if not self.conditions:
            return True
        values = ctx()
        return all(c.holds(values) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class Policy:
    """A prefix's compiled policy; deny statements first, as they are checked first."""

    source: str
    mode: str
    denies: tuple[Statement, ...]
    allows: tuple[Statement, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    # allow | deny | would_deny (a deny under audit-only: let through) | not_listed (the key
    # is not in the prefix's key list: to that prefix it does not exist)
    decision: str
    statement: str  # the deciding Sid / Statement[i], or NO_STATEMENT, or why none decided

    @property
    def allowed(self) -> bool:
        return self.decision in ("allow", "would_deny")


#: :func:`admit`'s decisions where no policy was evaluated.
HEALTH_EXEMPT = Decision("allow", "(GetHealthStatus is never evaluated)")
NOT_LISTED = Decision("not_listed", "(the key id is not in the prefix's keys)")
NO_POLICY = Decision("allow", "(the prefix has no policy_file)")


@dataclass(frozen=True, slots=True)
class Admission:
    """What a prefix admits: its key list and its policy, each None when it has none."""

    keys: KeyList | None
    policy: Policy | None

    def admit(self, key_id: str, meta: RequestMetadata, *, api: str) -> Decision:
        """The one rule of who gets in, for the request handler and ``policy test`` alike:
        GetHealthStatus always; a key outside the key list never (:data:`NOT_LISTED`); then
        the policy's verdict, if the prefix has one (:func:`evaluate`)."""
        if api == "health":
            return HEALTH_EXEMPT
        if self.keys is not None and key_id not in self.keys:
            return NOT_LISTED
        if self.policy is None:
            return NO_POLICY
        return evaluate(self.policy, key_id, meta, api=api)


def key_arn_parts(arn: str | None) -> tuple[str | None, str | None]:
    """(account, Region) of a kmsKeyArn, read loosely (the spec's example ARN is malformed)."""
    if not arn:
        return None, None
    parts = arn.split(":", 5)
    if len(parts) < 5 or parts[0] != "arn":
        return None, None
    return parts[4] or None, parts[3] or None


def context(meta: RequestMetadata) -> dict[str, str | None]:
    """The condition keys' values for one request (absent fields are None)."""
    account, region = key_arn_parts(meta.kms_key_arn)
    return {
        "kms:ViaService": meta.kms_via_service,
        "aws:SourceVpc": meta.aws_source_vpc,
        "aws:SourceVpce": meta.aws_source_vpce,
        "kms:KeyAccount": account,
        "kms:KeyRegion": region,
    }


def evaluate(policy: Policy, key_id: str, meta: RequestMetadata, *, api: str) -> Decision:
    """The policy's verdict on a request to key API *api* (metadata, encrypt or decrypt); the
    caller exempts GetHealthStatus.  The kmsOperation narrows, never widens (API_OPERATIONS)."""
    operation, documented = meta.kms_operation, API_OPERATIONS[api]
    refused = Decision("deny" if policy.mode == "enforce" else "would_deny", NOT_OF_API)
    if operation not in documented and operation in KNOWN_OPERATIONS:
        return refused
    decision = _decide(policy, key_id, meta, operation)
    if decision.decision != "allow" or operation in documented:
        return decision
    # An operation KMS does not document: no further than all of the API's own are allowed.
    for op in documented:
        if _decide(policy, key_id, meta, op).decision != "allow":
            return refused
    return decision


def _decide(policy: Policy, key_id: str, meta: RequestMetadata, operation: str) -> Decision:
    """The statements' verdict on *operation* (explicit deny, then allow, then default deny)."""
    op = "kms:" + operation.lower()
    principal = meta.aws_principal_arn
    cache: list[dict[str, str | None]] = []

    def ctx() -> dict[str, str | None]:
        if not cache:
            cache.append(context(meta))
        return cache[0]

    for st in policy.denies:
        if st.matches(op, key_id, principal, ctx):
            return Decision("deny" if policy.mode == "enforce" else "would_deny", st.label)
    for st in policy.allows:
        if st.matches(op, key_id, principal, ctx):
            return Decision("allow", st.label)
    return Decision("deny" if policy.mode == "enforce" else "would_deny", NO_STATEMENT)


# --- loading ---------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def load_policy(path: Path, mode: str, where: str) -> Policy:
    """Read and compile the policy at *path*; ConfigError naming *where* and the JSON path."""
    try:
        text = read_regular_bytes(path).decode("utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise ConfigError([f"{where}: cannot read {path}: No such file or directory"]) from None
    except SecretFileError as exc:
        raise ConfigError([f"{where}: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror}"]) from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ConfigError([f"{where}: {path} is not valid JSON: {exc}"]) from exc
    problems: list[str] = []
    policy = parse_policy(data, mode, str(path), problems)
    if problems:
        raise ConfigError([f"{where}: {path}: {p}" for p in problems])
    return policy


def parse_policy(data: Any, mode: str, source: str, problems: list[str]) -> Policy:
    """Compile parsed JSON *data*; append each problem (with its JSON path) to *problems*."""
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}")
    statements: list[Statement] = []
    if not isinstance(data, dict):
        problems.append("the policy must be a JSON object")
        return Policy(source, mode, (), ())
    for key in sorted(set(data) - {"Version", "Statement"}):
        problems.append(f"{key}: unknown field (expected Version, Statement)")
    if "Version" in data and data["Version"] != "2012-10-17":
        problems.append('Version: must be "2012-10-17" when given')
    raw = data.get("Statement")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problems.append("Statement: required, a non-empty list of statements")
        raw = []
    sids: set[str] = set()
    for i, st in enumerate(raw):
        compiled = _statement(st, f"Statement[{i}]", problems)
        if compiled is None:
            continue
        if compiled.label in sids:
            problems.append(f"Statement[{i}].Sid: {compiled.label!r} is used twice")
        sids.add(compiled.label)
        statements.append(compiled)
    return Policy(
        source,
        mode,
        tuple(s for s in statements if s.deny),
        tuple(s for s in statements if not s.deny),
    )


_FIELDS = ("Sid", "Effect", "Principal", "Action", "Resource", "Condition")


def _statement(st: Any, path: str, problems: list[str]) -> Statement | None:
    before = len(problems)
    if not isinstance(st, dict):
        problems.append(f"{path}: must be an object")
        return None
    for key in sorted(set(st) - set(_FIELDS)):
        problems.append(f"{path}.{key}: unknown field (expected {', '.join(_FIELDS)})")
    sid = st.get("Sid")
    if sid is not None and not (isinstance(sid, str) and _SID_RE.match(sid)):
        problems.append(f"{path}.Sid: must be 1-128 letters, digits, '_', '.', '-'")
    effect = st.get("Effect")
    if effect not in ("Allow", "Deny"):
        problems.append(f'{path}.Effect: required, "Allow" or "Deny"')
    principal = _principal(st.get("Principal"), f"{path}.Principal", problems)
    actions = _strings(st.get("Action"), f"{path}.Action", problems)
    for a in actions:
        if not _ACTION_RE.match(a):
            problems.append(f"{path}.Action: {a!r} is not kms:<Operation> (wildcards * and ?)")
        elif "*" not in a and "?" not in a and a.lower() not in _KNOWN_ACTIONS:
            problems.append(f"{path}.Action: {a!r} is no kmsOperation KMS sends (a typo?)")
    resources = _strings(st.get("Resource"), f"{path}.Resource", problems)
    for res in resources:
        if not _RESOURCE_RE.match(res):
            problems.append(f"{path}.Resource: {res!r} is not an external key id pattern")
    conditions = _conditions(st.get("Condition", {}), f"{path}.Condition", problems)
    if len(problems) != before:
        return None
    return Statement(
        label=sid if isinstance(sid, str) else path,
        deny=effect == "Deny",
        principal=_Matcher(principal, wildcards=True),
        action=_Matcher(actions, wildcards=True, fold=True),  # IAM actions ignore case
        resource=_Matcher(resources, wildcards=True),
        conditions=conditions,
    )


def _strings(value: Any, path: str, problems: list[str]) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if value is None:
        problems.append(f"{path}: required, a string or a non-empty list of strings")
        return []
    if not isinstance(values, list) or not values:
        problems.append(f"{path}: must be a string or a non-empty list of strings")
        return []
    out = []
    for v in values:
        if not isinstance(v, str) or not v or len(v) > MAX_VALUE:
            problems.append(f"{path}: {v!r} is not a non-empty string of at most {MAX_VALUE}")
        else:
            out.append(v)
    return out


def _principal(value: Any, path: str, problems: list[str]) -> list[str]:
    if value == "*":
        return ["*"]
    if not isinstance(value, dict) or set(value) != {"AWS"}:
        problems.append(f'{path}: required, "*" or {{"AWS": ARN pattern or list of them}}')
        return []
    return _strings(value["AWS"], f"{path}.AWS", problems)


def _conditions(value: Any, path: str, problems: list[str]) -> tuple[_Condition, ...]:
    if not isinstance(value, dict):
        problems.append(f"{path}: must be an object of operators")
        return ()
    out = []
    for op, block in value.items():
        if op not in OPERATORS:
            problems.append(f"{path}.{op}: unknown operator (expected {', '.join(OPERATORS)})")
            continue
        if not isinstance(block, dict) or not block:
            problems.append(f"{path}.{op}: must be a non-empty object of condition keys")
            continue
        for key, values in block.items():
            canonical = _CONDITION_KEYS.get(key.lower())
            if canonical is None:
                problems.append(
                    f"{path}.{op}.{key}: unknown condition key (expected "
                    f"{', '.join(CONDITION_KEYS)})"
                )
                continue
            patterns = _strings(values, f"{path}.{op}.{key}", problems)
            like = op.endswith("Like")
            out.append(_Condition(canonical, "Not" in op, _Matcher(patterns, wildcards=like)))
    return tuple(out)
