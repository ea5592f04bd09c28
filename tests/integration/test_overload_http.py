"""Load shedding (http/overload.py) at the HTTP edge: the real handler on 127.0.0.1 with a fake
HSM behind the Protocol (the guard and the pool's early 429 alone: tests/unit/test_overload.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.fake_hsm import FakeHsm, post_encrypt, serve_handler
from tests.support.waiting import wait_until
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
