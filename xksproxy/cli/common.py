"""What every command shares: loading the configuration, the exit codes, one error line, sessions
on every HSM.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from xksproxy.config import Config, normalize_prefix, prefix_problem
from xksproxy.configfile import load_config
from xksproxy.errors import OperatorError

EX_FAIL = 1
EX_CONFIG = 78


class CliError(OperatorError):
    """What the command line itself refuses: a bad option value (exit 2), a file it cannot
    read, or an operation that did not succeed as a whole (exit 1)."""


def config_of(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def prefix_arg(raw: str) -> str:
    prefix = normalize_prefix(raw)
    why = prefix_problem(prefix)
    if why:
        raise CliError(f"--prefix {raw!r}: {why}", 2)
    return prefix


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def with_sessions(config: Config, fn: Callable[[Any], Any]) -> Any:
    """Run *fn* on a logged-in session per configured HSM: [(HsmConfig, Session), ...]."""
    from xksproxy.keys import locks
    from xksproxy.keys.create import admin_sessions

    locks.use(config.keys)
    with admin_sessions(config.hsms) as sessions:
        return fn(sessions)


def now() -> datetime:
    from xksproxy.hsm.objects import now_utc

    return now_utc()


def read_input(option: str, path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise CliError(f"{option} {path}: more than {limit} bytes, so not what it should be")
    return data
