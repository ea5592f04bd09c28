"""``dev-setup``: a SoftHSM-backed rig in a directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xksproxy.cli.common import CliError, print_json


def cmd_dev_setup(args: argparse.Namespace) -> int:
    from xksproxy.dev.setup import SetupError, dev_setup, emulation_profiles

    if args.emulate is not None:
        try:  # a list of the wrong length is bad usage, found before anything is made
            emulation_profiles(args.emulate, args.hsms)
        except SetupError as exc:
            raise CliError(str(exc), 2) from exc
    rig = dev_setup(
        Path(args.dir),
        port=args.port,
        region=args.region,
        prefix=args.prefix,
        module=args.module,
        hsms=args.hsms,
        fault_injection=args.fault_injection,
        emulate=args.emulate,
        host=args.host,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        proxies=args.proxies,
    )
    if rig.haproxy_cfg is not None:
        print(f"# fleet ready: haproxy -f {rig.haproxy_cfg}", file=sys.stderr)
        for path in rig.proxy_configs:
            print(f"#   and: xksproxy serve -c {path}", file=sys.stderr)
        print(f"# key commands: xksproxy keys ... -c {rig.config_path}", file=sys.stderr)
    else:
        print(f"# rig ready: xksproxy serve -c {rig.config_path}", file=sys.stderr)
    print(f"# KMS console file: {rig.kms_config_path}", file=sys.stderr)
    print_json(rig.kms_config)
    return 0
