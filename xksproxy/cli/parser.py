"""The argument parser: every command, its options and their types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from xksproxy import __version__
from xksproxy.cli.audit import cmd_audit_verify
from xksproxy.cli.capacity import cmd_capacity
from xksproxy.cli.credentials import cmd_credentials_add, cmd_credentials_remove, cmd_kms_config
from xksproxy.cli.dev import cmd_dev_setup
from xksproxy.cli.keys import (
    cmd_keys_cancel_deletion,
    cmd_keys_create,
    cmd_keys_import,
    cmd_keys_import_params,
    cmd_keys_init_health,
    cmd_keys_list,
    cmd_keys_purge_due,
    cmd_keys_repair,
    cmd_keys_replicate,
    cmd_keys_rotate,
    cmd_keys_rotate_due,
    cmd_keys_rotation_period,
    cmd_keys_schedule_deletion,
    cmd_keys_show,
    keys_status,
)
from xksproxy.cli.policy import cmd_policy_test
from xksproxy.cli.serve import cmd_check, cmd_serve
from xksproxy.keys.import_names import WRAPPING_ALGORITHMS, WRAPPING_KEY_SPECS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"xksproxy: error: {message} (see --help)\n")


def worker_count(raw: str) -> int:
    from xksproxy.config import MAX_WORKERS

    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return value


def hsm_count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError("must be between 1 and 10")
    return value


def proxy_count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError("must be between 1 and 16")
    return value


def positive_rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 0 < value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be above 0 and at most 1000000")
    return value


def emulated_profiles(raw: str) -> tuple[str, ...]:
    """``--emulate``: one profile, or a comma-separated list of one per HSM."""
    from xksproxy.dev.faultinject import PROFILES

    profiles = tuple(p.strip() for p in raw.split(","))
    for profile in profiles:
        if profile not in PROFILES:
            raise argparse.ArgumentTypeError(
                f"unknown profile {profile!r} (profiles: {', '.join(PROFILES)})"
            )
    return profiles


def days(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of days: {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} days")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xksproxy", description="AWS KMS external key store (XKS) proxy")
    p.add_argument("--version", action="version", version=f"xksproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", required=True, help="path of xksproxy.toml")
        return sp

    s = with_config(sub.add_parser("serve", help="run the proxy"))
    s.add_argument(
        "--workers",
        type=worker_count,
        help="worker processes sharing the port (overrides [server] workers)",
    )
    s.add_argument(
        "--pid-file",
        type=Path,
        metavar="PATH",
        help="write the serving process's PID here (for kill -HUP); removed at exit",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("dev-setup", help="make a SoftHSM-backed rig in DIR")
    s.add_argument("dir")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the rig's API listens on (default 127.0.0.1; 0.0.0.0 in a container)",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the rig's /metrics listener (default 127.0.0.1)",
    )
    s.add_argument("--metrics-port", type=int, default=9100)
    s.add_argument("--region", default="us-east-1")
    s.add_argument("--prefix", default="example/xks")
    s.add_argument("--module", help="SoftHSM2 library path (found automatically)")
    s.add_argument(
        "--hsms",
        type=hsm_count,
        default=1,
        metavar="N",
        help="number of HSMs, 1-10 (default 1); each is its own SoftHSM instance",
    )
    s.add_argument(
        "--fault-injection",
        action="store_true",
        help="put each HSM behind its own copy of the fault-injection module",
    )
    from xksproxy.dev.faultinject import PROFILES

    s.add_argument(
        "--emulate",
        type=emulated_profiles,
        metavar="PROFILE[,PROFILE...]",
        help="make each HSM handle AES-GCM IVs as a production HSM does (docs/vendors.md), "
        "behind its own copy of the fault-injection module: one profile for every HSM, or "
        f"one per HSM ({', '.join(PROFILES)})",
    )
    s.add_argument(
        "--proxies",
        type=proxy_count,
        default=None,
        metavar="N",
        help="a fleet: N proxies (DIR/proxy-K/xksproxy.toml, ports after --metrics-port and "
        "--port) on the same HSMs, behind HAProxy on --port (DIR/haproxy.cfg)",
    )
    s.set_defaults(func=cmd_dev_setup)

    keys = sub.add_parser("keys", help="external keys, on every configured HSM")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    s = with_config(ksub.add_parser("create", help="create a new AES-256 key on every HSM"))
    s.add_argument("key_id")
    s.add_argument(
        "--usage",
        default="encrypt,decrypt",
        help="encrypt,decrypt (default) | encrypt | decrypt | none",
    )
    s.set_defaults(func=cmd_keys_create)
    s = with_config(ksub.add_parser("list", help="list external keys"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_list)
    s = with_config(
        ksub.add_parser("init-health", help="create the dedicated health (known-answer) key")
    )
    s.set_defaults(func=cmd_keys_init_health)
    for name, status in (("disable", "DISABLED"), ("enable", "ENABLED")):
        s = with_config(ksub.add_parser(name, help=f"mark a key {status}"))
        s.add_argument("key_id")
        s.set_defaults(func=keys_status(status))
    # --- parsers: versions and deletion ---
    s = with_config(ksub.add_parser("rotate", help="add a new version (new material) everywhere"))
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_rotate)
    s = with_config(
        ksub.add_parser(
            "repair",
            help="finish or remove what an interrupted rotate or import left (unrecorded versions)",
        )
    )
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_repair)
    s = with_config(ksub.add_parser("show", help="a key's versions, KCVs, state and rotation"))
    s.add_argument("key_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_show)
    s = with_config(
        ksub.add_parser("rotation-period", help="rotate a key every N days (keys rotate-due)")
    )
    s.add_argument("key_id")
    period = s.add_mutually_exclusive_group(required=True)
    period.add_argument("--days", type=days(90, 2560), help="90-2560, as KMS allows")
    period.add_argument("--off", action="store_true", help="no automatic rotation")
    s.set_defaults(func=cmd_keys_rotation_period)
    s = with_config(
        ksub.add_parser("rotate-due", help="rotate every key whose rotation period has passed")
    )
    s.add_argument("--dry-run", action="store_true", help="list what is due, change nothing")
    s.set_defaults(func=cmd_keys_rotate_due)
    s = with_config(
        ksub.add_parser("schedule-deletion", help="make a key unusable; purgeable after N days")
    )
    s.add_argument("key_id")
    s.add_argument("--days", type=days(7, 30), default=30, help="7-30 (default 30)")
    s.set_defaults(func=cmd_keys_schedule_deletion)
    s = with_config(ksub.add_parser("cancel-deletion", help="end a pending deletion (DISABLED)"))
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_cancel_deletion)
    s = with_config(
        ksub.add_parser("purge-due", help="destroy keys whose deletion date has passed")
    )
    s.add_argument("--dry-run", action="store_true", help="list what is due, change nothing")
    s.add_argument(
        "--clock-checked",
        action="store_true",
        help="purge although the clock moved back, or more than 3 days, since the last run",
    )
    s.set_defaults(func=cmd_keys_purge_due)
    # --- parsers: bring your own key ---
    s = with_config(
        ksub.add_parser(
            "import-params", help="a wrapping public key and import token for your key material"
        )
    )
    s.add_argument("key_id")
    s.add_argument("--wrapping-algorithm", required=True, choices=WRAPPING_ALGORITHMS)
    s.add_argument("--wrapping-key-spec", required=True, choices=WRAPPING_KEY_SPECS)
    s.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write WrappingPublicKey.bin and ImportToken.bin (made 0700 if missing)",
    )
    s.set_defaults(func=cmd_keys_import_params)
    s = with_config(
        ksub.add_parser("import", help="import wrapped key material: a new key or a new version")
    )
    s.add_argument("key_id")
    s.add_argument("--wrapped-key-material", required=True, metavar="FILE")
    s.add_argument("--import-token", required=True, metavar="FILE")
    s.add_argument(
        "--usage",
        help="a new key's usage: encrypt,decrypt (default) | encrypt | decrypt | none; "
        "a new version keeps the key's usage",
    )
    s.set_defaults(func=cmd_keys_import)
    # --- parsers: replicate ---
    s = with_config(
        ksub.add_parser(
            "replicate",
            help="copy keys with all their versions and state from one HSM to another",
        )
    )
    s.add_argument("--from", dest="source", required=True, metavar="HSM", help="copy from")
    s.add_argument("--to", dest="target", required=True, metavar="HSM", help="copy to")
    s.add_argument("key_ids", nargs="*", metavar="KEY_ID", help="default: every key")
    s.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    s.set_defaults(func=cmd_keys_replicate)

    creds = sub.add_parser("credentials", help="SigV4 credentials per URI path prefix")
    csub = creds.add_subparsers(dest="credentials_command", required=True, parser_class=_Parser)
    s = with_config(csub.add_parser("add", help="add a credential (creates the prefix)"))
    s.add_argument("--prefix", required=True)
    s.set_defaults(func=cmd_credentials_add)
    s = with_config(csub.add_parser("remove", help="remove a credential"))
    s.add_argument("--prefix", required=True)
    s.add_argument("--access-key-id", required=True)
    s.add_argument(
        "--allow-last", action="store_true", help="allow removing the prefix's last credential"
    )
    s.set_defaults(func=cmd_credentials_remove)

    policy = sub.add_parser("policy", help="secondary authorization policies (docs/authz.md)")
    psub = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    s = with_config(
        psub.add_parser(
            "test", help="decide a request body under a prefix's policy (exit 0 allow, 1 deny)"
        )
    )
    s.add_argument("--prefix", required=True)
    s.add_argument("--key-id", required=True, help="the external key id of the request's URI")
    s.add_argument("--request", required=True, help="a request body (JSON with requestMetadata)")
    s.add_argument(
        "--api",
        choices=["metadata", "encrypt", "decrypt", "health"],
        help="the API the request goes to (default: the one its kmsOperation belongs to)",
    )
    s.set_defaults(func=cmd_policy_test)

    s = with_config(sub.add_parser("kms-config", help="print the KMS console JSON for a prefix"))
    s.add_argument("--prefix", required=True)
    s.set_defaults(func=cmd_kms_config)

    audit = sub.add_parser("audit", help="the tamper-evident audit log (docs/audit.md)")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    s = asub.add_parser("verify", help="verify every audit chain of a log; first problem, exit 1")
    s.add_argument("file", metavar="FILE", help="the log (- for stdin); rotated parts in order")
    key = s.add_mutually_exclusive_group(required=True)
    key.add_argument("-c", "--config", help="take the key from this config's [logging]")
    key.add_argument("--key-file", metavar="FILE", help="the key, hex, in this file")
    key.add_argument("--key-env", metavar="VAR", help="the key, hex, in this environment variable")
    s.add_argument(
        "--require-closed",
        action="store_true",
        help="exit 1 when a chain has no audit_chain_closed line (a cut-off end)",
    )
    s.set_defaults(func=cmd_audit_verify)

    def bounded_float(low: float, high: float) -> Callable[[str], float]:
        def parse(raw: str) -> float:
            try:
                value = float(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
            return value

        return parse

    def bounded_int(low: int, high: int) -> Callable[[str], int]:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
            return value

        return parse

    s = with_config(
        sub.add_parser("capacity", help="measure each HSM; what a request rate needs of the fleet")
    )
    s.add_argument(
        "--rate",
        type=positive_rate,
        required=True,
        metavar="R",
        help="the peak rate to plan for, in requests per second",
    )
    s.add_argument("--json", type=Path, metavar="PATH", help="also write the plan here as JSON")
    from xksproxy.capacity import DEFAULT_HTTP_CPU_US, DEFAULT_STEP_SECONDS

    s.add_argument(
        "--http-cpu-us",
        type=bounded_float(10, 100_000),
        default=DEFAULT_HTTP_CPU_US,
        metavar="US",
        help=f"CPU microseconds a request costs a worker outside its HSM calls (default "
        f"{DEFAULT_HTTP_CPU_US:g}, measured on the reference machine: "
        "docs/operations/capacity.md)",
    )
    s.add_argument(
        "--step-seconds",
        type=bounded_float(0.2, 10),
        default=DEFAULT_STEP_SECONDS,
        metavar="S",
        help=f"length of each measuring step (default {DEFAULT_STEP_SECONDS:g})",
    )
    s.add_argument(
        "--max-concurrency",
        type=bounded_int(1, 1024),
        metavar="N",
        help="step up to N callers per HSM (default: each HSM's max_pool_size)",
    )
    s.set_defaults(func=cmd_capacity)

    s = with_config(sub.add_parser("check", help="validate config, open HSMs, run the KAT"))
    s.set_defaults(func=cmd_check)
    return p
