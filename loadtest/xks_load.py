"""Load an XKS proxy with real SigV4-signed requests, closed or open loop.

    python -m loadtest.xks_load --rig DIR --api encrypt --payload 32 \\
        --mode closed --concurrency 16 --duration 10 [--procs 2] [--json out.json]
    python -m loadtest.xks_load --rig DIR --api mix --mix encrypt=45,decrypt=45,metadata=9 \\
        --mode open --rate 1800 --connections 64 --duration 10
    python -m loadtest.xks_load --rig DIR --keys 10000 --key-prefix bench- ...

``--rig DIR`` is a directory made by ``xksproxy dev-setup DIR`` (its ``kms-xks-config.json``
names the endpoint, path and credential).  A pool of distinct requests is signed with botocore
just before each run (decrypt requests carry ciphertexts made by real encrypt calls first) and
replayed as raw bytes by :mod:`loadtest.engine`; ``--procs P`` splits the load over P
processes (:mod:`loadtest.driver`).  Closed loop: ``--concurrency`` connections, each sending
its next request when the last one is answered.  Open loop: ``--rate`` requests per second
over ``--connections`` connections, latency measured from each request's due time.

Prints (and with ``--json`` writes) throughput, latency p50/p90/p99/p99.9/max/mean in ms over
every response, errors by errorName and by HTTP status, and for open loop the offered and
achieved rates and how late the generator's own schedule ran.  Speed is measured here and
reported; it is never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from loadtest import driver
from loadtest.engine import fetch, new_loop
from loadtest.hsm_latency import hsm_latency
from loadtest.presign import (
    APIS,
    CIPHERTEXT_FIELDS,
    MAX_DURATION,
    POOL,
    Plan,
    Pool,
    Target,
    build_pool,
    key_names,
    parse_weights,
)
from loadtest.stats import report, summarize

DEFAULT_MIX = "encrypt=45,decrypt=45,metadata=9,health=1"
CIPHERTEXTS_PER_KEY = 64  # distinct ciphertexts for a single key; one per key when many


def make_ciphertexts(
    target: Target, keys: Sequence[str], payload: int, connections: int, aad: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Encrypt under each of *keys* through the proxy: the inputs of decrypt requests."""
    if not keys:
        return {}
    per_key = CIPHERTEXTS_PER_KEY if len(keys) == 1 else 1
    plan = Plan([("encrypt", key) for key in keys for _ in range(per_key)])
    pool = build_pool(target, plan, payload, {}, aad)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        responses = runner.run(fetch(target.host, target.port, pool, connections))
    out: dict[str, list[dict[str, Any]]] = {}
    for (_, key), (status, body) in zip(plan.slots, responses, strict=True):
        if status != 200:
            raise SystemExit(
                f"encrypt under {key!r} for the decrypt pool failed: {status} {body!r}"
            )
        enc = json.loads(body)
        out.setdefault(key, []).append({k: enc[k] for k in CIPHERTEXT_FIELDS})
    return out


def prepare(
    target: Target,
    weights: dict[str, int],
    keys: Sequence[str],
    payload: int,
    pool_size: int = POOL,
    connections: int = 16,
    aad: int = 0,
) -> Pool:
    """Sign a fresh pool of requests (making ciphertexts first if the mix decrypts); every
    Encrypt and Decrypt carries *aad* bytes of AAD."""
    plan = Plan.make(weights, keys, pool_size)
    cts = make_ciphertexts(target, plan.decrypt_keys(), payload, connections, aad)
    return build_pool(target, plan, payload, cts, aad)


def measure(target: Target, pool: Pool, load: driver.Load) -> dict[str, Any]:
    """Run *load* with *pool* against *target*; the JSON-ready summary."""
    if load.duration > MAX_DURATION:
        raise SystemExit(f"--duration must be <= {MAX_DURATION} s (the SigV4 window)")
    samples = driver.run(target.host, target.port, pool, load)
    out: dict[str, Any] = {
        "mode": load.mode,
        "connections": load.connections,
        "procs": max(1, min(load.procs, load.connections)),
        "duration_s": load.duration,
    }
    out.update(summarize(samples))
    if load.mode == "open":
        out["offered_rps"] = load.rate
        out["achieved_rps"] = out["throughput_rps"]
        out["schedule_lag_ms"] = {
            "mean": round(samples.lag_sum / max(samples.sent, 1) * 1000, 3),
            "max": round(samples.lag_max * 1000, 3),
        }
    return out


def weights_of(api: str, mix: str) -> dict[str, int]:
    return parse_weights(mix) if api == "mix" else {api: 1}


def add_request_args(p: argparse.ArgumentParser) -> None:
    """Options saying which requests to send (shared with the sweep)."""
    p.add_argument("--rig", default=".rig", help="directory made by `xksproxy dev-setup`")
    p.add_argument("--port", type=int, help="send to this port instead (e.g. the floor server)")
    p.add_argument("--api", choices=[*APIS, "mix"], default="encrypt")
    p.add_argument("--mix", default=DEFAULT_MIX, help="API weights for --api mix")
    p.add_argument("--payload", type=int, default=32, help="plaintext bytes")
    p.add_argument("--aad", type=int, default=0, help="AAD bytes in every Encrypt and Decrypt")
    p.add_argument(
        "--hsm-latency-ms",
        type=int,
        default=0,
        help="a network HSM: each data-path PKCS#11 call takes this long during the run "
        "(a rig made with --fault-injection; loadtest/hsm_latency.py)",
    )
    p.add_argument("--key", default="foo", help="the one key used (without --key-prefix)")
    p.add_argument("--keys", type=int, default=1, help="spread over this many keys")
    p.add_argument("--key-prefix", help="keys are PREFIX0 .. PREFIX{keys-1}")
    p.add_argument("--pool", type=int, default=POOL, help="distinct signed requests (>= keys)")
    p.add_argument("--procs", type=int, default=1, help="generator processes")


def target_of(args: argparse.Namespace) -> Target:
    target = Target.from_rig(args.rig)
    return target if args.port is None else target.with_port(args.port)


def pool_of(args: argparse.Namespace, target: Target, connections: int) -> Pool:
    keys = key_names(args.key, args.keys, args.key_prefix)
    return prepare(
        target, weights_of(args.api, args.mix), keys, args.payload, args.pool, connections, args.aad
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_request_args(p)
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--concurrency", type=int, default=16, help="closed loop: connections")
    p.add_argument("--rate", type=float, default=1000.0, help="open loop: requests per second")
    p.add_argument("--connections", type=int, default=64, help="open loop: connections")
    p.add_argument("--duration", type=float, default=10.0, help=f"seconds (<= {MAX_DURATION})")
    p.add_argument("--requests", type=int, default=0, help="closed loop: stop after this many")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    if args.keys > 1 and args.key_prefix is None:
        p.error("--keys needs --key-prefix")
    conns = args.concurrency if args.mode == "closed" else args.connections
    load = driver.Load(args.mode, conns, args.duration, args.rate, args.procs, args.requests)
    target = target_of(args)
    result = {"api": args.api, "payload_bytes": args.payload, "keys": args.keys}
    if args.api == "mix":
        result["mix"] = weights_of(args.api, args.mix)
    if args.hsm_latency_ms:
        result["hsm_latency_ms"] = args.hsm_latency_ms
    with hsm_latency(args.rig, args.hsm_latency_ms):
        result.update(measure(target, pool_of(args, target, conns), load))
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
