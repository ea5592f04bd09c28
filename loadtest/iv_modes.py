"""Encrypt through the proxy in each AES-GCM IV mode, against the caller-IV mode, same run.

    python -m loadtest.iv_modes --out results/ [--rounds 3] [--duration 5] [--latency-ms 0]

One rig per vendor profile of the PKCS#11 shim (``xksproxy dev-setup --emulate PROFILE
--fault-injection``): ``softhsm`` (the shim passing every call through: the proxy makes the IV,
mode ``caller``), ``cloudhsm`` and ``nshield`` (``hsm-written``), ``protectserver-fips``
(``hsm-written``, the IV made at ``C_EncryptInit``), ``luna`` (``hsm-appended``, 12 bytes) and
``luna-fips`` (``hsm-appended``, 16 bytes).  Every rig's proxy is started (``--workers``), then
in each round every profile in turn gets a closed-loop Encrypt run of ``--duration`` seconds;
figures are the median over rounds, and each is also given as a ratio to ``softhsm`` of the
same round set.  With ``--latency-ms N`` every HSM's control file is ``slow N C_EncryptInit
C_Encrypt C_DecryptInit C_Decrypt`` (a network HSM): the p50 then counts the round trips of an
Encrypt, which must be the same in every mode.  Servers are always stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest import driver, servers
from loadtest.presign import Target
from loadtest.stats import median_run
from loadtest.xks_load import measure, prepare
from xksproxy.dev.faultinject import FaultControl

PROFILES = ("softhsm", "cloudhsm", "nshield", "protectserver-fips", "luna", "luna-fips")
BASELINE = "softhsm"
WARMUP_SECONDS = 1.0
SLOWED = ["C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt"]


def make_rig(directory: Path, profile: str) -> Path:
    """A one-HSM rig of *profile* with fault injection, on free ports; its directory."""
    if not (directory / "xksproxy.toml").exists():
        subprocess.run(
            [
                sys.executable, "-m", "xksproxy", "dev-setup", str(directory),
                "--emulate", profile, "--fault-injection",
                "--port", str(servers.free_port()), "--metrics-port", str(servers.free_port()),
            ],
            cwd=servers.ROOT, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
    return directory


def run_round(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    load = driver.Load("closed", args.concurrency, args.duration, procs=args.procs)
    return measure(target, prepare(target, {"encrypt": 1}, ["foo"], args.payload), load)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for rigs, logs and iv_modes.json")
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--payload", type=int, default=32)
    p.add_argument("--latency-ms", type=int, default=0, help="per slowed PKCS#11 call")
    args = p.parse_args(argv)
    profiles = [x for x in args.profiles.split(",") if x]
    if BASELINE not in profiles:
        profiles.insert(0, BASELINE)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rigs = {name: make_rig(out / f"rig-{name}", name) for name in profiles}
    for rig in rigs.values():
        control = FaultControl(rig / "faults" / "softhsm-1")
        if args.latency_ms:
            control.slow(args.latency_ms, SLOWED)
        else:
            control.ok()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in profiles}
    with contextlib.ExitStack() as stack:
        targets = {}
        for name, rig in rigs.items():
            target = Target.from_rig(str(rig))
            cmd = servers.proxy_cmd(rig / "xksproxy.toml", args.workers, True)
            stack.enter_context(
                servers.running(cmd, out / f"proxy-{name}.log", servers.pinging(target.port))
            )
            warm = driver.Load("closed", args.concurrency, WARMUP_SECONDS, procs=args.procs)
            measure(target, prepare(target, {"encrypt": 1}, ["foo"], args.payload), warm)
            targets[name] = target
        for i in range(args.rounds):
            for name in profiles:
                result = run_round(targets[name], args)
                runs[name].append(result)
                print(
                    f"# round {i + 1} {name}: {result['throughput_rps']:.0f}/s "
                    f"p50 {result['latency_ms']['p50']:.2f} ms, errors {result['errors']}",
                    file=sys.stderr,
                )
    for rig in rigs.values():
        FaultControl(rig / "faults" / "softhsm-1").ok()
    medians = {name: median_run(r) for name, r in runs.items()}
    base = medians[BASELINE]
    report = {
        "conditions": {k: v for k, v in vars(args).items() if k != "out"},
        "profiles": {
            name: {
                "throughput_rps": m["throughput_rps"],
                "latency_ms": m["latency_ms"],
                "errors": m["errors"],
                "throughput_vs_caller": round(m["throughput_rps"] / base["throughput_rps"], 3),
                "p50_vs_caller": round(m["latency_ms"]["p50"] / base["latency_ms"]["p50"], 3),
            }
            for name, m in medians.items()
        },
    }
    (out / "iv_modes.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| profile | Encrypt/s | p50 ms | p99 ms | vs caller-IV (throughput, p50) | errors |")
    print("|---|---|---|---|---|---|")
    for name, row in report["profiles"].items():
        lat = row["latency_ms"]
        print(
            f"| {name} | {row['throughput_rps']:.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
            f"{row['throughput_vs_caller']:.2f}x, {row['p50_vs_caller']:.2f}x | "
            f"{sum(row['errors'].values()) if row['errors'] else 0} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
