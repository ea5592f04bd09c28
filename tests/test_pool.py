"""The session pool with fake sessions (the pool is generic; PKCS#11 is tested elsewhere)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from xksproxy.errors import DependencyTimeoutError, ThrottlingError
from xksproxy.hsm.pool import BrokenSessionError, SessionPool
from xksproxy.hsm.runner import CallRunner


@dataclass
class Sessions:
    counter: itertools.count[int] = field(default_factory=itertools.count)
    opened: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)

    def open(self) -> int:
        n = next(self.counter)
        self.opened.append(n)
        return n

    def close(self, s: int) -> None:
        self.closed.append(s)


@pytest.fixture
async def pool1() -> AsyncIterator[tuple[SessionPool[int], Sessions]]:
    sessions = Sessions()
    executor = CallRunner(3)
    pool = SessionPool(1, sessions.open, sessions.close, executor)
    await pool.start()
    yield pool, sessions
    await pool.close()
    executor.shutdown(wait=False, cancel_futures=True)


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def wait_until(cond: object, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_call_runs_on_a_session(pool1: tuple[SessionPool[int], Sessions]) -> None:
    pool, _ = pool1
    assert await pool.run(lambda s: s + 100, deadline(1)) == 100
    assert pool.idle == 1 and pool.busy == 0


async def test_exhausted_pool_throttles_at_the_deadline(
    pool1: tuple[SessionPool[int], Sessions],
) -> None:
    pool, _ = pool1
    release = threading.Event()
    holder = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5)))
    await wait_until(lambda: pool.busy == 1)
    with pytest.raises(ThrottlingError):
        await pool.run(lambda s: s, deadline(0.05))
    release.set()
    assert await holder is True
    assert pool.waiting == 0


async def test_a_waiter_gets_the_session_when_it_is_released(
    pool1: tuple[SessionPool[int], Sessions],
) -> None:
    pool, _ = pool1
    release = threading.Event()
    holder = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5)))
    await wait_until(lambda: pool.busy == 1)
    waiter = asyncio.create_task(pool.run(lambda s: "second", deadline(5)))
    await wait_until(lambda: pool.waiting == 1)
    release.set()
    assert await waiter == "second"
    await holder


async def test_overrun_call_is_abandoned_and_its_session_replaced(
    pool1: tuple[SessionPool[int], Sessions],
) -> None:
    pool, sessions = pool1
    release = threading.Event()
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: release.wait(5), deadline(0.05))
    assert pool.stuck == 1
    # Every session is stuck: the next request fails fast with 503, not a throttle.
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: s, deadline(1))
    release.set()
    await wait_until(lambda: pool.idle == 1)
    assert sessions.closed == [0]
    assert sessions.opened == [0, 1]
    assert await pool.run(lambda s: s, deadline(1)) == 1


async def test_broken_session_is_replaced(pool1: tuple[SessionPool[int], Sessions]) -> None:
    pool, sessions = pool1

    def broken(s: int) -> int:
        raise BrokenSessionError("CKR_SESSION_HANDLE_INVALID")

    with pytest.raises(BrokenSessionError):
        await pool.run(broken, deadline(1))
    await wait_until(lambda: pool.idle == 1)
    assert sessions.closed == [0]
    assert await pool.run(lambda s: s, deadline(1)) == 1


async def test_other_errors_return_the_session(pool1: tuple[SessionPool[int], Sessions]) -> None:
    pool, sessions = pool1

    def fails(s: int) -> int:
        raise ValueError("caller's problem")

    with pytest.raises(ValueError):
        await pool.run(fails, deadline(1))
    assert pool.idle == 1 and sessions.closed == []


async def test_failed_reopen_is_refilled_later(pool1: tuple[SessionPool[int], Sessions]) -> None:
    pool, sessions = pool1
    real_open = sessions.open
    down = True

    def open_or_fail() -> int:
        if down:
            raise OSError("HSM unreachable")
        return real_open()

    pool._open = open_or_fail

    def broken(s: int) -> int:
        raise BrokenSessionError("CKR_DEVICE_ERROR")

    with pytest.raises(BrokenSessionError):
        await pool.run(broken, deadline(1))
    await wait_until(lambda: pool.lost == 1)
    # No live session at all: 503 at once (so the request can go to another HSM), not a wait.
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: s, deadline(5))
    down = False
    await pool.refill()
    assert pool.lost == 0
    assert await pool.run(lambda s: s, deadline(1)) == 1


async def test_many_concurrent_calls_share_a_small_pool() -> None:
    sessions = Sessions()
    executor = CallRunner(4)
    pool = SessionPool(2, sessions.open, sessions.close, executor)
    await pool.start()
    results = await asyncio.gather(*(pool.run(lambda s: s, deadline(5)) for _ in range(200)))
    assert set(results) <= {0, 1}
    assert pool.idle == 2 and pool.busy == 0
    await pool.close()
    executor.shutdown()


async def test_waiters_are_released_when_a_call_overruns_its_time_limit() -> None:
    sessions = Sessions()
    executor = CallRunner(3)
    pool = SessionPool(1, sessions.open, sessions.close, executor)
    await pool.start()
    release = threading.Event()
    hung = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5), call_timeout=0.05))
    await wait_until(lambda: pool.busy == 1)
    waiter = asyncio.create_task(pool.run(lambda s: s, deadline(5)))
    await wait_until(lambda: pool.waiting == 1)
    with pytest.raises(DependencyTimeoutError):
        await hung
    with pytest.raises(DependencyTimeoutError):  # long before its own 5 s deadline
        await asyncio.wait_for(waiter, 1)
    release.set()
    await wait_until(lambda: pool.idle == 1)
    await pool.close()
    executor.shutdown()


async def test_a_call_cut_by_the_request_deadline_does_not_release_waiters(
    pool1: tuple[SessionPool[int], Sessions],
) -> None:
    pool, _ = pool1
    release = threading.Event()
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: release.wait(5), deadline(0.05), call_timeout=1)
    assert pool.stuck == 1 and pool.stuck_slow == 0
    release.set()
    await wait_until(lambda: pool.idle == 1)
