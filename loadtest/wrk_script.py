"""A wrk Lua script that sends a pool of pre-signed XKS requests, for a second, independent
generator (wrk, written in C, from Debian's ``wrk`` package) beside loadtest.xks_load.

    python -m loadtest.wrk_script --rig DIR --api encrypt --out /tmp/enc.lua
    wrk -t1 -c32 -d10s --latency -s /tmp/enc.lua http://127.0.0.1:PORT

Each wrk thread cycles through the pool (512 requests, signed now with botocore, valid for
the 5-minute SigV4 window: start wrk right away and keep runs short).  Encrypt, metadata and
health only: decrypt needs ciphertexts, which loadtest.xks_load makes first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtest.presign import POOL, Plan, Target, build_pool


def lua_string(raw: bytes) -> str:
    """*raw* as a double-quoted Lua string (CR and LF kept: long strings would fold them)."""
    out = []
    for b in raw:
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def script(raws: list[bytes]) -> str:
    lines = ["local requests = {"]
    lines += [f"  {lua_string(raw)}," for raw in raws]
    lines += [
        "}",
        "local n = 0",
        "request = function()",
        "  n = n % #requests + 1",
        "  return requests[n]",
        "end",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", default=".rig", help="directory with kms-xks-config.json")
    p.add_argument("--api", choices=["encrypt", "metadata", "health"], default="encrypt")
    p.add_argument("--key", default="foo")
    p.add_argument("--payload", type=int, default=32, help="plaintext bytes")
    p.add_argument("--port", type=int, help="another port than the rig's (e.g. the floor)")
    p.add_argument("--out", required=True, help="the Lua file to write")
    args = p.parse_args(argv)
    target = Target.from_rig(args.rig)
    if args.port is not None:
        target = target.with_port(args.port)
    pool = build_pool(target, Plan.make({args.api: 1}, [args.key], POOL), args.payload, {})
    Path(args.out).write_text(script(pool.raws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
