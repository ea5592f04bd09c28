"""``audit verify``: every audit chain of a log checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xksproxy.cli.common import EX_FAIL, CliError, config_of
from xksproxy.errors import ConfigError


def chain_key(args: argparse.Namespace) -> bytes:
    """The audit chain key for ``audit verify``: --key-file, --key-env or -c's [logging]."""
    from xksproxy.config import LoggingConfig

    if args.config is not None:
        logging = config_of(args).logging
        if not logging.audit_chain:
            raise ConfigError(["logging: neither audit_chain_key_file nor audit_chain_key_env"])
    else:
        key_file = Path(args.key_file).expanduser().absolute() if args.key_file else None
        logging = LoggingConfig(audit_chain_key_file=key_file, audit_chain_key_env=args.key_env)
    key = logging.read_chain_key()
    assert key is not None
    return key


NOTES_SHOWN = 20  # notes audit verify prints (then how many more)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check every audit chain in a log; report the first removed, inserted or altered line."""
    from xksproxy.audit_chain import verify_lines

    key = chain_key(args)
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}", 2) from exc
    lines = data.split(b"\n")
    complete = lines[-1] == b""  # the last line ended with a newline (or the file is empty)
    if complete:
        lines.pop()
    report = verify_lines(lines, key, complete=complete)
    counts = (
        f"{report.chained_lines} chained lines in {len(report.chains)} chains, "
        f"{report.unchained_lines} other JSON lines, {report.ignored_lines} non-JSON lines"
    )
    for note in report.notes[:NOTES_SHOWN]:
        print(f"xksproxy: audit: note: {note}", file=sys.stderr)
    if len(report.notes) > NOTES_SHOWN:
        print(f"xksproxy: audit: note: {len(report.notes) - NOTES_SHOWN} more", file=sys.stderr)
    if report.problem is not None:
        print(f"xksproxy: audit: {args.file}: {report.problem}", file=sys.stderr)
        return EX_FAIL
    open_chains = report.not_closed
    for c in open_chains:
        print(
            f"xksproxy: audit: warning: chain {c.chain_id} (lines {c.first_line}-{c.last_line}) "
            "is not closed: its process was killed or still runs, or the end was cut off",
            file=sys.stderr,
        )
    if open_chains and args.require_closed:
        return EX_FAIL
    print(f"{args.file}: intact: {counts}")
    return 0
