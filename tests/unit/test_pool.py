"""The session pool with fake sessions (the pool is generic; PKCS#11 is tested elsewhere)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tests.support.waiting import wait_until
from xksproxy.errors import DependencyTimeoutError, ThrottlingError
from xksproxy.hsm import pool as pool_module
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


async def test_a_call_returning_after_its_hsm_was_shut_down_is_not_replaced() -> None:
    """At stop the runner is shut down while a call is stuck in the HSM; when it returns, its
    session is not replaced (no call can run any more) and nothing fails on the event loop."""
    sessions = Sessions()
    runner = CallRunner(2)
    pool = SessionPool(1, sessions.open, sessions.close, runner)
    await pool.start()
    release = threading.Event()
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: release.wait(5), deadline(0.05))
    loop = asyncio.get_running_loop()
    failures: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: failures.append(context))
    runner.shutdown(wait=False)
    release.set()
    await wait_until(lambda: pool.stuck == 0)
    await asyncio.sleep(0.05)
    loop.set_exception_handler(None)
    assert failures == []
    assert pool.lost == 1 and sessions.opened == [0]


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


@pytest.fixture
async def preparing_pool() -> AsyncIterator[tuple[SessionPool[int], Sessions, threading.Event]]:
    """A pool of one session whose calls may say they are in a slow preparatory step."""
    sessions = Sessions()
    runner = CallRunner(3)
    flag = threading.Event()
    pool = SessionPool(1, sessions.open, sessions.close, runner, preparing=lambda s: flag.is_set())
    await pool.start()
    yield pool, sessions, flag
    await pool.close()
    runner.shutdown(wait=False, cancel_futures=True)


def slow_preparation(flag: threading.Event, seconds: float) -> Callable[[int], int]:
    def call(s: int) -> int:
        flag.set()
        time.sleep(seconds)
        flag.clear()
        return s + 1

    return call


async def answering(pool: SessionPool[int], until: asyncio.Event) -> None:
    """Keep the HSM visibly alive: a quick call every 10 ms."""
    while not until.is_set():
        await pool.run(lambda s: s, deadline(1))
        await asyncio.sleep(0.01)


async def test_a_preparing_call_may_run_past_the_call_time_limit_while_the_hsm_answers() -> None:
    sessions, runner, flag = Sessions(), CallRunner(4), threading.Event()
    pool = SessionPool(2, sessions.open, sessions.close, runner, preparing=lambda s: flag.is_set())
    await pool.start()
    done = asyncio.Event()
    try:
        other = asyncio.create_task(answering(pool, done))
        # Past the 50 ms call limit, within the 1 s deadline: a slow search, not a hang.
        result = await pool.run(slow_preparation(flag, 0.15), deadline(1), call_timeout=0.05)
        assert result in (1, 2)
        assert pool.stuck == 0
        assert sessions.closed == []  # the session was kept
    finally:
        done.set()
        await other
        await pool.close()
        runner.shutdown(wait=False, cancel_futures=True)


async def test_a_preparing_call_on_a_silent_hsm_is_an_overrun(
    preparing_pool: tuple[SessionPool[int], Sessions, threading.Event],
) -> None:
    pool, _, flag = preparing_pool
    # Nothing else returns meanwhile: a hang looks just like this, so it is the HSM's fault.
    with pytest.raises(DependencyTimeoutError):
        await pool.run(slow_preparation(flag, 0.15), deadline(1), call_timeout=0.05)
    assert pool.stuck_slow == 1
    await wait_until(lambda: pool.stuck == 0)


async def test_a_call_still_preparing_at_the_deadline_throttles_and_keeps_its_session(
    preparing_pool: tuple[SessionPool[int], Sessions, threading.Event],
) -> None:
    pool, sessions, flag = preparing_pool
    release = threading.Event()
    pool.last_return = float("inf")  # as if the HSM kept answering other calls

    def endless_preparation(s: int) -> int:
        flag.set()
        release.wait(5)
        flag.clear()
        return s

    with pytest.raises(ThrottlingError):
        await pool.run(endless_preparation, deadline(0.1), call_timeout=0.05)
    assert pool.stuck == 1 and pool.stuck_slow == 0
    with pytest.raises(ThrottlingError):  # the only session is busy preparing: not a 503
        await pool.run(lambda s: s, deadline(0.1))
    release.set()
    await wait_until(lambda: pool.idle == 1)
    assert sessions.closed == []  # given back as it was, not replaced
    assert await pool.run(lambda s: s + 5, deadline(1)) == 5


async def test_an_overrun_while_the_process_is_short_of_cpu_is_overload_not_an_hsm_fault() -> None:
    sessions, runner = Sessions(), CallRunner(3)
    pool = SessionPool(1, sessions.open, sessions.close, runner, overloaded=lambda: True)
    await pool.start()
    try:
        with pytest.raises(ThrottlingError):
            await pool.run(lambda s: time.sleep(0.15), deadline(1), call_timeout=0.05)
        assert pool.stuck_slow == 0  # the HSM is not blamed
        await wait_until(lambda: pool.idle == 1)
        assert sessions.closed == []  # and its session comes back as it was
    finally:
        await pool.close()
        runner.shutdown(wait=False, cancel_futures=True)


# ---- an elastic pool: grows under load up to max_size, trims spare sessions -----------------


@pytest.fixture
async def elastic() -> AsyncIterator[tuple[SessionPool[int], Sessions]]:
    sessions = Sessions()
    executor = CallRunner(3)
    pool = SessionPool(1, sessions.open, sessions.close, executor, name="h", max_size=3)
    await pool.start()
    yield pool, sessions
    await pool.close()
    executor.shutdown(wait=False, cancel_futures=True)


async def test_a_request_finding_no_idle_session_gets_one_opened_for_it(
    elastic: tuple[SessionPool[int], Sessions],
) -> None:
    pool, sessions = elastic
    release = threading.Event()
    holder = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5)))
    await wait_until(lambda: pool.busy == 1)
    # The only session is held for 5 s; the second request is served by a new one at once.
    assert await pool.run(lambda s: s, deadline(2)) == 1
    assert pool.size == 2 and pool.grown == 1 and sessions.opened == [0, 1]
    release.set()
    assert await holder is True
    assert pool.idle == 2


async def test_the_pool_grows_no_further_than_max_size(
    elastic: tuple[SessionPool[int], Sessions],
) -> None:
    pool, sessions = elastic
    release = threading.Event()
    holders = []
    for n in range(1, 4):
        holders.append(asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5))))
        await wait_until(lambda n=n: pool.busy == n)
    assert pool.size == 3
    # A fourth request waits (nothing more is opened) and is throttled at its deadline.
    with pytest.raises(ThrottlingError):
        await pool.run(lambda s: s, deadline(0.1))
    assert pool.size == 3 and sessions.opened == [0, 1, 2]
    release.set()
    await asyncio.gather(*holders)


async def test_the_pool_does_not_grow_while_the_hsm_overruns_its_calls(
    elastic: tuple[SessionPool[int], Sessions],
) -> None:
    pool, sessions = elastic
    release = threading.Event()
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: release.wait(5), deadline(1), call_timeout=0.05)
    assert pool.stuck_slow == 1
    with pytest.raises(DependencyTimeoutError):
        await pool.run(lambda s: s, deadline(1))
    assert pool.grown == 0 and sessions.opened == [0]
    release.set()
    await wait_until(lambda: pool.idle == 1)


async def test_a_session_the_hsm_refuses_stops_growth_for_a_while(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions = Sessions()
    refuse = False

    def open_session() -> int:
        if refuse:
            raise RuntimeError("CKR_SESSION_COUNT")
        return sessions.open()

    executor = CallRunner(3)
    pool = SessionPool(1, open_session, sessions.close, executor, name="h", max_size=3)
    await pool.start()
    refuse = True
    release = threading.Event()
    holder = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5)))
    await wait_until(lambda: pool.busy == 1)
    with pytest.raises(ThrottlingError):  # served by nothing: the HSM refused a second session
        await pool.run(lambda s: s, deadline(0.1))
    assert "hsm_pool_grow_failed" in capsys.readouterr().out
    refuse = False
    with pytest.raises(ThrottlingError):  # within GROW_RETRY: no new attempt
        await pool.run(lambda s: s, deadline(0.1))
    assert pool.size == 1 and sessions.opened == [0]
    release.set()
    await holder
    await pool.close()
    executor.shutdown()


async def test_spare_sessions_are_trimmed_after_a_whole_idle_window(
    elastic: tuple[SessionPool[int], Sessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, sessions = elastic
    monkeypatch.setattr(pool_module, "TRIM_WINDOW", 0.2)
    release = threading.Event()
    holders = []
    for n in range(1, 4):
        holders.append(asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5))))
        await wait_until(lambda n=n: pool.busy == n)
    release.set()
    await asyncio.gather(*holders)
    assert pool.size == 3 and pool.idle == 3
    pool.trim()  # ends the window in which no session was idle throughout: nothing is spare
    assert pool.size == 3
    # In the next window one session is taken (at most two stay idle throughout): two are
    # spare, which also brings the pool back to its initial size.
    assert await pool.run(lambda s: s, deadline(1)) in (0, 1, 2)
    await asyncio.sleep(0.25)
    assert pool.trim() == 2
    assert pool.size == 1 and pool.trimmed == 2
    await wait_until(lambda: len(sessions.closed) == 2)
    assert pool.trim() == 0  # never below the initial size
    assert await pool.run(lambda s: s, deadline(1)) not in sessions.closed


async def test_a_long_call_without_a_time_limit_does_not_make_the_queue_refuse_requests(
    pool1: tuple[SessionPool[int], Sessions],
) -> None:
    """A pass over every key of a big token at start runs for seconds, without a call time
    limit; requests queued behind a busy session afterwards must wait for it, not be refused
    at once because the estimate of a call's length took in that pass."""
    pool, _ = pool1
    await pool.run(lambda s: time.sleep(1.0), deadline(3))
    release = threading.Event()
    holder = asyncio.create_task(pool.run(lambda s: release.wait(5), deadline(5), 0.5))
    await wait_until(lambda: pool.busy == 1)
    # Had the 1 s call counted, 5 calls of 0.05 s (its share of the average) would exceed the
    # 0.15 s these requests may wait, and they would be refused at once.
    waiters = [asyncio.create_task(pool.run(lambda s: s, deadline(0.15), 0.1)) for _ in range(4)]
    await asyncio.sleep(0.02)
    release.set()
    assert await asyncio.gather(*waiters) == [0, 0, 0, 0]
    await holder
