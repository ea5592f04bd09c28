"""Load shedding: answer 429 at once when this worker cannot serve a request in time.

A worker that is short of CPU does not see a queue of its own: requests wait in the kernel's
socket buffers until the event loop gets to them, and every one of them then costs the full
price (SigV4, the HSM call, the audit line) even though its client may have given up.  The
loop's own delay is the measure of that wait: a timer that should fire every ``PERIOD``
seconds fires late by about one loop iteration, and every request read in that iteration
waited about as long.  While the delay is above ``lag_limit``, new requests get
``ThrottlingException`` (429, which KMS treats as retryable) before any expensive work, so the
requests that are served keep their latency.  A cap on requests in flight bounds memory.
"""

from __future__ import annotations

import asyncio
import contextlib

PERIOD = 0.005  # seconds between lag samples
DECAY = 0.5  # weight of the newest sample: reacts within a few periods, ignores one blip


class LoadGuard:
    """Tracks this worker's event-loop delay and requests in flight."""

    def __init__(self, lag_limit_s: float, max_in_flight: int) -> None:
        self.lag_limit = lag_limit_s
        self.max_in_flight = max_in_flight
        self.lag = 0.0  # smoothed event-loop delay, seconds
        self.in_flight = 0
        self._task: asyncio.Task[None] | None = None

    def overloaded(self) -> str | None:
        """Why a new request must be refused now, or None."""
        if self.in_flight >= self.max_in_flight:
            return "too many requests in flight"
        if self.lag > self.lag_limit:
            return "the proxy is overloaded"
        return None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + PERIOD
            await asyncio.sleep(PERIOD)
            late = max(0.0, loop.time() - expected)
            self.lag += DECAY * (late - self.lag)
