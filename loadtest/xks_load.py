"""Closed-loop load against an XKS proxy with real SigV4-signed requests.

    python -m loadtest.xks_load --rig .rig --api encrypt --concurrency 16 --duration 20

Requests are signed with botocore ahead of time (a pool of distinct requests, each valid for
the 5-minute SigV4 window), so the generator spends its CPU on HTTP, not on signing.  It
reports throughput, latency percentiles and errors by errorName, and can write them as JSON.
Speed is measured here and reported in BENCHMARKS/closing notes; it is never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_DURATION = 240.0  # pre-signed requests must stay inside the 5-minute SigV4 window
POOL = 512


def _meta(op: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/load",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/load",
        "kmsOperation": op,
        "kmsRequestId": str(uuid.uuid4()),
    }


def _sign(url: str, body: bytes, akid: str, secret: str, region: str) -> dict[str, str]:
    req = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": "application/json"}
    )
    SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", region).add_auth(req)
    return dict(req.headers.items())


def build_requests(
    endpoint: str,
    base: str,
    akid: str,
    secret: str,
    region: str,
    api: str,
    key: str,
    payload: int,
    ciphertexts: list[dict[str, Any]],
) -> list[tuple[str, bytes, dict[str, str]]]:
    """A pool of distinct signed requests for *api*."""
    out = []
    for i in range(POOL):
        body: dict[str, Any]
        if api == "health":
            path, body = "/health", {"requestMetadata": _meta("KmsHealthCheck")}
        elif api == "metadata":
            path, body = f"/keys/{key}/metadata", {"requestMetadata": _meta("CreateKey")}
        elif api == "encrypt":
            path = f"/keys/{key}/encrypt"
            body = {
                "requestMetadata": _meta("Encrypt"),
                "encryptionAlgorithm": "AES_GCM",
                "plaintext": base64.b64encode(os.urandom(payload)).decode(),
            }
        else:
            path = f"/keys/{key}/decrypt"
            body = {
                "requestMetadata": _meta("Decrypt"),
                "encryptionAlgorithm": "AES_GCM",
                **ciphertexts[i % len(ciphertexts)],
            }
        raw = json.dumps(body).encode()
        url = endpoint + base + path
        out.append((url, raw, _sign(url, raw, akid, secret, region)))
    return out


async def _ciphertexts(
    session: aiohttp.ClientSession, reqs: list[tuple[str, bytes, dict[str, str]]]
) -> list[dict[str, Any]]:
    out = []
    for url, raw, headers in reqs[:64]:
        async with session.post(url, data=raw, headers=headers) as resp:
            enc = await resp.json()
            if resp.status != 200:
                raise SystemExit(f"encrypt for the decrypt pool failed: {enc}")
            out.append(
                {
                    k: enc[k]
                    for k in (
                        "ciphertext",
                        "ciphertextMetadata",
                        "initializationVector",
                        "authenticationTag",
                    )
                }
            )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kms = json.loads((Path(args.rig) / "kms-xks-config.json").read_text())
    cred = kms["XksProxyAuthenticationCredential"]
    common = (
        kms["XksProxyUriEndpoint"],
        kms["XksProxyUriPath"],
        cred["AccessKeyId"],
        cred["RawSecretAccessKey"],
        kms["Region"],
    )
    conn = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        cts: list[dict[str, Any]] = []
        if args.api == "decrypt":
            enc = build_requests(*common, "encrypt", args.key, args.payload, [])
            cts = await _ciphertexts(session, enc)
        reqs = build_requests(*common, args.api, args.key, args.payload, cts)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        stop_at = time.perf_counter() + min(args.duration, MAX_DURATION)
        budget = args.requests

        async def worker(offset: int) -> None:
            nonlocal budget
            i = offset
            while time.perf_counter() < stop_at and budget > 0:
                budget -= 1
                url, raw, headers = reqs[i % len(reqs)]
                i += args.concurrency
                t0 = time.perf_counter()
                async with session.post(url, data=raw, headers=headers) as resp:
                    body = await resp.read()
                latencies.append(time.perf_counter() - t0)
                if resp.status != 200:
                    errors[json.loads(body).get("errorName", str(resp.status))] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 3)

    return {
        "api": args.api,
        "payload_bytes": args.payload,
        "concurrency": args.concurrency,
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "p99.9": pct(99.9),
            "max": round(latencies[-1] * 1000, 3),
            "mean": round(statistics.fmean(latencies) * 1000, 3),
        },
        "errors": dict(errors),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", default=".rig", help="directory with kms-xks-config.json")
    p.add_argument("--api", choices=["encrypt", "decrypt", "metadata", "health"], default="encrypt")
    p.add_argument("--key", default="foo")
    p.add_argument("--payload", type=int, default=32, help="plaintext bytes")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help=f"seconds (<= {MAX_DURATION})")
    p.add_argument("--requests", type=int, default=10_000_000, help="stop after this many")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
