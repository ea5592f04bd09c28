"""The ``xksproxy`` command line: serve, dev-setup, keys, credentials, kms-config, check.

Every failure is one clear line on stderr and a non-zero exit, never a traceback.  Exit codes:
0 ok, 1 operation failed, 2 bad usage (argparse), 78 invalid configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from xksproxy import __version__
from xksproxy.config import Config, api_base, load_config, normalize_prefix, prefix_problem
from xksproxy.credentials import (
    ACCESS_KEY_ID_RE,
    MAX_LIVE_CREDENTIALS,
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
)
from xksproxy.errors import ConfigError

EX_FAIL = 1
EX_CONFIG = 78


class CliError(Exception):
    """An operation failed; the message is printed as the single error line."""

    def __init__(self, message: str, code: int = EX_FAIL) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"xksproxy: error: {message} (see --help)\n")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _prefix(raw: str) -> str:
    prefix = normalize_prefix(raw)
    why = prefix_problem(prefix)
    if why:
        raise CliError(f"--prefix {raw!r}: {why}", 2)
    return prefix


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_serve(args: argparse.Namespace) -> int:
    from xksproxy import log

    config = _config(args)
    for hsm in config.hsms:  # a missing PIN is a configuration error: fail before binding
        hsm.read_pin()
    if config.metrics.multiprocess_dir is not None:
        # prometheus-client picks its mode when first imported: set the directory before.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(config.metrics.multiprocess_dir)
        from xksproxy.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(config.metrics.multiprocess_dir)
    from xksproxy.app import ListenError, serve  # after PROMETHEUS_MULTIPROC_DIR is set

    log.configure(config.logging.level)
    try:
        import uvloop  # type: ignore[import-not-found]

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(config))
    except ListenError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_dev_setup(args: argparse.Namespace) -> int:
    from xksproxy.devsetup import SetupError, dev_setup

    try:
        rig = dev_setup(
            Path(args.dir),
            port=args.port,
            region=args.region,
            prefix=args.prefix,
            module=args.module,
        )
    except SetupError as exc:
        raise CliError(str(exc)) from exc
    print(f"# rig ready: xksproxy serve -c {rig.config_path}", file=sys.stderr)
    print(f"# KMS console file: {rig.kms_config_path}", file=sys.stderr)
    _print_json(rig.kms_config)
    return 0


def _with_session(config: Config, fn: Callable[[Any, str], Any]) -> Any:
    from xksproxy.keys.lifecycle import KeyAdminError, admin_session

    hsm = config.hsms[0]
    try:
        with admin_session(hsm) as session:
            return fn(session, hsm.health_key)
    except KeyAdminError as exc:
        raise CliError(str(exc)) from exc


def cmd_keys_create(args: argparse.Namespace) -> int:
    from xksproxy.keys.lifecycle import create_key

    info = _with_session(
        _config(args), lambda s, reserved: create_key(s, args.key_id, args.usage, reserved)
    )
    _print_json(
        {
            "keyId": info.key_id,
            "keyUsage": list(info.usages),
            "keyStatus": info.status.value,
            "version": info.current_version,
        }
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from xksproxy.keys.lifecycle import list_keys

    keys = _with_session(_config(args), lambda s, reserved: list_keys(s, reserved))
    if args.json:
        _print_json(
            [
                {
                    "keyId": k.key_id,
                    "keyStatus": k.status,
                    "keyUsage": list(k.usages),
                    "versions": list(k.versions),
                }
                for k in keys
            ]
        )
        return 0
    print(f"{'KEY ID':<40} {'STATUS':<9} {'USAGE':<16} VERSIONS")
    for k in keys:
        usage = ",".join(u.lower() for u in k.usages) or "none"
        print(f"{k.key_id:<40} {k.status:<9} {usage:<16} {','.join(map(str, k.versions))}")
    return 0


def cmd_keys_init_health(args: argparse.Namespace) -> int:
    from xksproxy.keys.lifecycle import ensure_health_key

    config = _config(args)
    made = _with_session(config, lambda s, label: ensure_health_key(s, label))
    label = config.hsms[0].health_key
    print(f"health key {label!r} " + ("created" if made else "already exists"))
    return 0


def _keys_status(status: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from xksproxy.keys.lifecycle import change_status

        info = _with_session(
            _config(args), lambda s, _reserved: change_status(s, args.key_id, status)
        )
        _print_json({"keyId": info.key_id, "keyStatus": info.status.value})
        return 0

    return run


def cmd_credentials_add(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    path = config.sigv4.credentials_file
    creds = load_credentials(path)
    existing = creds.get(prefix, ())
    if len(existing) >= MAX_LIVE_CREDENTIALS:
        raise CliError(f"prefix {prefix!r} already has {MAX_LIVE_CREDENTIALS} credentials")
    cred = generate_credential()
    creds[prefix] = (*existing, cred)
    save_credentials(path, creds)
    if not existing:
        print(f"# created prefix {prefix!r} (a new logical key store)", file=sys.stderr)
    print("# send SIGHUP to running proxies so they accept it", file=sys.stderr)
    _print_json(kms_console_json(api_base(prefix), cred))
    return 0


def cmd_credentials_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    if not ACCESS_KEY_ID_RE.match(args.access_key_id):
        raise CliError("--access-key-id must be 20-30 characters of A-Z and 2-7", 2)
    path = config.sigv4.credentials_file
    creds = load_credentials(path)
    existing = creds.get(prefix)
    if existing is None:
        raise CliError(f"prefix {prefix!r} has no credentials")
    kept = tuple(c for c in existing if c.access_key_id != args.access_key_id)
    if len(kept) == len(existing):
        raise CliError(f"prefix {prefix!r} has no credential {args.access_key_id}")
    if not kept and not args.allow_last:
        raise CliError(
            "refusing to remove the prefix's last credential (KMS would be locked out); "
            "add the new one first, or pass --allow-last"
        )
    if kept:
        creds[prefix] = kept
    else:
        del creds[prefix]
    save_credentials(path, creds)
    print(
        f"removed {args.access_key_id} from prefix {prefix!r}; reload running proxies with SIGHUP",
        file=sys.stderr,
    )
    return 0


def cmd_kms_config(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    creds = load_credentials(config.sigv4.credentials_file).get(prefix)
    if not creds:
        raise CliError(f"prefix {prefix!r} has no credentials (xksproxy credentials add)")
    _print_json(kms_console_json(api_base(prefix), creds[-1]))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from xksproxy.app import close_proxy, open_proxy, probe_timeout

    config = _config(args)
    load_credentials(config.sigv4.credentials_file)
    for hsm in config.hsms:
        hsm.read_pin()

    async def run() -> list[str]:
        proxy = await open_proxy(config)
        failures = []
        try:
            for hsm in proxy.hsms:
                rec = await proxy.service.board.probe_once(hsm, probe_timeout(config))
                line = f"hsm {hsm.name} ({hsm.model}): {rec.state.value} - {rec.detail}"
                print(line)
                if rec.state.value == "UNAVAILABLE":
                    failures.append(line)
        finally:
            await close_proxy(proxy)
        return failures

    from xksproxy import log

    log.configure("critical", sys.stderr)  # the result lines below say what went wrong
    failures = asyncio.run(run())
    if failures:
        raise CliError(f"{len(failures)} HSM(s) unavailable: " + "; ".join(failures))
    print(f"config {config.path}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xksproxy", description="AWS KMS external key store (XKS) proxy")
    p.add_argument("--version", action="version", version=f"xksproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", required=True, help="path of xksproxy.toml")
        return sp

    s = with_config(sub.add_parser("serve", help="run the proxy"))
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("dev-setup", help="make a SoftHSM-backed rig in DIR")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--region", default="us-east-1")
    s.add_argument("--prefix", default="example/xks")
    s.add_argument("--module", help="SoftHSM2 library path (found automatically)")
    s.set_defaults(func=cmd_dev_setup)

    keys = sub.add_parser("keys", help="external keys in the HSM")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    s = with_config(ksub.add_parser("create", help="generate a new AES-256 key in the HSM"))
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
        s.set_defaults(func=_keys_status(status))

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

    s = with_config(sub.add_parser("kms-config", help="print the KMS console JSON for a prefix"))
    s.add_argument("--prefix", required=True)
    s.set_defaults(func=cmd_kms_config)

    s = with_config(sub.add_parser("check", help="validate config, open HSMs, run the KAT"))
    s.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"xksproxy: config: {problem}", file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"xksproxy: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code
