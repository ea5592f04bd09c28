"""One reproducible benchmark run: floor, raw HSM loop and proxy, measured together.

    python -m loadtest.bench --rig DIR --workers 2 --out results/ [--repeat 3]

1. **floor**: starts :mod:`loadtest.floor` with ``--workers`` processes and drives it
   closed-loop with the proxy's own encrypt request bytes: what the generator and an aiohttp
   server on this machine reach at best.
2. **HSM loop**: :mod:`loadtest.hsm_loop` with 1 process and with ``--workers`` processes
   (the session-copy and find-by-label figures from the first run).
3. **proxy**: starts ``python -m xksproxy serve -c DIR/xksproxy.toml --workers N`` (without
   ``--workers`` if this version of serve lacks it; the JSON says so), waits for ``GET /ping``,
   warms up, runs closed-loop encrypt, then an open-loop sweep (``--rates``, or by default
   fractions of the closed-loop throughput) and draws ``sweep.png``.

Each closed-loop figure and each sweep point is the median of ``--repeat`` runs, every run
with a freshly signed pool.  The table printed at the end gives the proxy's figures and their
ratio to the floor and to the HSM loop of the same run; everything goes to ``bench.json`` in
``--out``.  Servers are stopped whatever happens (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest import driver, servers
from loadtest.presign import Target
from loadtest.stats import median_run
from loadtest.sweep import plot, rates_of, sweep
from loadtest.xks_load import measure, prepare

SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1)  # of the closed-loop throughput
WARMUP_SECONDS = 2.0


def closed_loop(target: Target, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """The median of ``--repeat`` closed-loop encrypt runs against *target*."""
    load = driver.Load("closed", args.concurrency, args.duration, procs=args.procs)
    runs = []
    for i in range(args.repeat):
        pool = prepare(target, {"encrypt": 1}, [args.key], args.payload)
        runs.append(measure(target, pool, load))
        print(f"# {label} run {i + 1}: {runs[-1]['throughput_rps']:.0f}/s", file=sys.stderr)
    return median_run(runs)


def hsm_loop(args: argparse.Namespace, procs: int, extras: bool) -> dict[str, Any]:
    """One run of the raw HSM loop, in its own process."""
    cmd = [
        sys.executable,
        "-m",
        "loadtest.hsm_loop",
        "--rig",
        args.rig,
        "--key",
        args.key,
        "--seconds",
        str(args.hsm_seconds),
        "--procs",
        str(procs),
        "--payload",
        str(args.payload),
    ]
    if not extras:
        cmd.append("--no-extras")
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=servers.ROOT, timeout=600, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def hsm_phase(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for procs in sorted({1, args.workers}):
        runs = [hsm_loop(args, procs, extras=procs == 1 and i == 0) for i in range(args.repeat)]
        rates = sorted(r["ops_per_s"] for r in runs)
        out[f"procs_{procs}"] = {"ops_per_s": rates[len(rates) // 2], "runs": runs}
        print(f"# HSM loop, {procs} process(es): {rates} ops/s", file=sys.stderr)
    return out


def proxy_phase(target: Target, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    rig = Path(args.rig)
    config, note = servers.proxy_config(rig)
    with_flag = servers.serve_has_workers()
    result: dict[str, Any] = {"config": str(config), "workers_flag": with_flag}
    if note:
        result["config_note"] = note
    if not with_flag:
        result["workers_note"] = "xksproxy serve has no --workers: ran one process"
    cmd = servers.proxy_cmd(config, args.workers, with_flag)
    with servers.running(cmd, out_dir / "proxy.log", servers.pinging(target.port)):
        warm = driver.Load("closed", args.concurrency, WARMUP_SECONDS, procs=args.procs)
        measure(target, prepare(target, {"encrypt": 1}, [args.key], args.payload), warm)
        result["closed"] = closed_loop(target, args, "proxy")
        best = result["closed"]["throughput_rps"]
        rates = args.rates or [round(best * f, -2) for f in SWEEP_FRACTIONS]
        result["sweep"] = sweep(
            target,
            lambda: prepare(target, {"encrypt": 1}, [args.key], args.payload),
            rates,
            args.sweep_duration,
            args.connections,
            args.procs,
            args.repeat,
        )
    return result


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(res: dict[str, Any], workers: int) -> str:
    floor = res["floor"]
    hsm1 = res["hsm_loop"]["procs_1"]["ops_per_s"]
    hsm_w = res["hsm_loop"][f"procs_{workers}"]["ops_per_s"]
    proxy = res["proxy"]["closed"]
    rps = proxy["throughput_rps"]
    pl, fl = proxy["latency_ms"], floor["latency_ms"]
    rows = [
        ("figure", "value", "ratio"),
        (f"floor, {workers} worker(s): requests/s", f"{floor['throughput_rps']:.0f}", ""),
        ("HSM loop, 1 process: ops/s", f"{hsm1}", ""),
        (f"HSM loop, {workers} processes: ops/s", f"{hsm_w}", ""),
        (
            "proxy encrypt: requests/s",
            f"{rps:.0f}",
            f"{ratio(rps, floor['throughput_rps'])} of floor, {ratio(rps, hsm_w)} of HSM loop",
        ),
        (
            "proxy p50 / p99 / p99.9 ms",
            f"{pl['p50']} / {pl['p99']} / {pl['p99.9']}",
            f"floor {fl['p50']} / {fl['p99']} / {fl['p99.9']}",
        ),
        ("generator CPU µs per request", f"{proxy['generator_cpu_us_per_request']}", ""),
    ]
    for p in res["proxy"]["sweep"]:
        lat = p["latency_ms"]
        rows.append(
            (
                f"open loop {p['offered_rps']:.0f}/s: p50/p99/p99.9",
                f"{lat.get('p50')} / {lat.get('p99')} / {lat.get('p99.9')}",
                f"achieved {p['achieved_rps']:.0f}/s, {sum(p['errors'].values())} errors",
            )
        )
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:>{width[1]}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", default=".rig")
    p.add_argument("--workers", type=int, default=2, help="floor and proxy processes")
    p.add_argument("--out", default="results")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--key", default="foo")
    p.add_argument("--payload", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32, help="closed loop connections")
    p.add_argument("--duration", type=float, default=10.0, help="closed loop seconds")
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--hsm-seconds", type=float, default=3.0)
    p.add_argument("--rates", type=rates_of, help="sweep rates (default: from closed loop)")
    p.add_argument("--sweep-duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=64, help="open loop connections")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = Target.from_rig(args.rig)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: v for k, v in vars(args).items() if k != "rates"} | {"rates": args.rates},
    }
    floor_port = servers.free_port()
    floor_cmd = servers.floor_cmd(floor_port, args.workers)
    with servers.running(floor_cmd, out_dir / "floor.log", servers.listening(floor_port)):
        res["floor"] = closed_loop(target.with_port(floor_port), args, "floor")
    res["hsm_loop"] = hsm_phase(args)
    res["proxy"] = proxy_phase(target, args, out_dir)
    plot(
        res["proxy"]["sweep"],
        out_dir / "sweep.png",
        f"xksproxy encrypt {args.payload} B, {args.workers} worker(s), open loop",
    )
    text = table(res, args.workers)
    res["table"] = text.splitlines()
    (out_dir / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
