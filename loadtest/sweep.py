"""Open-loop runs at several offered rates, and a PNG of latency percentiles against rate.

    python -m loadtest.sweep --rig DIR --rates 1000,2000,4000,6000,8000 --duration 5 \\
        [--api encrypt] [--connections 64] [--procs 1] [--repeat 1] --out results/

    python -m loadtest.sweep --rig DIR --latencies 0,1,5 --rates 500,1000,1800,2500 \\
        --api mix --mix encrypt=1,decrypt=1 --aad 100 --out results/

Each run signs a fresh pool and is an open-loop run of :mod:`loadtest.xks_load`; with
``--repeat`` the median of each figure is kept.  Writes ``sweep.json`` and ``sweep.png`` (p50,
p90, p99, p99.9 on a log scale, each point labelled with the achieved rate) into ``--out``.
With ``--latencies`` (a rig made with ``--fault-injection``), the whole sweep runs once per HSM
latency (each data-path PKCS#11 call slowed by that many ms, :mod:`loadtest.hsm_latency`), and
the PNG shows p50 and p99 of each latency against the offered rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import driver
from loadtest.hsm_latency import hsm_latency
from loadtest.presign import Pool, Target
from loadtest.stats import PERCENTILES, median_run
from loadtest.xks_load import add_request_args, measure, pool_of, target_of

KMS_BUDGET_MS = 250.0  # KMS's end-to-end timeout for a call to the proxy


def sweep(
    target: Target,
    make_pool: Callable[[], Pool],
    rates: Sequence[float],
    duration: float,
    connections: int,
    procs: int = 1,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """One open-loop point per rate (the median of *repeat* runs), in rate order."""
    points = []
    for rate in rates:
        load = driver.Load("open", connections, duration, rate, procs)
        runs = [measure(target, make_pool(), load) for _ in range(repeat)]
        point = median_run(runs) if repeat > 1 else runs[0]
        print(
            f"# offered {rate:.0f}/s: achieved {point['achieved_rps']:.0f}/s,"
            f" p99 {point['latency_ms'].get('p99', math.nan)} ms, errors {point['errors']}",
            file=sys.stderr,
            flush=True,
        )
        points.append(point)
    return points


def plot(points: Sequence[dict[str, Any]], png: Path, title: str) -> None:
    """Latency percentiles (log scale) against offered rate, achieved rates noted."""
    import matplotlib  # here: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [p["offered_rps"] for p in points]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for pct in PERCENTILES:
        name = f"p{pct:g}"
        ax.plot(
            offered,
            [p["latency_ms"].get(name, math.nan) for p in points],
            marker="o",
            label=name,
        )
    ax.axhline(KMS_BUDGET_MS, linestyle="--", color="grey", label="KMS budget 250 ms")
    top = [p["latency_ms"].get("p99.9", math.nan) for p in points]
    for x, y, p in zip(offered, top, points, strict=True):
        note = f"{p['achieved_rps']:.0f}/s"
        if p["errors"]:
            note += f"\n{sum(p['errors'].values())} err"
        ax.annotate(note, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", size=7)
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s); labels: achieved rate")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_latencies(
    series: Sequence[tuple[int, Sequence[dict[str, Any]]]], png: Path, title: str
) -> None:
    """p50 (solid) and p99 (dashed) against offered rate, one colour per HSM latency."""
    import matplotlib  # here: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for index, (ms, points) in enumerate(series):
        colour = f"C{index}"
        offered = [p["offered_rps"] for p in points]
        for name, style in (("p50", "-"), ("p99", "--")):
            ax.plot(
                offered,
                [p["latency_ms"].get(name, math.nan) for p in points],
                linestyle=style,
                marker="o",
                color=colour,
                label=f"{ms} ms per HSM call: {name}",
            )
        for x, p in zip(offered, points, strict=True):
            if p["errors"] or p["achieved_rps"] < 0.98 * p["offered_rps"]:
                note = f"{p['achieved_rps']:.0f}/s"
                if p["errors"]:
                    note += f", {sum(p['errors'].values())} err"
                y = p["latency_ms"].get("p99", math.nan)
                ax.annotate(
                    note, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", size=7
                )
    ax.axhline(KMS_BUDGET_MS, linestyle=":", color="grey", label="KMS budget 250 ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s); labels: achieved rate where short of it, errors")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def rates_of(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


def latencies_of(text: str) -> list[int]:
    return [int(ms) for ms in text.split(",") if ms.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_request_args(p)
    p.add_argument("--rates", type=rates_of, required=True, help="comma-separated requests/s")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default="results", help="directory for sweep.json and sweep.png")
    p.add_argument(
        "--latencies",
        type=latencies_of,
        help="comma-separated ms per data-path HSM call: one sweep each, drawn together "
        "(a rig made with --fault-injection); default: --hsm-latency-ms",
    )
    args = p.parse_args(argv)
    target = target_of(args)
    series: list[tuple[int, list[dict[str, Any]]]] = []
    for ms in args.latencies or [args.hsm_latency_ms]:
        print(f"# HSM latency {ms} ms per call", file=sys.stderr, flush=True)
        with hsm_latency(args.rig, ms):
            points = sweep(
                target,
                lambda: pool_of(args, target, args.connections),
                args.rates,
                args.duration,
                args.connections,
                args.procs,
                args.repeat,
            )
        series.append((ms, points))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "api": args.api,
        "payload_bytes": args.payload,
        "aad_bytes": args.aad,
        "keys": args.keys,
        "series": [{"hsm_latency_ms": ms, "points": points} for ms, points in series],
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"xksproxy open loop: {args.api}, {args.payload} B"
    if args.latencies:
        plot_latencies(series, out / "sweep.png", title + ", by HSM latency")
    else:
        plot(series[0][1], out / "sweep.png", f"{title}, {series[0][0]} ms per HSM call")
    summary = [
        {"hsm_latency_ms": ms, **{k: pt[k] for k in ("offered_rps", "achieved_rps", "latency_ms")}}
        for ms, points in series
        for pt in points
    ]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
