"""Load shedding: answer 429 at once to part of the requests when this worker cannot serve
them all in time.

A worker that is short of CPU does not see a queue of its own: requests wait in the kernel's
socket buffers until the event loop gets to them, and every one of them then costs the full
price (SigV4, the HSM call, the audit line) even though its client may have given up.  The
loop's own delay is the measure of that wait: a timer that should fire every ``PERIOD``
seconds fires late by about one loop iteration, and every request read in that iteration
waited about as long.

While the delay is above ``lag_limit``, a growing fraction of new requests is refused with
``ThrottlingException`` (429, which KMS treats as retryable) before any costly work; while it
is below, the fraction shrinks again.  Refusing a fraction rather than everything matters: a
429 still costs a third of a served request here (aiohttp's parsing and writing), so a worker
that refused every request under heavy overload would spend its CPU on refusals and serve
nothing.  Refused requests get no audit line each (they were never authenticated or
processed): they are counted in the metrics, and a ``requests_shed`` line per second says how
many there were.  A cap on requests in flight bounds memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog

log = structlog.get_logger(__name__)

PERIOD = 0.005  # seconds between lag samples
DECAY = 0.5  # weight of the newest sample: reacts within a few periods, ignores one blip
STEP = 0.02  # change of the refused fraction per sample (0 to 0.95 in about 0.25 s)
MAX_FRACTION = 0.95  # always let some requests through: they keep the measure honest
REPORT_EVERY = 1.0  # seconds between requests_shed lines while shedding


class LoadGuard:
    """Tracks this worker's event-loop delay and requests in flight."""

    def __init__(self, lag_limit_s: float, max_in_flight: int) -> None:
        self.lag_limit = lag_limit_s
        self.max_in_flight = max_in_flight
        self.lag = 0.0  # smoothed event-loop delay, seconds
        self.fraction = 0.0  # share of new requests refused now
        self.in_flight = 0
        self.shed = 0  # refused since the last requests_shed line
        self._random = random.random
        self._task: asyncio.Task[None] | None = None

    def short_of_cpu(self) -> bool:
        """Whether the worker is short of CPU now: shedding, or its loop running more than
        half the shedding limit late (the HSM layer asks, to tell a call that overran for want
        of CPU from a slow HSM)."""
        return self.fraction > 0.0 or self.lag > self.lag_limit / 2

    def overloaded(self) -> str | None:
        """Why this new request must be refused now, or None."""
        if self.in_flight >= self.max_in_flight:
            self.shed += 1
            return "too many requests in flight"
        if self.fraction and self._random() < self.fraction:
            self.shed += 1
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
        next_report = loop.time() + REPORT_EVERY
        while True:
            expected = loop.time() + PERIOD
            await asyncio.sleep(PERIOD)
            now = loop.time()
            self.lag += DECAY * (max(0.0, now - expected) - self.lag)
            if self.lag > self.lag_limit:
                self.fraction = min(MAX_FRACTION, self.fraction + STEP)
            elif self.fraction:
                self.fraction = max(0.0, self.fraction - STEP)
            if now >= next_report:
                next_report = now + REPORT_EVERY
                if self.shed:
                    log.warning(
                        "requests_shed",
                        count=self.shed,
                        fraction=round(self.fraction, 2),
                        loop_lag_ms=round(self.lag * 1000, 1),
                    )
                    self.shed = 0
