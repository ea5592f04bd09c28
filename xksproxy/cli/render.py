"""How commands print what the domain functions return: tables, JSON and ``#`` notes on stderr."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from xksproxy.cli.common import CliError, print_json
from xksproxy.config import Config


def usage_text(usages: Sequence[str]) -> str:
    return ",".join(u.lower() for u in usages) or "none"


def key_json(k: Any) -> dict[str, Any]:
    ref = k.reference
    return {
        "keyId": k.key_id,
        "keyStatus": ref.status,
        "keyUsage": list(ref.usages),
        "versions": list(ref.versions),
        "kcv": {hsm: c.current_kcv if c else None for hsm, c in k.copies.items()},
        "hsms": {
            hsm: None
            if c is None
            else {
                "keyStatus": c.status,
                "keyUsage": list(c.usages),
                "versions": list(c.versions),
                "unrecorded": list(c.pending),  # never encrypt: keys repair
                "kcv": {str(v): kcv for v, kcv in c.kcv.items()},
            }
            for hsm, c in k.copies.items()
        },
        "consistent": not k.problems,
        "problems": list(k.problems),
    }


def print_change(change: Any) -> None:
    """What a metadata change (keys.fleet.MetaChange) left, as JSON."""
    from xksproxy.hsm.objects import format_time

    if change.missing:
        print(f"# key {change.key_id!r} is missing on {', '.join(change.missing)}", file=sys.stderr)
    meta = change.meta
    out: dict[str, Any] = {"keyId": change.key_id, "keyStatus": meta.status}
    if meta.deletion is not None:
        out["deletionDate"] = format_time(meta.deletion.delete_after)
    out["rotationPeriodInDays"] = meta.rotation_days
    out["hsms"] = list(change.applied)
    out["missingOn"] = list(change.missing)
    print_json(out)


def ttl_text(config: Config) -> str:
    ttl = max(h.key_cache_ttl_seconds for h in config.hsms)
    return f"{ttl:g} s (key_cache_ttl_seconds)"


def show_lines(view: dict[str, Any]) -> list[str]:
    hsms = list(view["hsms"])
    lines = [
        f"key {view['keyId']}: {view['keyStatus']}, usage {usage_text(view['keyUsage'])}, "
        f"current version {view['currentVersion']}"
    ]
    if view["rotationPeriodInDays"] is None:
        lines.append("rotation: none (xksproxy keys rotation-period)")
    else:
        lines.append(
            f"rotation: every {view['rotationPeriodInDays']} days, next {view['nextRotation']}"
        )
    if view["deletionDate"] is not None:
        lines.append(f"deletion: pending, purged by keys purge-due from {view['deletionDate']}")
    head = f"{'VERSION':<8} {'CREATED':<21} {'ORIGIN':<10} {'STATE':<13}"
    lines.append(head + " " + " ".join(f"{h:<12}" for h in hsms))
    for v in view["versions"]:
        row = (
            f"{v['version']:<8} {v['created'] or '-':<21} {v['origin'] or '-':<10} {v['state']:<13}"
        )
        lines.append(row + " " + " ".join(f"{v['kcv'].get(h) or '-':<12}" for h in hsms))
    lines += [f"# {problem}" for problem in view["problems"]]
    return lines


def finish_due_run(
    dry_run: bool,
    verbs: tuple[str, str],
    done: tuple[dict[str, Any], dict[str, str]],
    not_due: dict[str, datetime],
    failed: tuple[dict[str, str], str, str],
    extra: dict[str, Any],
) -> int:
    """Report a rotate-due or purge-due run: a line per key acted on (or due, in a dry run)
    and per failure on stderr, the JSON on stdout; exit 1 if any key failed."""
    from xksproxy.hsm.objects import format_time

    (acted, described), (failures, failure_text, failed_verb) = done, failed
    for key_id, text in described.items():
        print(f"{key_id}: {verbs[dry_run]} {text}", file=sys.stderr)
    for key_id, why in failures.items():
        print(f"{key_id}: {failure_text}: {why}", file=sys.stderr)
    report = {"due" if dry_run else verbs[0]: acted}
    report["notDue"] = {k: format_time(t) for k, t in not_due.items()}
    print_json({**report, **extra})
    if failures:
        raise CliError(f"{len(failures)} key(s) could not be {failed_verb}; run it again")
    return 0
