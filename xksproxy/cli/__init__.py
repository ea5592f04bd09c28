"""The ``xksproxy`` command line: serve, dev-setup, keys, credentials, policy, audit,
kms-config, check.  One module per command group; each command parses, calls one domain
function and renders what it returns (:mod:`xksproxy.cli.render`).

Every failure is one clear line on stderr and a non-zero exit, never a traceback: an
:class:`xksproxy.errors.OperatorError` carries its message and exit code, and :func:`main`
catches it once.  Exit codes: 0 ok, 1 operation failed, 2 bad usage (argparse), 78 invalid
configuration (EX_CONFIG).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from xksproxy.cli.parser import build_parser
from xksproxy.errors import OperatorError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    from xksproxy.hardening import forbid_core_dumps, raise_open_file_limit

    # Before anything reads a secret: a core dump would hold it (xksproxy/hardening.py).
    not_done = forbid_core_dumps()
    if (why := raise_open_file_limit()) is not None:
        not_done.append(why)
    args = build_parser().parse_args(argv)
    if not_done:
        print(
            f"xksproxy: warning: process limits not set: {'; '.join(not_done)}",
            file=sys.stderr,
        )
    if args.command != "serve":
        from xksproxy import log

        # Warnings of the modules a command uses (a key object ignored, say) go to stderr as
        # JSON lines: stdout carries the command's own output (JSON that scripts parse).
        log.configure("warning", sys.stderr)
    try:
        code: int = args.func(args)
    except OperatorError as exc:
        for line in exc.lines():
            print(f"xksproxy: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code
