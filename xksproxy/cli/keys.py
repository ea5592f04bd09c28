"""``keys ...``: external keys on every configured HSM (create, list, rotate, import, replicate,
delete).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from xksproxy.cli.common import CliError, config_of, now, print_json, read_input, with_sessions
from xksproxy.cli.render import (
    finish_due_run,
    key_json,
    print_change,
    show_lines,
    ttl_text,
    usage_text,
)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from xksproxy.keys.create import create_key_everywhere

    config = config_of(args)
    reserved = {h.health_key for h in config.hsms}
    created = with_sessions(
        config, lambda s: create_key_everywhere(s, args.key_id, args.usage, reserved)
    )
    for line in created.cleared:
        print(f"# first: {line}", file=sys.stderr)
    info = created.info
    print_json(
        {
            "keyId": info.key_id,
            "keyUsage": list(info.usages),
            "keyStatus": info.status.value,
            "version": info.current_version,
            "kcv": created.kcv,
            "transport": created.transport,
        }
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from xksproxy.keys.fleet import list_everywhere

    config = config_of(args)
    keys = with_sessions(config, list_everywhere)
    if args.json:
        print_json([key_json(k) for k in keys])
        return 0
    many = len(config.hsms) > 1
    head = f"{'KEY ID':<40} {'STATUS':<16} {'USAGE':<16} VERSIONS"
    print(f"{head:<84} {'KCV':<9} COPIES" if many else head)
    for k in keys:
        ref = k.reference
        row = (
            f"{k.key_id:<40} {ref.status:<16} {usage_text(ref.usages):<16} "
            f"{','.join(map(str, ref.versions)):<9}"
        )
        if many:
            flags = [p.split(":")[0].replace(" ", "-") for p in k.problems]
            row += f" {ref.current_kcv or '-':<9} {','.join(flags) or 'ok'}"
        print(row.rstrip())
    for k in keys:
        for problem in k.problems:
            print(f"# {k.key_id}: {problem}")
    return 0


def cmd_keys_init_health(args: argparse.Namespace) -> int:
    from xksproxy.keys.fleet import ensure_health_keys

    config = config_of(args)
    made = with_sessions(config, ensure_health_keys)
    for hsm in config.hsms:
        where = f" on {hsm.name}" if len(config.hsms) > 1 else ""
        state = "created" if made[hsm.name] else "already exists"
        print(f"health key {hsm.health_key!r}{where} {state}")
    return 0


def keys_status(status: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from xksproxy.keys.fleet import set_status_everywhere

        config = config_of(args)
        print_change(with_sessions(config, lambda s: set_status_everywhere(s, args.key_id, status)))
        return 0

    return run


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import rotate_everywhere

    config = config_of(args)
    done = with_sessions(config, lambda s: rotate_everywhere(s, args.key_id, now()))
    for line in done.repaired:
        print(f"# first, from an interrupted command: {line}", file=sys.stderr)
    print(
        f"# running proxies encrypt with version {done.version} within "
        f"{ttl_text(config)}; older versions still decrypt",
        file=sys.stderr,
    )
    print_json(
        {
            "keyId": done.key_id,
            "version": done.version,
            "kcv": done.created.kcv,
            "transport": done.created.transport,
        }
    )
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import describe, read_copies

    config = config_of(args)
    copies = with_sessions(config, lambda s: read_copies(s, args.key_id))
    view = describe(args.key_id, copies)
    if args.json:
        print_json(view)
        return 0
    for line in show_lines(view):
        print(line.rstrip())
    return 0


def cmd_keys_repair(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import repair

    config = config_of(args)
    done = with_sessions(config, lambda s: repair(s, args.key_id))
    print_json({"keyId": args.key_id, "repaired": done})
    if not done:
        print(f"# nothing unfinished in {args.key_id!r}", file=sys.stderr)
    return 0


def cmd_keys_rotation_period(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import set_rotation_period

    days = None if args.off else args.days
    config = config_of(args)
    print_change(with_sessions(config, lambda s: set_rotation_period(s, args.key_id, days)))
    return 0


def cmd_keys_rotate_due(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import rotate_due

    result = with_sessions(config_of(args), lambda s: rotate_due(s, now(), args.dry_run))
    done = {k: f"to version {v}" for k, v in result.rotated.items()}
    return finish_due_run(
        args.dry_run,
        ("rotated", "would rotate"),
        (result.rotated, done),
        result.not_due,
        (result.failed, "rotation failed", "rotated"),
        {"skipped": result.skipped, "failed": result.failed},
    )


def cmd_keys_schedule_deletion(args: argparse.Namespace) -> int:
    from xksproxy.hsm.objects import format_time
    from xksproxy.keys.deletion import schedule_deletion

    config = config_of(args)
    change = with_sessions(config, lambda s: schedule_deletion(s, args.key_id, args.days, now()))
    assert change.meta.deletion is not None
    after = format_time(change.meta.deletion.delete_after)
    print(
        f"# {args.key_id!r} cannot be used from now on (by running proxies within "
        f"{ttl_text(config)}); keys cancel-deletion undoes that until keys purge-due "
        f"destroys every version, on or after {after}",
        file=sys.stderr,
    )
    print_change(change)
    return 0


def cmd_keys_cancel_deletion(args: argparse.Namespace) -> int:
    from xksproxy.keys.deletion import cancel_deletion

    config = config_of(args)
    change = with_sessions(config, lambda s: cancel_deletion(s, args.key_id))
    print(f"# {args.key_id!r} is DISABLED: xksproxy keys enable to use it again", file=sys.stderr)
    print_change(change)
    return 0


def cmd_keys_purge_due(args: argparse.Namespace) -> int:
    from xksproxy.keys.deletion import purge_due

    result = with_sessions(
        config_of(args), lambda s: purge_due(s, now(), args.dry_run, args.clock_checked)
    )
    done = {k: f"on {', '.join(hsms)}" for k, hsms in result.purged.items()}
    return finish_due_run(
        args.dry_run,
        ("purged", "would purge"),
        (result.purged, done),
        result.not_due,
        (result.refused, "not purged", "purged"),
        {"refused": result.refused, "expiredWrappingKeys": result.wrapping_keys},
    )


def cmd_keys_import_params(args: argparse.Namespace) -> int:
    from xksproxy.hsm.objects import format_time
    from xksproxy.keys.byok import import_params

    config = config_of(args)
    reserved = {h.health_key for h in config.hsms}
    out = with_sessions(
        config,
        lambda s: import_params(
            s,
            args.key_id,
            args.wrapping_algorithm,
            args.wrapping_key_spec,
            Path(args.out),
            reserved,
            now(),
        ),
    )
    expires = format_time(out.expires)
    print(
        f"# wrap 32 bytes of key material with {out.public_key.name} ({out.algorithm}), then "
        f"run keys import {out.key_id} before {expires} (docs/byok.md)",
        file=sys.stderr,
    )
    print_json(
        {
            "keyId": out.key_id,
            "wrappingAlgorithm": out.algorithm,
            "wrappingKeySpec": out.spec,
            "publicKey": str(out.public_key),
            "importToken": str(out.token),
            "expires": expires,
            "hsm": out.hsm,
        }
    )
    return 0


def cmd_keys_import(args: argparse.Namespace) -> int:
    from xksproxy.keys.byok import import_key

    config = config_of(args)
    reserved = {h.health_key for h in config.hsms}
    material = read_input("--wrapped-key-material", args.wrapped_key_material, 65536)
    token = read_input("--import-token", args.import_token, 65536)
    done = with_sessions(
        config,
        lambda s: import_key(s, args.key_id, material, token, args.usage, reserved, now()),
    )
    if done.already:
        print(
            f"# this import token already made version {done.version} (an earlier run was "
            "cut short after it): nothing new was imported",
            file=sys.stderr,
        )
    if not done.wrapping_key_destroyed:
        print(
            "# the wrapping key could not be destroyed: keys purge-due removes it once the "
            "import token has expired",
            file=sys.stderr,
        )
    if done.version > 1 and not done.already:
        print(
            f"# running proxies encrypt with version {done.version} within "
            f"{ttl_text(config)}; older versions still decrypt",
            file=sys.stderr,
        )
    info = done.created.info
    print_json(
        {
            "keyId": info.key_id,
            "version": done.version,
            "origin": "imported",
            "keyUsage": list(info.usages),
            "keyStatus": info.status.value,
            "kcv": done.created.kcv,
            "transport": done.created.transport,
        }
    )
    return 0


def cmd_keys_replicate(args: argparse.Namespace) -> int:
    from xksproxy.keys import locks
    from xksproxy.keys.replicate import replicate

    config = config_of(args)
    locks.use(config.keys)
    report = replicate(config.hsms, args.source, args.target, args.key_ids, progress=args.progress)
    print_json(report.to_json())
    for key in report.keys:
        for problem in key.problems:
            print(f"# {key.key_id}: {problem}", file=sys.stderr)
    for note in report.notes:
        print(f"# {note}", file=sys.stderr)
    if not report.ok:
        raise CliError(f"not every key was replicated: {report.summary()}")
    print(f"# replicated {report.summary()}", file=sys.stderr)
    return 0
