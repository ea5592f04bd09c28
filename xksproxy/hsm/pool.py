"""A bounded pool of HSM sessions, used from the event loop, each call run on a CallRunner.

Waiting for a session is bounded by the request's deadline: no session in time gives 429, or
503 when sessions are held by calls the HSM did not finish within their own time limit.  A
call that overruns is abandoned: its session is never handed out again, and once the stuck
call returns the session is closed and a fresh one opened in its place.  A session that
reports itself broken is replaced too.

The pool is elastic between *size* and *max_size* sessions: an HSM's latency decides how many
sessions a rate needs (rate x calls x latency), and neither is known when the proxy starts.  A
request that finds no idle session has one more opened in the background (one at a time, and
a thread for it), unless the HSM is overrunning its calls or refusing sessions; sessions that
stayed idle through a whole :data:`TRIM_WINDOW` are closed again, down to *size*.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from xksproxy.errors import DependencyTimeoutError, ThrottlingError
from xksproxy.hsm.runner import Call, CallRunner

S = TypeVar("S")
T = TypeVar("T")
log = structlog.get_logger(__name__)
CALL_TIME_WEIGHT = 0.05  # of the newest call in the moving average of call durations
TRIM_WINDOW = 30.0  # seconds a spare session must stay idle throughout before it is closed
GROW_RETRY = 30.0  # seconds without growing after the HSM refused one more session


@dataclass(frozen=True)
class PoolStats:
    idle: int
    busy: int
    stuck: int
    waiting: int


class BrokenSessionError(Exception):
    """Raised by a pooled call to say its session must be replaced; wraps the cause."""


class SessionPool(Generic[S]):
    """*size* sessions opened by *open_blocking*, closed by *close_blocking*."""

    def __init__(
        self,
        size: int,
        open_blocking: Callable[[], S],
        close_blocking: Callable[[S], None],
        runner: CallRunner,
        on_acquire: Callable[[float], None] | None = None,
        name: str = "",
        preparing: Callable[[S], bool] | None = None,
        overloaded: Callable[[], bool] | None = None,
        max_size: int | None = None,
    ) -> None:
        self.size = size  # slots now: sessions idle, busy, stuck or lost
        self.min_size = size
        self.max_size = size if max_size is None else max(size, max_size)
        self.name = name
        # Whether a session's call is in a slow step that is not the HSM's fault (a key lookup
        # in a big SoftHSM token): such a step may run past the call time limit.
        self._preparing_fn = preparing
        # Whether this process is short of CPU now: a call that overruns then is late because
        # its thread got no CPU, not because the HSM is slow.
        self._overloaded = overloaded
        self._on_acquire = on_acquire
        self._open = open_blocking
        self._close = close_blocking
        self._runner = runner
        self._idle: collections.deque[S] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[S]] = collections.deque()
        self.busy = 0
        self.stuck = 0  # sessions whose call overran and has not returned yet
        self.stuck_slow = 0  # of those, calls that overran their own time limit (HSM at fault)
        self.stuck_preparing = 0  # of those, calls still in a slow preparatory step
        self.lost = 0  # slots whose replacement session could not be opened
        self._closed = False
        self._drained: asyncio.Event | None = None
        self.call_seconds = 0.0  # moving average of a call's duration, hand-off included
        self.last_return = 0.0  # loop time at which a call last returned
        self._growing: asyncio.Task[None] | None = None
        self._grow_after = 0.0  # loop time before which the pool does not grow
        self._spare = size  # fewest idle sessions seen since the trim window began
        self._window_start = 0.0
        self.grown = 0  # sessions added under load since start
        self.trimmed = 0  # spare sessions closed since start

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def start(self) -> None:
        """Open every session; raises the first failure."""
        loop = asyncio.get_running_loop()
        opened = await asyncio.gather(
            *(loop.run_in_executor(self._runner, self._open) for _ in range(self.size))
        )
        self._idle.extend(opened)

    async def run(
        self, fn: Callable[[S], T], deadline: float, call_timeout: float | None = None
    ) -> T:
        """Run ``fn(session)`` on the runner, answering by *deadline* (loop time); the call
        itself may take at most *call_timeout* seconds."""
        loop = asyncio.get_running_loop()
        if self._idle:  # the common case: no wait, nothing to time
            self.busy += 1
            session = self._idle.pop()
            if len(self._idle) < self._spare:
                self._spare = len(self._idle)
            if self._on_acquire is not None:
                self._on_acquire(0.0)
        else:
            self._spare = 0
            if self.size < self.max_size and self._growing is None:
                self._grow(loop)
            started = loop.time()
            try:
                session = await self._acquire(loop, deadline)
            finally:
                if self._on_acquire is not None:
                    self._on_acquire(loop.time() - started)
        now = loop.time()
        limit = deadline - now
        # Overrunning its own time limit is the HSM's fault; being cut short by the request's
        # deadline (after a long wait for a session) is overload.
        hsm_fault = call_timeout is not None and call_timeout < limit
        if call_timeout is not None and hsm_fault:
            limit = call_timeout
        waiter: asyncio.Future[Any] = loop.create_future()
        call = self._runner.call(fn, session, lambda c: _settle(waiter, c))
        timers: list[asyncio.TimerHandle] = []
        timers.append(
            loop.call_at(now + limit, self._time_up, waiter, session, now, deadline, timers)
        )
        try:
            done = await waiter
            if done is not None:
                self.last_return = ended = loop.time()
                if call_timeout is not None:
                    # Only calls with a time limit (operations, probes) tell how long a queued
                    # request will wait: a pass over every key of the token at start, or a key
                    # lookup, takes seconds, and would have the queue estimate refuse requests
                    # (429) long after it ended.
                    self.call_seconds += CALL_TIME_WEIGHT * (ended - now - self.call_seconds)
        except asyncio.CancelledError:
            if call.withdraw():
                self._release(session)
            else:
                self._abandon(session, call, False, keep=self._preparing(session))
            raise
        finally:
            timers[0].cancel()
        if done is _STILL_PREPARING:
            # Still in its slow preparatory step at the request's deadline: not the HSM's
            # fault, and the session stays good once that step is done.
            self._abandon(session, call, False, keep=True)
            raise ThrottlingError("the HSM session is still preparing; retry")
        if done is None:  # the time limit came first
            if call.withdraw():  # never started: the session is untouched
                self._release(session)
                raise DependencyTimeoutError()
            if hsm_fault and self._overloaded is not None and self._overloaded():
                self._abandon(session, call, False, keep=True)
                raise ThrottlingError()
            # A session caught searching for a key object is kept when its call returns: the
            # search is what a new session would have to do again.
            self._abandon(session, call, hsm_fault, keep=self._preparing(session))
            raise DependencyTimeoutError()
        returned: Call[T] = done
        self._settled(session, returned)
        if returned.error is not None:
            raise returned.error
        return returned.result  # type: ignore[return-value]

    def _preparing(self, session: S) -> bool:
        return self._preparing_fn is not None and self._preparing_fn(session)

    def _settled(self, session: S, call: Call[Any]) -> None:
        """Take back the session of a call that returned."""
        if isinstance(call.error, BrokenSessionError):
            self._replace(session)
        else:
            self._release(session)

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> S:
        if self._idle:
            self.busy += 1
            return self._idle.pop()
        if self.stuck + self.lost >= self.size:
            if self.stuck_preparing and not self.stuck_slow:  # busy, not broken
                raise ThrottlingError("every HSM session is busy preparing; retry")
            # No live session at all: fail now, so the request can still go to another HSM.
            raise DependencyTimeoutError("no usable HSM session (stuck in calls or lost)")
        if self.stuck_slow:
            # The HSM is overrunning its time limit: queueing behind it only burns the
            # deadline that a retry on another HSM needs.
            raise DependencyTimeoutError("the HSM is overrunning its calls")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise ThrottlingError()
        live = self.size - self.stuck - self.lost
        if (len(self._waiters) + 1) * self.call_seconds > remaining * live:
            # The queue ahead would outlast the deadline: say so now, not when it expires, so
            # the client can retry elsewhere at once and the queue stays short.
            raise ThrottlingError()
        fut: asyncio.Future[S] = loop.create_future()
        self._waiters.append(fut)
        try:
            session = await asyncio.wait_for(fut, remaining)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return fut.result()  # handed over just as the wait timed out: keep it
            if self.stuck_slow:  # sessions are held by calls the HSM did not finish in time
                raise DependencyTimeoutError("HSM sessions are stuck in slow calls") from None
            # Overload, even if calls cut short by their request's deadline hold sessions:
            # they return soon.
            raise ThrottlingError() from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return session

    def _grow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open one more session in the background, if the HSM is in a state to use it."""
        if (
            self._closed
            or self.stuck_slow  # the HSM is overrunning: more sessions would pile onto it
            or self.lost  # the HSM is refusing sessions already
            or loop.time() < self._grow_after
            or self._runner.shut_down
        ):
            return
        self._growing = loop.create_task(self._open_one(loop))

    async def _open_one(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            try:
                session = await loop.run_in_executor(self._runner, self._open)
            except Exception as exc:
                # A session limit of the HSM (CKR_SESSION_COUNT) or the like: serve with what
                # there is, and try again later.
                self._grow_after = loop.time() + GROW_RETRY
                log.warning(
                    "hsm_pool_grow_failed",
                    hsm=self.name,
                    size=self.size,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    retry_seconds=GROW_RETRY,
                )
                return
            if self._closed or self._runner.shut_down:
                if not self._runner.shut_down:  # else it goes with the module's finalization
                    self._runner.submit(self._close_quietly, session)
                return
            self.size += 1
            self.grown += 1
            self._runner.ensure_threads(self.size + 2)
            log.info("hsm_pool_grown", hsm=self.name, size=self.size, max_size=self.max_size)
            self._give(session)
        finally:
            self._growing = None

    def trim(self) -> int:
        """Close the sessions that stayed idle through the whole window now ending (never
        below the pool's initial size) and start a new window; call about once a second.
        Returns how many were closed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._window_start < TRIM_WINDOW:
            return 0
        spare = min(self._spare, len(self._idle), self.size - self.min_size)
        self._window_start = now
        closed = 0
        while closed < spare and self._idle and not self._closed and not self._runner.shut_down:
            session = self._idle.popleft()  # the least recently used
            self.size -= 1
            self.trimmed += 1
            closed += 1
            self._runner.submit(self._close_quietly, session)
        if closed:
            log.info("hsm_pool_trimmed", hsm=self.name, closed=closed, size=self.size)
        self._spare = len(self._idle)
        return closed

    def _busy_down(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self._drained is not None:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Wait, at most *timeout* seconds, until no call is in flight."""
        if self.busy == 0:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()

    def _release(self, session: S) -> None:
        self._busy_down()
        self._give(session)

    def _give(self, session: S) -> None:
        if self._closed:
            if not self._runner.shut_down:  # else it goes with the module's finalization
                self._runner.submit(self._close_quietly, session)
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.busy += 1
                fut.set_result(session)
                return
        self._idle.append(session)

    def _time_up(
        self,
        waiter: asyncio.Future[Any],
        session: S,
        started: float,
        deadline: float,
        timers: list[asyncio.TimerHandle],
    ) -> None:
        """The call's time limit: answer None, unless the session is in a slow preparatory
        step (``preparing``) while the HSM answers other calls (so it is not hung): that step
        may run on to the request's deadline."""
        if waiter.done():
            return
        loop = asyncio.get_running_loop()
        alive = self.last_return > started
        if alive and self._preparing(session) and loop.time() < deadline:
            timers[0] = loop.call_at(deadline, _settle, waiter, _STILL_PREPARING)
            return
        waiter.set_result(None)

    def _abandon(self, session: S, call: Call[Any], hsm_fault: bool, *, keep: bool = False) -> None:
        """Give up waiting for *call*; its session comes back when the call returns: replaced
        (it may be in any state), or as it is if *keep*."""
        if call.finished:  # it returned just after its time ran out
            self._settled(session, call)
            return
        self._busy_down()
        self.stuck += 1
        self.stuck_slow += hsm_fault
        self.stuck_preparing += keep
        if hsm_fault:  # release the queue at once: those requests can still try another HSM
            self._fail_waiters("the HSM is overrunning its calls")
        call.on_done = lambda c: self._unstuck(session, c, hsm_fault, keep)

    def _unstuck(self, session: S, call: Call[Any], hsm_fault: bool, keep: bool) -> None:
        self.stuck -= 1
        self.stuck_slow -= hsm_fault
        self.stuck_preparing -= keep
        self.busy += 1
        if keep:
            self._settled(session, call)
        else:
            self._replace(session)

    def _replace(self, session: S) -> None:
        """Close *session* and open a new one in its place, off the event loop."""
        self._busy_down()
        if self._runner.shut_down:
            # The HSM is being closed (the process stops): a stuck call that returns now is
            # not replaced; its session goes with the others.
            self.lost += 1
            return
        self._runner.call(self._reopen_blocking, session, self._reopened)

    def _reopen_blocking(self, old: S) -> S:
        self._close_quietly(old)
        return self._open()

    def _reopened(self, call: Call[S]) -> None:
        if call.error is not None:
            # The HSM is not taking sessions now; the slot is retried when the HSM is reopened.
            log.warning("hsm_session_reopen_failed", hsm=self.name, error=type(call.error).__name__)
            self.lost += 1
            return
        assert call.result is not None
        self._give(call.result)

    def _close_quietly(self, session: S) -> None:
        try:
            self._close(session)
        except Exception as exc:  # closing a broken session may fail; it is gone either way
            log.debug("hsm_session_close_failed", error=type(exc).__name__)

    async def refill(self) -> None:
        """Open sessions for slots whose replacement failed (after the HSM recovered)."""
        loop = asyncio.get_running_loop()
        while self.lost and not self._closed:
            session = await loop.run_in_executor(self._runner, self._open)
            self.lost -= 1
            self._give(session)

    async def close(self) -> None:
        """Close idle sessions; busy ones are closed when they come back."""
        self._closed = True
        loop = asyncio.get_running_loop()
        while self._idle:
            s = self._idle.pop()
            await loop.run_in_executor(self._runner, self._close_quietly, s)
        self._fail_waiters("HSM is closing")

    def _fail_waiters(self, why: str) -> None:
        """Answer every request waiting for a session with 503 now."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(DependencyTimeoutError(why))

    def stats(self) -> PoolStats:
        return PoolStats(self.idle, self.busy, self.stuck, self.waiting)


# The request's deadline came while its call was still in a slow preparatory step.
_STILL_PREPARING: Any = object()


def _settle(waiter: asyncio.Future[Any], call: Call[T] | None) -> None:
    """Answer *waiter* with the returned call, None when the time limit came first, or
    _STILL_PREPARING."""
    if not waiter.done():
        waiter.set_result(call)
