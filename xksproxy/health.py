"""The health of every HSM: a prober per HSM running the known-answer test, hysteresis so one
slow probe does not flap a state, and suspicion raised at once from the request path.

States (reported in GetHealthStatus and used for routing):
- ACTIVE: probes pass in time.
- DEGRADED: serving, but ``degraded_after`` probes in a row were slow, or it is on its way
  back: a request just failed on it (suspect), or it was UNAVAILABLE and has passed probes
  since, but not yet ``recover_after`` fast ones in a row.
- UNAVAILABLE: the last probe failed (error, mismatch or timeout), or no probe result is younger
  than 60 s.
A probe that finds every session busy with requests (the pool's 429) changes nothing: the HSM
is answering.  The first probe after start decides directly.  A failed request wakes the HSM's
prober at once, so an HSM that died shows UNAVAILABLE within one probe, not one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from xksproxy.errors import ThrottlingError, XksError
from xksproxy.hsm.base import HealthState, Hsm

H = TypeVar("H", bound=Hsm)

log = structlog.get_logger(__name__)
STALE_AFTER = 60.0  # docs/spec-notes.md §1.5: a cached health result is at most a minute old


@dataclass(frozen=True)
class HsmHealth:
    name: str
    model: str
    state: HealthState
    checked_at: float  # time.monotonic() of the last probe
    detail: str


@dataclass
class _Tracker:
    state: HealthState = HealthState.UNAVAILABLE
    probed: bool = False
    good: int = 0  # consecutive passing, fast probes
    slow: int = 0  # consecutive passing, slow probes
    checked_at: float = 0.0
    detail: str = "not probed yet"
    unavailable_since: float = 0.0  # time.monotonic() when it last became UNAVAILABLE


class HealthBoard:
    """Per-HSM state with hysteresis; the request path reads it to route and reports failures."""

    def __init__(
        self,
        hsms: Sequence[Hsm],
        *,
        degraded_latency_s: float,
        degraded_after: int,
        recover_after: int,
        on_change: Callable[[str, HealthState], None] | None = None,
    ) -> None:
        self.hsms = list(hsms)
        self._slow_s = degraded_latency_s
        self._degraded_after = degraded_after
        self._recover_after = recover_after
        self._on_change = on_change
        self._t = {h.name: _Tracker() for h in self.hsms}
        self._wake = {h.name: asyncio.Event() for h in self.hsms}

    def state(self, name: str) -> HealthState:
        t = self._t[name]
        if t.probed and time.monotonic() - t.checked_at > STALE_AFTER:
            return HealthState.UNAVAILABLE  # a stalled prober must not keep reporting ACTIVE
        return t.state

    def snapshot(self) -> list[HsmHealth]:
        return [
            HsmHealth(
                h.name,
                h.model,
                self.state(h.name),
                self._t[h.name].checked_at,
                self._t[h.name].detail,
            )
            for h in self.hsms
        ]

    def _set(self, name: str, state: HealthState, detail: str) -> None:
        t = self._t[name]
        if state is HealthState.UNAVAILABLE and (t.state is not state or not t.probed):
            t.unavailable_since = time.monotonic()
        if t.state is not state or not t.probed:
            emit = log.info if state is HealthState.ACTIVE else log.warning
            emit("hsm_health_changed", hsm=name, state=state.value, detail=detail)
            if self._on_change is not None:
                self._on_change(name, state)
        t.state = state

    def record_probe(self, name: str, ok: bool, latency_s: float, detail: str) -> HealthState:
        """Apply one probe result; returns the new state."""
        t = self._t[name]
        first = not t.probed
        t.checked_at, t.detail = time.monotonic(), detail
        if not ok:
            t.good = t.slow = 0
            self._set(name, HealthState.UNAVAILABLE, detail)
        elif latency_s > self._slow_s:
            t.good, t.slow = 0, t.slow + 1
            if first or t.slow >= self._degraded_after or t.state is HealthState.UNAVAILABLE:
                self._set(name, HealthState.DEGRADED, f"slow: {latency_s * 1000:.1f} ms")
        else:
            t.good, t.slow = t.good + 1, 0
            if first or t.good >= self._recover_after:
                self._set(name, HealthState.ACTIVE, detail)
            elif t.state is HealthState.UNAVAILABLE:  # serving again: above a failed HSM
                self._set(name, HealthState.DEGRADED, f"recovering: {detail}")
        t.probed = True
        return t.state

    def unavailable_for(self, name: str) -> float:
        """Seconds the HSM has been UNAVAILABLE without a break; 0 if it is not."""
        t = self._t[name]
        if t.state is not HealthState.UNAVAILABLE:
            return 0.0
        return time.monotonic() - t.unavailable_since

    def suspect(self, name: str, why: str) -> None:
        """A request failed on this HSM: stop preferring it now and probe it at once."""
        t = self._t[name]
        t.good = 0
        if t.state is HealthState.ACTIVE:
            self._set(name, HealthState.DEGRADED, f"suspect: {why}")
        self._wake[name].set()

    async def probe_once(self, hsm: Hsm, timeout: float) -> HsmHealth:
        t = self._t[hsm.name]
        try:
            result = await hsm.probe(timeout)
            ok, latency, detail = result.ok, result.latency_s, result.detail
        except ThrottlingError as exc:
            if t.probed:
                # Every session is busy with calls the HSM is answering (the pool says 429,
                # not 503): no sign of a fault.  The state stands, as seen now, so that a proxy
                # at full load neither reports its HSM down nor lets its state go stale.
                t.checked_at = time.monotonic()
                log.info("hsm_probe_busy", hsm=hsm.name, state=t.state.value)
                return HsmHealth(hsm.name, hsm.model, t.state, t.checked_at, t.detail)
            ok, latency, detail = False, timeout, f"{exc.error_name}: {exc.message}"
        except XksError as exc:
            ok, latency, detail = False, timeout, f"{exc.error_name}: {exc.message}"
        self.record_probe(hsm.name, ok, latency, detail)
        return HsmHealth(hsm.name, hsm.model, t.state, t.checked_at, t.detail)

    async def run(
        self,
        hsms: Sequence[H],
        interval: float,
        timeout: float,
        recover: Callable[[H], Awaitable[None]],
        after_probe: Callable[[H], Awaitable[None]] | None = None,
    ) -> None:
        """One prober per HSM of the board (*hsms*: the same HSMs, as the caller knows them),
        until cancelled, so a hung HSM never delays another's probe."""
        if sorted(h.name for h in hsms) != sorted(self._t):
            raise ValueError("run() is given the board's own HSMs")
        await asyncio.gather(
            *(self._run_one(h, interval, timeout, recover, after_probe) for h in hsms)
        )

    async def _run_one(
        self,
        hsm: H,
        interval: float,
        timeout: float,
        recover: Callable[[H], Awaitable[None]],
        after_probe: Callable[[H], Awaitable[None]] | None,
    ) -> None:
        wake = self._wake[hsm.name]
        while True:
            wake.clear()  # before the probe: a suspicion raised during it wakes the next one
            try:
                await recover(hsm)
            except Exception as exc:  # retried next round; the probe below reports the state
                why = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
                log.warning("hsm_recover_failed", hsm=hsm.name, error=why)
            state = (await self.probe_once(hsm, timeout)).state
            if after_probe is not None and state is not HealthState.UNAVAILABLE:
                try:
                    await after_probe(hsm)
                except Exception as exc:  # a consistency re-check must not stop the prober
                    log.warning("hsm_after_probe_failed", hsm=hsm.name, error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
