"""CallRunner alone, with plain Python callables (no HSM): threads, batching, withdrawal."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xksproxy.hsm.runner import Call, CallRunner

WAIT = 10.0  # seconds: a generous bound for anything that should happen at once


@pytest.fixture
def runner() -> Iterator[CallRunner]:
    r = CallRunner(2, name="t")
    yield r
    r.shutdown(wait=True)


async def run_one(runner: CallRunner, fn: Callable[[Any], Any], arg: Any = None) -> Call[Any]:
    """Run ``fn(arg)`` through *runner* and wait for its delivery on this loop."""
    fut: asyncio.Future[Call[Any]] = asyncio.get_running_loop().create_future()
    runner.call(fn, arg, fut.set_result)
    return await asyncio.wait_for(fut, WAIT)


class Gate:
    """Holds every runner thread inside a call until opened."""

    def __init__(self, runner: CallRunner, threads: int) -> None:
        self.open_ = threading.Event()
        self._inside = threading.Semaphore(0)
        self.calls = [runner.call(self._hold, None, lambda _: None) for _ in range(threads)]
        for _ in range(threads):  # every thread is now busy: later calls stay queued
            assert self._inside.acquire(timeout=WAIT), "the runner threads did not start"

    def _hold(self, _: object) -> None:
        self._inside.release()
        assert self.open_.wait(WAIT)

    def open(self) -> None:
        self.open_.set()


async def test_a_result_is_delivered_to_on_done(runner: CallRunner) -> None:
    call = await run_one(runner, lambda x: x * 2, 21)
    assert (call.result, call.error, call.finished) == (42, None, True)


async def test_an_exception_is_delivered_as_the_calls_error(runner: CallRunner) -> None:
    def fail(_: object) -> None:
        raise ValueError("boom")

    call = await run_one(runner, fail)
    assert isinstance(call.error, ValueError) and str(call.error) == "boom"
    assert call.result is None and call.finished


async def test_the_call_runs_on_a_runner_thread(runner: CallRunner) -> None:
    thread = (await run_one(runner, lambda _: threading.current_thread())).result
    assert isinstance(thread, threading.Thread)
    assert thread is not threading.current_thread()
    assert thread.name.startswith("t_")


async def test_on_done_runs_on_the_event_loop_thread(runner: CallRunner) -> None:
    loop_thread = threading.current_thread()
    fut: asyncio.Future[threading.Thread] = asyncio.get_running_loop().create_future()
    runner.call(lambda _: None, None, lambda _: fut.set_result(threading.current_thread()))
    assert await asyncio.wait_for(fut, WAIT) is loop_thread


@pytest.mark.parametrize("threads", [1, 4])
async def test_a_burst_of_results_wakes_the_loop_once_per_batch(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    burst = 200
    runner = CallRunner(threads, name="burst")
    loop = asyncio.get_running_loop()
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(callback: Callable[..., object], *args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        if getattr(callback, "__self__", None) is runner:
            wakeups += 1
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    ran = 0
    ran_lock = threading.Lock()
    all_ran = threading.Event()

    def quick(n: int) -> int:
        nonlocal ran
        with ran_lock:
            ran += 1
            if ran == burst:
                all_ran.set()
        return n

    delivered: list[int] = []
    all_delivered = loop.create_future()

    def on_done(c: Call[int]) -> None:
        assert c.result is not None
        delivered.append(c.result)
        if len(delivered) == burst:
            all_delivered.set_result(None)

    try:
        for n in range(burst):
            runner.call(quick, n, on_done)
        # Keep the loop busy (as a loaded server's is) until every call has returned.
        assert all_ran.wait(WAIT), "the calls did not run"
        await asyncio.wait_for(all_delivered, WAIT)
    finally:
        runner.shutdown(wait=True)
    assert sorted(delivered) == list(range(burst))
    # One wake-up delivers everything that finished while the loop was busy; only calls
    # that were between returning and being queued when the loop woke may need another.
    assert 1 <= wakeups <= threads + 1, wakeups


async def test_a_withdrawn_call_never_runs(runner: CallRunner) -> None:
    gate = Gate(runner, 2)
    ran: list[object] = []
    delivered: list[object] = []
    call = runner.call(ran.append, "withdrawn", delivered.append)
    try:
        assert call.withdraw() is True
    finally:
        gate.open()
    runner.shutdown(wait=True)  # the threads take every queued call before they stop
    assert ran == []


async def test_withdraw_is_refused_once_the_call_has_started(runner: CallRunner) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(_: object) -> str:
        started.set()
        assert release.wait(WAIT)
        return "done"

    fut: asyncio.Future[Call[str]] = asyncio.get_running_loop().create_future()
    call = runner.call(slow, None, fut.set_result)
    try:
        assert started.wait(WAIT)
        assert call.withdraw() is False
    finally:
        release.set()
    assert (await asyncio.wait_for(fut, WAIT)).result == "done"


async def test_withdraw_is_refused_once_the_call_has_finished(runner: CallRunner) -> None:
    call = await run_one(runner, lambda _: "done")
    assert call.withdraw() is False


async def test_run_in_executor_returns_the_result(runner: CallRunner) -> None:
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(runner, pow, 2, 10), WAIT) == 1024


async def test_run_in_executor_raises_the_exception(runner: CallRunner) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="invalid literal"):
        await asyncio.wait_for(loop.run_in_executor(runner, int, "x"), WAIT)


async def test_run_in_executor_runs_on_a_runner_thread(runner: CallRunner) -> None:
    loop = asyncio.get_running_loop()
    thread = await asyncio.wait_for(loop.run_in_executor(runner, threading.current_thread), WAIT)
    assert thread is not threading.current_thread()
    assert thread.name.startswith("t_")


async def test_shutdown_with_cancel_futures_drops_queued_calls(runner: CallRunner) -> None:
    gate = Gate(runner, 2)
    ran: list[object] = []
    try:
        for n in range(5):
            runner.call(ran.append, n, lambda _: None)
        runner.submit(ran.append, "submitted")
        runner.shutdown(wait=False, cancel_futures=True)
    finally:
        gate.open()
    runner.shutdown(wait=True)  # wait for the threads to end
    assert ran == []


async def test_shutdown_lets_queued_calls_run_without_cancel_futures(runner: CallRunner) -> None:
    gate = Gate(runner, 2)
    ran: list[int] = []
    try:
        for n in range(5):
            runner.call(ran.append, n, lambda _: None)
        runner.shutdown(wait=False)
    finally:
        gate.open()
    runner.shutdown(wait=True)
    assert sorted(ran) == [0, 1, 2, 3, 4]


async def test_shutdown_with_cancel_futures_cancels_queued_futures(runner: CallRunner) -> None:
    gate = Gate(runner, 2)
    try:
        future = runner.submit(pow, 2, 10)
        runner.shutdown(wait=False, cancel_futures=True)
    finally:
        gate.open()
    runner.shutdown(wait=True)
    assert future.cancelled()


async def test_no_call_is_taken_after_shutdown(runner: CallRunner) -> None:
    runner.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shut down"):
        runner.call(lambda _: None, None, lambda _: None)


async def test_a_failing_on_done_does_not_stop_the_other_deliveries() -> None:
    runner = CallRunner(1, name="one")  # one thread: calls finish in order
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    third_ran = threading.Event()
    delivered: list[str] = []
    all_delivered = loop.create_future()

    def broken(_: Call[str]) -> None:
        raise RuntimeError("faulty callback")

    def on_done(c: Call[str]) -> None:
        assert c.result is not None
        delivered.append(c.result)
        if len(delivered) == 2:
            all_delivered.set_result(None)

    def last(_: object) -> str:
        third_ran.set()
        return "third"

    try:
        runner.call(lambda _: "first", None, broken)
        runner.call(lambda _: "second", None, on_done)
        runner.call(last, None, on_done)
        # The loop stays busy until the last call runs, so the first and second results are
        # waiting together and one delivery hands out both after the faulty callback.
        assert third_ran.wait(WAIT)
        await asyncio.wait_for(all_delivered, WAIT)
    finally:
        runner.shutdown(wait=True)
        loop.set_exception_handler(None)
    assert delivered == ["second", "third"]
    assert len(reported) == 1
    assert reported[0]["message"] == "HSM call result delivery failed"
    assert isinstance(reported[0]["exception"], RuntimeError)
