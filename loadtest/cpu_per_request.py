"""CPU time of the whole proxy (supervisor and workers) per request, at a fixed open-loop rate.

    python -m loadtest.cpu_per_request --rig DIR [--rate 1000] [--duration 15] \\
        [--hsm-latency-ms 1] [--workers 2]

Starts ``xksproxy serve -c DIR/xksproxy.toml`` in its own process group, signs a pool of
Encrypt/Decrypt requests (1:1, ``--payload`` bytes and ``--aad`` bytes of AAD), reads the CPU
time of the serving processes from ``/proc/PID/stat`` just before and just after an open-loop
run, and prints the CPU microseconds per request with the run's latency and errors.  Below
saturation this is the cost of a request, free of queueing; compare commits at the same rate,
runs alternated.  ``--hsm-latency-ms`` needs a rig made with ``--fault-injection``
(:mod:`loadtest.hsm_latency`).  The proxy is always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtest import driver, servers
from loadtest.hsm_latency import hsm_latency
from loadtest.presign import Target
from loadtest.xks_load import measure, prepare

WARM_SECONDS = 2.0


def cpu_seconds(leader: int) -> float:
    """User + system CPU time of *leader* and its children (the workers), in seconds."""
    children = subprocess.run(
        ["pgrep", "-P", str(leader)], capture_output=True, text=True, check=False
    ).stdout.split()
    total = 0
    for pid in [leader, *map(int, children)]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", required=True, help="directory made by `xksproxy dev-setup`")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--payload", type=int, default=32)
    p.add_argument("--aad", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hsm-latency-ms", type=int, default=0)
    p.add_argument("--log", default="cpu_per_request-proxy.log", help="the proxy's output")
    args = p.parse_args(argv)
    rig = Path(args.rig)
    target = Target.from_rig(rig)
    cmd = servers.proxy_cmd(rig / "xksproxy.toml", args.workers, True)
    with Path(args.log).open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=servers.ROOT, start_new_session=True
        )
    try:
        ready = servers.pinging(target.port)
        while not ready():
            if proc.poll() is not None:
                raise SystemExit(f"the proxy exited {proc.returncode}; see {args.log}")
            time.sleep(0.1)
        time.sleep(WARM_SECONDS)  # every worker listening and its first probe done
        pool = prepare(target, {"encrypt": 1, "decrypt": 1}, ["foo"], args.payload, aad=args.aad)
        load = driver.Load("open", args.connections, args.duration, args.rate, 1, 0)
        with hsm_latency(rig, args.hsm_latency_ms):
            before = cpu_seconds(proc.pid)
            result = measure(target, pool, load)
            after = cpu_seconds(proc.pid)
    finally:
        servers.stop(proc)
    print(
        json.dumps(
            {
                "cpu_us_per_request": round((after - before) / result["requests"] * 1e6, 1),
                "offered_rps": args.rate,
                "achieved_rps": result["achieved_rps"],
                "hsm_latency_ms": args.hsm_latency_ms,
                "latency_ms": result["latency_ms"],
                "errors": result["errors"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
