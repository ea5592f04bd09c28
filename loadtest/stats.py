"""Raw samples of a run, merged across generator processes, and their summary."""

from __future__ import annotations

import json
import math
import statistics
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Samples:
    """What one generator process saw.  Times are ``time.perf_counter()`` seconds, which on
    Linux is CLOCK_MONOTONIC and so comparable between processes of one host."""

    names: tuple[str, ...]  # API names, indexed by the pool's API numbers
    latencies: list[array[float]]  # per API: seconds from (intended) send to response
    errors: Counter[str] = field(default_factory=Counter)  # errorName -> count
    statuses: Counter[int] = field(default_factory=Counter)  # non-200 status (0: no response)
    started: float = 0.0  # first (intended) send
    ended: float = 0.0  # last response
    sent: int = 0
    reconnects: int = 0
    cpu: float = 0.0  # CPU seconds (user + system) the generator spent on the run
    lag_max: float = 0.0  # open loop: worst delay of the generator's own schedule
    lag_sum: float = 0.0

    @classmethod
    def empty(cls, names: tuple[str, ...]) -> Samples:
        return cls(names, [array("d") for _ in names])

    @property
    def completed(self) -> int:
        """Responses received (errors included)."""
        return sum(len(a) for a in self.latencies)


def merge(parts: Sequence[Samples]) -> Samples:
    """One process's worth of samples from several (same API names)."""
    out = Samples.empty(parts[0].names)
    out.started = min(p.started for p in parts)
    out.ended = max(p.ended for p in parts)
    out.lag_max = max(p.lag_max for p in parts)
    for p in parts:
        for mine, theirs in zip(out.latencies, p.latencies, strict=True):
            mine.extend(theirs)
        out.errors.update(p.errors)
        out.statuses.update(p.statuses)
        out.sent += p.sent
        out.reconnects += p.reconnects
        out.lag_sum += p.lag_sum
        out.cpu += p.cpu
    return out


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank *p*-th percentile of an ascending, non-empty sequence: the smallest
    value with at least p% of the values at or below it."""
    if not ordered:
        raise ValueError("no values")
    rank = math.ceil(round(p / 100 * len(ordered), 9))  # round: 99.9% of 1000 is 999, not 999.0…1
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of latencies in seconds, in milliseconds (3 decimals)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p:g}": round(percentile(ordered, p) * 1000, 3) for p in PERCENTILES}
    out["max"] = round(ordered[-1] * 1000, 3)
    out["mean"] = round(statistics.fmean(ordered) * 1000, 3)
    return out


def summarize(s: Samples) -> dict[str, Any]:
    """The JSON-ready summary of a run (latency over every response, errors included)."""
    seconds = max(s.ended - s.started, 1e-9)
    everything: list[float] = []
    by_api: dict[str, Any] = {}
    for name, lat in zip(s.names, s.latencies, strict=True):
        if lat:
            everything.extend(lat)
            by_api[name] = {"requests": len(lat), "latency_ms": latency_ms(lat)}
    out: dict[str, Any] = {
        "requests": s.completed,
        "ok": s.completed - sum(n for status, n in s.statuses.items() if status),
        "sent": s.sent,
        "seconds": round(seconds, 3),
        "throughput_rps": round(s.completed / seconds, 1),
        "latency_ms": latency_ms(everything),
        "errors": dict(s.errors.most_common()),
        "statuses": {str(k): v for k, v in sorted(s.statuses.items())},
        "reconnects": s.reconnects,
        # What the generator costs: 1e6 / this is its ceiling in requests/s per core.
        "generator_cpu_us_per_request": round(s.cpu / max(s.sent, 1) * 1e6, 1),
    }
    if len(by_api) > 1:
        out["by_api"] = by_api
    return out


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of repeated runs: the first run's fields, with the median throughput and
    median of each latency figure; errors are added up.  The runs themselves go in ``runs``."""
    out = dict(runs[0])
    for key in ("throughput_rps", "achieved_rps", "requests", "ok"):
        if key in out:
            out[key] = statistics.median(r[key] for r in runs)
    out["latency_ms"] = {
        name: statistics.median(r["latency_ms"][name] for r in runs if name in r["latency_ms"])
        for name in out["latency_ms"]
    }
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    out["errors"] = dict(errors)
    out["runs"] = list(runs)
    return out


def report(result: dict[str, Any], json_path: str | None) -> int:
    """Print *result* as JSON, also to *json_path* if given; the command's exit status."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0
