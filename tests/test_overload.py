"""Load shedding (http/overload.py) and the pool's early 429, with fakes behind the Protocols.

The same behaviour under real load is measured in loadtest/ (BENCHMARKS.md, "Overload").
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.test_handler import FakeHsm, post_encrypt, serve_handler
from tests.test_pool import wait_until
from xksproxy.errors import ThrottlingError
from xksproxy.hsm.pool import SessionPool
from xksproxy.hsm.runner import CallRunner
from xksproxy.http import overload
from xksproxy.http.overload import LoadGuard


class CountingHsm(FakeHsm):
    """Counts encrypt calls; each takes *delay* seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.calls = 0
        self.delay = delay

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return await super().encrypt(key_id, version, plaintext, aad, deadline)


@pytest.fixture
async def slow_one() -> AsyncIterator[tuple[CountingHsm, LoadGuard, TestServer]]:
    hsm = CountingHsm(delay=0.3)
    guard = LoadGuard(lag_limit_s=10.0, max_in_flight=1)
    server = await serve_handler(hsm, guard)
    yield hsm, guard, server
    await server.close()


async def test_requests_beyond_max_in_flight_get_429_at_once(
    slow_one: tuple[CountingHsm, LoadGuard, TestServer],
) -> None:
    hsm, guard, server = slow_one
    first = asyncio.create_task(post_encrypt(server))
    await wait_until(lambda: guard.in_flight == 1)
    started = time.monotonic()
    status, text, _ = await post_encrypt(server)
    assert time.monotonic() - started < 0.25  # answered before the first one's HSM call ends
    assert status == 429
    assert json.loads(text)["errorName"] == "ThrottlingException"
    assert (await first)[0] == 200
    assert hsm.calls == 1
    assert guard.in_flight == 0


async def test_a_lagging_loop_sheds_before_authentication() -> None:
    hsm = CountingHsm()
    guard = LoadGuard(lag_limit_s=0.05, max_in_flight=100)
    server = await serve_handler(hsm, guard)
    try:
        guard.fraction = 1.0  # as the sampler would set it for a loop running late for long
        url = f"http://127.0.0.1:{server.port}/t/kms/xks/v1/keys/k/encrypt"
        async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as resp:
            # Unsigned: 401 normally; shed first, so no SigV4 work is spent on it.
            assert resp.status == 429
            assert (await resp.json())["errorName"] == "ThrottlingException"
        guard.fraction = 0.0
        assert (await post_encrypt(server))[0] == 200
        assert hsm.calls == 1
    finally:
        await server.close()


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
