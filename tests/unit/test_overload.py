"""Load shedding (http/overload.py) and the pool's early 429, in this process (the same at the
HTTP edge: tests/integration/test_overload_http.py).

The same behaviour under real load is measured in loadtest/ (BENCHMARKS.md, "Overload").
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.support.waiting import wait_until
from xksproxy.errors import ThrottlingError
from xksproxy.hsm.pool import SessionPool
from xksproxy.hsm.runner import CallRunner
from xksproxy.http import overload
from xksproxy.http.overload import LoadGuard


async def test_the_refused_fraction_follows_the_loop_delay() -> None:
    guard = LoadGuard(lag_limit_s=0.02, max_in_flight=100)
    guard.start()
    try:
        await asyncio.sleep(0.05)
        assert guard.fraction == 0.0
        # A loop that keeps running late: blocked for 30 ms at a time, ten times.
        for _ in range(10):
            time.sleep(0.03)  # noqa: ASYNC251
            await asyncio.sleep(0.001)
        assert guard.fraction > 0.0
        grown = guard.fraction
        deadline = time.monotonic() + 3
        while guard.fraction > 0.0:  # the delay is gone: the fraction shrinks back to 0
            assert time.monotonic() < deadline, f"the fraction stayed at {guard.fraction}"
            await asyncio.sleep(0.01)
        assert grown <= overload.MAX_FRACTION
    finally:
        await guard.stop()


def test_a_fraction_of_requests_is_refused_and_counted() -> None:
    guard = LoadGuard(lag_limit_s=0.05, max_in_flight=100)
    draws = iter([0.1, 0.9, 0.4, 0.6])
    guard._random = lambda: next(draws)
    guard.fraction = 0.5
    outcomes = [guard.overloaded() for _ in range(4)]
    assert outcomes == ["the proxy is overloaded", None, "the proxy is overloaded", None]
    assert guard.shed == 2


async def test_pool_throttles_at_once_when_the_queue_would_outlast_the_deadline() -> None:
    runner = CallRunner(2)
    pool = SessionPool(1, lambda: 0, lambda s: None, runner)
    await pool.start()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        holder = asyncio.create_task(pool.run(lambda s: release.wait(5), loop.time() + 5))
        await wait_until(lambda: pool.busy == 1)
        pool.call_seconds = 0.1  # calls have been taking 100 ms
        started = loop.time()
        with pytest.raises(ThrottlingError):
            await pool.run(lambda s: s, loop.time() + 0.05)  # cannot be reached in 50 ms
        assert loop.time() - started < 0.04  # refused at once, not at the deadline
        waiting = asyncio.create_task(pool.run(lambda s: s + 1, loop.time() + 2))
        await asyncio.sleep(0.02)
        assert pool.waiting == 1  # time enough: this one queues
        release.set()
        assert await holder is True
        assert await waiting == 1
    finally:
        release.set()
        await pool.close()
        runner.shutdown(wait=False)
