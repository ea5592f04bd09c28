"""``serve`` and ``check``: run the proxy (the process bootstrap is :mod:`xksproxy.process`), or
open everything once and report.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys

from xksproxy.cli.common import CliError, config_of


def cmd_serve(args: argparse.Namespace) -> int:
    from xksproxy.process import serve

    # Until the proxy installs its reload handler, SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = config_of(args)
    if args.workers is not None:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, workers=args.workers)
        )
    return serve(config, args.pid_file)


def cmd_check(args: argparse.Namespace) -> int:
    from xksproxy import log
    from xksproxy.app import check

    config = config_of(args)
    log.configure("critical", sys.stderr)  # the result lines below say what went wrong
    failures = []
    for hsm in asyncio.run(check(config)):
        line = f"hsm {hsm.name} ({hsm.model}): {hsm.state} - {hsm.detail}"
        print(line)
        print(f"hsm {hsm.name} gcm_iv: {hsm.gcm_detail}")
        if hsm.state == "UNAVAILABLE":
            failures.append(line)
            continue
        for key_id, why in hsm.key_problems.items():
            print(f"hsm {hsm.name} key {key_id}: {'; '.join(why)}")
        if hsm.key_problems:
            failures.append(
                f"hsm {hsm.name}: {len(hsm.key_problems)} key(s) need keys repair (or a person)"
            )
    if failures:
        raise CliError(f"{len(failures)} problem(s): " + "; ".join(failures))
    print(f"config {config.path}: ok")
    return 0
