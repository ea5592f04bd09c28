"""Threads that run blocking HSM calls, handing results back to the event loop in batches.

Why not ``loop.run_in_executor``: for a SoftHSM call of 30-70 µs the hand-off costs more than
the call (docs/architecture.md §3).  Each completed call there wakes the event loop on its own
(a write to the loop's self-pipe, an epoll wake-up, a read), through two chained futures.  Here
a finished call is appended to a queue and the loop is woken only if no wake-up is already
pending, so
under load one wake-up delivers every result that is ready; results go straight to a callback
the caller gave, with no intermediate futures.  The calls still run on threads, so a hung HSM
holds a thread, never the event loop.

A call can be withdrawn until a thread picks it up (:meth:`Call.withdraw`): whichever of the
thread and the caller takes the call's single claim first wins, atomically under the GIL.

The runner is also a :class:`concurrent.futures.Executor` for the rare calls (opening and
closing sessions) that go through ``loop.run_in_executor``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class Call(Generic[T]):
    """One blocking call submitted with :meth:`CallRunner.call`."""

    __slots__ = ("_claim", "arg", "error", "finished", "fn", "on_done", "result")

    def __init__(
        self, fn: Callable[[Any], T], arg: Any, on_done: Callable[[Call[T]], None]
    ) -> None:
        self.fn = fn
        self.arg = arg
        self.on_done = on_done  # called on the event loop once the call has returned
        self.result: T | None = None
        self.error: BaseException | None = None
        self.finished = False  # set on the event loop, just before on_done runs
        self._claim = [True]

    def claim(self) -> bool:
        """Take the call's one claim; False if a thread or the caller already took it."""
        try:
            self._claim.pop()  # list.pop is atomic under the GIL
        except IndexError:
            return False
        return True

    def withdraw(self) -> bool:
        """Keep the call from starting; False if it has started (or finished) already."""
        return self.claim()


class CallRunner(concurrent.futures.Executor):
    """*threads* threads taking calls from one FIFO queue."""

    def __init__(self, threads: int, name: str = "hsm") -> None:
        if threads < 1:
            raise ValueError("at least one thread")
        self._queue: queue.SimpleQueue[Call[Any] | None] = queue.SimpleQueue()
        self._done: collections.deque[Call[Any]] = collections.deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown = False
        self._name = name
        self._threads: list[threading.Thread] = []
        self.ensure_threads(threads)

    def ensure_threads(self, threads: int) -> None:
        """Start threads until there are *threads* (a pool that grows needs one per session);
        threads are never stopped before :meth:`shutdown`."""
        if self._shutdown:
            return
        while len(self._threads) < threads:
            t = threading.Thread(
                target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            t.start()

    @property
    def shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called: no call is taken any more."""
        return self._shutdown

    def call(self, fn: Callable[[Any], T], arg: Any, on_done: Callable[[Call[T]], None]) -> Call[T]:
        """Run ``fn(arg)`` on a thread; *on_done* gets the call on this event loop afterwards."""
        if self._shutdown:
            raise RuntimeError("the call runner is shut down")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        c = Call(fn, arg, on_done)
        self._queue.put(c)
        return c

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """The Executor interface, for calls off the hot path."""
        if self._shutdown:
            raise RuntimeError("the call runner is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run(f: concurrent.futures.Future[T]) -> None:
            if not f.set_running_or_notify_cancel():
                return
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                f.set_exception(exc)

        self._queue.put(Call(run, future, _no_delivery))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once they are idle; queued calls still run unless withdrawn."""
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    c = self._queue.get_nowait()
                except queue.Empty:
                    break
                if c is not None and c.claim() and c.on_done is _no_delivery:
                    c.arg.cancel()  # a submit()ted call: its future says it never ran
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _work(self) -> None:
        get, done = self._queue.get, self._done
        while True:
            c = get()
            if c is None:
                return
            if not c.claim():
                continue  # withdrawn by its caller before it started
            try:
                c.result = c.fn(c.arg)
            except BaseException as exc:
                c.error = exc
            if c.on_done is _no_delivery:
                continue
            done.append(c)
            # One wake-up per batch: if one is pending it will deliver this call too, since
            # _deliver clears the flag before it empties the queue.
            if not self._wake_pending:
                self._wake_pending = True
                loop = self._loop
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return

    def _deliver(self) -> None:
        self._wake_pending = False
        done = self._done
        while done:
            c = done.popleft()
            c.finished = True
            try:
                c.on_done(c)
            except Exception as exc:  # one faulty callback must not strand the others' results
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "HSM call result delivery failed", "exception": exc}
                )


def _no_delivery(_: Call[Any]) -> None:
    """Marks calls whose thread completes them itself (Executor.submit)."""
