"""A load split over several generator processes, started together, samples merged.

Each process (``multiprocessing`` spawn context: no inherited event loop or PKCS#11 state) opens
its connections, then all of them wait at a barrier while the parent picks one start time on
the shared monotonic clock.  Closed loop: the connections (and any request budget) are divided.
Open loop: the fixed-rate schedule is dealt out round-robin, request *g* to process
``g % procs``, so together they send exactly the schedule one process would.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from loadtest.engine import Share, clock, new_loop, run_share
from loadtest.presign import Pool
from loadtest.stats import Samples, merge

SYNC_TIMEOUT = 60.0  # seconds for every process to start and connect
START_DELAY = 0.05  # seconds between the start signal and the first send


@dataclass(frozen=True)
class Load:
    """What to send: ``connections`` is the concurrency of a closed loop."""

    mode: str  # "closed" | "open"
    connections: int
    duration: float
    rate: float = 0.0  # open loop: requests per second
    procs: int = 1
    requests: int = 0  # closed loop: stop after this many (0: no limit)
    grace: float = 5.0  # seconds to wait for the last responses


def split(load: Load, pool_size: int) -> list[Share]:
    """The shares of *load* for its processes (never more processes than connections)."""
    procs = max(1, min(load.procs, load.connections))
    total = round(load.duration * load.rate) if load.mode == "open" else 0
    shares = []
    for k in range(procs):
        conns = load.connections // procs + (k < load.connections % procs)
        budget = load.requests // procs + (k < load.requests % procs) if load.requests else 0
        offset = k if load.mode == "open" else k * pool_size // procs
        shares.append(
            Share(
                mode=load.mode,
                connections=conns,
                duration=load.duration,
                rate=load.rate,
                total=total,
                offset=offset,
                stride=procs,
                requests=budget,
                grace=load.grace,
            )
        )
    return shares


def run(host: str, port: int, pool: Pool, load: Load) -> Samples:
    """Run *load* against host:port with requests from *pool*; every process's samples merged."""
    shares = split(load, len(pool.raws))
    if len(shares) == 1:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(run_share(host, port, pool, shares[0], lambda: clock() + START_DELAY))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares) + 1)
    start: Synchronized[float] = ctx.Value("d", 0.0)
    results: multiprocessing.Queue[Samples | str] = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(host, port, pool, share, barrier, start, results))
        for share in shares
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            barrier.wait(SYNC_TIMEOUT)  # everyone connected
            start.value = clock() + START_DELAY
            barrier.wait(SYNC_TIMEOUT)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"a generator process failed: {results.get(timeout=5)}") from None
        parts = [results.get(timeout=load.duration + load.grace + SYNC_TIMEOUT) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"a generator process failed: {failed[0]}")
    return merge([p for p in parts if isinstance(p, Samples)])


def _child(
    host: str,
    port: int,
    pool: Pool,
    share: Share,
    barrier: Any,
    start: Synchronized[float],
    results: multiprocessing.Queue[Samples | str],
) -> None:
    def sync() -> float:
        barrier.wait(SYNC_TIMEOUT)
        barrier.wait(SYNC_TIMEOUT)
        return start.value

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            results.put(runner.run(run_share(host, port, pool, share, sync)))
    except Exception as exc:
        barrier.abort()
        results.put(f"{type(exc).__name__}: {exc}")
