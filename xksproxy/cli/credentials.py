"""``credentials add|remove`` and ``kms-config``: SigV4 credentials per URI path prefix."""

from __future__ import annotations

import argparse
import sys

from xksproxy.cli.common import CliError, config_of, prefix_arg, print_json
from xksproxy.config import api_base
from xksproxy.credentials import (
    ACCESS_KEY_ID_RE,
    MAX_LIVE_CREDENTIALS,
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
    without_credential,
)


def cmd_credentials_add(args: argparse.Namespace) -> int:
    config = config_of(args)
    prefix = prefix_arg(args.prefix)
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
    print_json(kms_console_json(api_base(prefix), cred))
    return 0


def cmd_credentials_remove(args: argparse.Namespace) -> int:
    config = config_of(args)
    prefix = prefix_arg(args.prefix)
    if not ACCESS_KEY_ID_RE.match(args.access_key_id):
        raise CliError("--access-key-id must be 20-30 characters of A-Z and 2-7", 2)
    path = config.sigv4.credentials_file
    creds = without_credential(
        load_credentials(path), prefix, args.access_key_id, allow_last=args.allow_last
    )
    save_credentials(path, creds)
    print(
        f"removed {args.access_key_id} from prefix {prefix!r}; reload running proxies with SIGHUP",
        file=sys.stderr,
    )
    return 0


def cmd_kms_config(args: argparse.Namespace) -> int:
    config = config_of(args)
    prefix = prefix_arg(args.prefix)
    creds = load_credentials(config.sigv4.credentials_file).get(prefix)
    if not creds:
        raise CliError(f"prefix {prefix!r} has no credentials (xksproxy credentials add)")
    print_json(kms_console_json(api_base(prefix), creds[-1]))
    return 0
