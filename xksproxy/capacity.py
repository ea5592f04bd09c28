"""The capacity planner (``xksproxy capacity``): each HSM measured the way the proxy uses it, and
what a request rate needs of the fleet (docs/operations/capacity.md).

Measuring: AES-GCM Encrypt and Decrypt, alternated, on the HSM's health key through the HSM
adapter the proxy serves with (its session pool, call threads and IV mode: an operation costs
the HSM the two PKCS#11 calls it costs a request), at concurrency 1, 2, 4 ... up to a bound, a
bounded time each.  Per step: operations per second, per-operation latency (p50, p99, mean)
and this process's CPU time per operation.

Planning (:func:`plan`) is arithmetic on those steps, kept apart so it can be tested without an
HSM: a proxy's maximum rate is the least of what its workers' CPU can do, what its sessions can
carry (Little's law) and what its HSMs can do; the plan then applies the headroom factors of
:class:`Headroom`, which it reports with the numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from xksproxy.errors import OperatorError, XksError
from xksproxy.hsm.base import Hsm

#: A plaintext as KMS sends (a 32-byte data key) and the AAD the proxy builds around 100 bytes
#: of AAD and a ciphertextMetadata (service.hsm_aad): the loadtest's request, on the HSM.
PLAINTEXT = bytes(32)
AAD = bytes(2 + 100 + 1 + 2)

#: A step whose operations per second grow by no more than this over the best before it ends
#: the stepping: the throughput has stopped growing with concurrency.
GROWTH = 1.10
#: The measuring process counts as CPU-bound at this many CPU seconds per second (one core is
#: 1.0; the event loop and the Python of the call threads share one core under the GIL).
CPU_BOUND_BUSY = 0.85
WARM_SECONDS = 0.3
DEFAULT_STEP_SECONDS = 1.5

#: CPU microseconds a request costs a worker outside its HSM calls (HTTP, SigV4, JSON, policy,
#: the audit line, metrics), measured on the reference machine (docs/operations/capacity.md):
#: ``--http-cpu-us`` overrides it for other machines.
DEFAULT_HTTP_CPU_US = 330.0

#: Limits of the configuration (docs/reference/configuration.md).
MAX_POOL_SIZE = 256
MAX_HSMS_PER_PROXY = 10


class CapacityError(OperatorError):
    """The planner cannot measure or plan: one line naming the HSM and why (exit 1)."""


@dataclass(frozen=True)
class Step:
    """One bounded run at a fixed number of callers."""

    concurrency: int
    ops: int
    errors: int
    seconds: float
    cpu_seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    error_detail: str = ""

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu_seconds / self.ops * 1e6 if self.ops else 0.0

    @property
    def cpu_busy(self) -> float:
        """CPU seconds of this process per second of the step (1.0: one core's worth)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0


#: Why the stepping ended, and so what the best step's rate means.
STOP_FLAT = "flat"  # throughput stopped growing while this process had CPU to spare: the HSM's
STOP_CPU = "cpu"  # this process ran out of CPU first: the HSM can do at least that
STOP_BOUND = "bound"  # the concurrency bound was reached, still growing: at least that
STOP_ERRORS = "errors"  # a step had failed operations: the steps before it count


@dataclass(frozen=True)
class HsmMeasurement:
    """One HSM's steps, in order, and why they stopped."""

    name: str
    model: str
    iv_mode: str
    bound: int
    steps: tuple[Step, ...]
    stop: str

    def __post_init__(self) -> None:
        if not self.counted:
            raise ValueError(f"hsm {self.name}: no step without errors")

    @property
    def counted(self) -> tuple[Step, ...]:
        """The steps without failed operations."""
        return tuple(s for s in self.steps if not s.errors)

    @property
    def best(self) -> Step:
        return max(self.counted, key=lambda s: s.ops_per_second)

    @property
    def first(self) -> Step:
        return self.counted[0]

    @property
    def op_seconds(self) -> float:
        """Time one operation holds a session (mean at the lowest concurrency): Little's law's
        service time."""
        return self.first.mean_ms / 1000

    def cpu_us_at(self, in_flight: float) -> float:
        """CPU an operation costs the calling process (the module, the hand-off to a call
        thread and back, the pool) with *in_flight* operations at a time: between two steps,
        interpolated in log2 of their concurrency; beyond the steps, the nearest one.  A busy
        process pays less per operation than an idle one (one wake-up serves several), so the
        figure must be the one at the concurrency the worker actually runs."""
        steps = self.counted
        if in_flight <= steps[0].concurrency:
            return steps[0].cpu_us_per_op
        for lo, hi in itertools.pairwise(steps):
            if in_flight <= hi.concurrency:
                f = math.log2(in_flight / lo.concurrency) / math.log2(
                    hi.concurrency / lo.concurrency
                )
                return lo.cpu_us_per_op + f * (hi.cpu_us_per_op - lo.cpu_us_per_op)
        return steps[-1].cpu_us_per_op

    @property
    def max_ops(self) -> float:
        return self.best.ops_per_second

    @property
    def limit(self) -> str:
        """What the best step's rate is: the HSM's plateau, or a lower bound of it."""
        if self.best.cpu_busy >= CPU_BOUND_BUSY:
            return STOP_CPU
        return self.stop if self.stop != STOP_ERRORS else STOP_FLAT

    @property
    def max_is_lower_bound(self) -> bool:
        return self.limit != STOP_FLAT


@dataclass(frozen=True)
class Headroom:
    """How far below each measured limit the plan stays."""

    cpu_target: float = 0.7  # a worker planned at most this busy (of one core)
    session_factor: float = 2.0  # sessions = this x the sessions busy on average (Poisson)
    hsm_target: float = 0.7  # an HSM planned at most this share of its measured maximum

    def describe(self) -> list[str]:
        return [
            f"workers at most {self.cpu_target:.0%} busy",
            f"sessions {self.session_factor:g} x those busy on average (Little's law)",
            f"HSMs at most {self.hsm_target:.0%} of their measured maximum, plus one spare",
        ]


@dataclass(frozen=True)
class ProxyShape:
    """What one proxy (host) runs, from the configuration and this machine."""

    workers: int  # [server] workers
    cpus: int  # CPUs the proxy's processes can use (this machine's)
    max_pool_size: int  # the smallest max_pool_size of the HSMs: sessions per worker per HSM
    pool_size: int  # the smallest pool_size configured now

    @property
    def cores(self) -> int:
        """Cores the workers can use: a worker is one process, one core at most."""
        return max(1, min(self.workers, self.cpus))


@dataclass(frozen=True)
class Plan:
    """What *rate* needs, with every figure it was worked out from."""

    rate: float
    headroom: Headroom
    shape: ProxyShape
    # CPU per request on a worker: outside the HSM calls (given) plus the HSM calls (measured,
    # at the operations a worker has in flight on each HSM): at the maximum, and at the rate
    # per proxy planned
    http_cpu_us: float
    hsm_cpu_us: float
    in_flight: float
    hsm_cpu_us_planned: float
    op_ms: float  # the slowest HSM's time per operation
    # one proxy, as configured, on the HSMs configured: its bounds and maximum
    cpu_bound: float
    session_bound: float
    hsm_bound: float
    proxy_max: float
    proxy_limit: str  # which of the three bounds is the maximum: "cpu", "sessions", "hsm"
    hsm_bound_is_lower: bool
    # the fleet for *rate*
    proxy_planned: float  # rate one proxy is planned for, with headroom
    proxies: int
    rate_per_proxy: float
    workers: int  # per proxy
    per_hsm_max: float  # the slowest HSM's measured maximum
    hsms: int  # N+1: enough for *rate* with one lost
    sessions_busy: float  # per proxy per HSM, with one HSM lost
    sessions: int  # per proxy per HSM, with headroom
    pool_size: int  # per worker per HSM
    hsm_sessions: int  # sessions each HSM holds for the whole fleet at pool_size (+1 login each)
    notes: tuple[str, ...] = field(default=())

    @property
    def cpu_us_per_request(self) -> float:
        return self.http_cpu_us + self.hsm_cpu_us

    @property
    def per_worker_max(self) -> float:
        """Requests per second one worker serves with a whole core."""
        return 1e6 / self.cpu_us_per_request

    @property
    def survivors(self) -> int:
        return self.hsms - 1


def cpu_limited_rate(
    cores: float,
    http_cpu_us: float,
    hsm_cpu_us: Callable[[float], float],
    cheapest: float,
    dearest: float,
) -> float:
    """The highest rate *r* that *cores* serve when a request costs ``http_cpu_us +
    hsm_cpu_us(r)`` microseconds of CPU, hsm_cpu_us lying between *cheapest* and *dearest*:
    the largest r with r <= cores x 10^6 / cost(r), searched from the top down in steps of
    0.5 % (the cost falls as the rate rises, but not always smoothly)."""
    low = cores * 1e6 / (http_cpu_us + dearest)  # served whatever the calls cost
    r = cores * 1e6 / (http_cpu_us + cheapest)  # nothing above this can be
    while r > low and r > cores * 1e6 / (http_cpu_us + hsm_cpu_us(r)):
        r *= 0.995
    return max(r, low)


def _ceil(x: float) -> int:
    """Ceiling that forgives float noise (3.0000000001 is 3)."""
    return max(0, math.ceil(x - 1e-9))


def plan(
    rate: float,
    hsms: Sequence[HsmMeasurement],
    shape: ProxyShape,
    http_cpu_us: float = DEFAULT_HTTP_CPU_US,
    headroom: Headroom | None = None,
) -> Plan:
    """What *rate* requests per second (Encrypt and Decrypt: one HSM operation each) need of
    proxies shaped like *shape* and of HSMs like the *hsms* measured."""
    if not hsms:
        raise ValueError("no HSM measured")
    if rate <= 0:
        raise ValueError("the rate must be above 0")
    h = headroom or Headroom()
    op_s = max(m.op_seconds for m in hsms)

    def hsm_cpu(proxy_rate: float) -> float:
        """CPU of the HSM calls per request when a proxy serves *proxy_rate*: each worker has
        its share of the rate times an operation's time in flight on each HSM (Little)."""
        per_hsm = proxy_rate / shape.workers / len(hsms)
        return max(m.cpu_us_at(per_hsm * m.op_seconds) for m in hsms)

    # One proxy as configured, on every HSM configured (requests go to the least loaded).
    costs = [st.cpu_us_per_op for m in hsms for st in m.counted]
    cpu_bound = cpu_limited_rate(shape.cores, http_cpu_us, hsm_cpu, min(costs), max(costs))
    hsm_cpu_us = hsm_cpu(cpu_bound)
    session_bound = sum(shape.workers * shape.max_pool_size / m.op_seconds for m in hsms)
    hsm_bound = sum(m.max_ops for m in hsms)
    bounds = {"cpu": cpu_bound, "sessions": session_bound, "hsm": hsm_bound}
    limit = min(bounds, key=lambda k: bounds[k])

    # HSMs: enough for the rate at hsm_target of the slowest one's maximum, plus one spare.
    per_hsm_max = min(m.max_ops for m in hsms)
    survivors = max(1, _ceil(rate / (per_hsm_max * h.hsm_target)))
    n_hsms = survivors + 1

    # Proxies: each planned at cpu_target of its cores, and within its sessions on the HSMs
    # left with one lost (each worker's pool at most max_pool_size per HSM).
    session_cap = shape.workers * shape.max_pool_size * survivors / (op_s * h.session_factor)
    # Below its maximum a request costs a worker more (fewer calls share a wake-up), so the
    # rate its cores serve at cpu_target is found at that rate's cost, as the maximum is.
    cpu_planned = cpu_limited_rate(
        shape.cores * h.cpu_target, http_cpu_us, hsm_cpu, min(costs), max(costs)
    )
    planned = min(cpu_planned, session_cap)
    proxies = max(1, _ceil(rate / planned))
    per_proxy = rate / proxies
    hsm_cpu_planned = hsm_cpu(per_proxy)
    cores_needed = per_proxy * (http_cpu_us + hsm_cpu_planned) / 1e6 / h.cpu_target
    workers = min(shape.cores, max(1, _ceil(cores_needed)))

    # Sessions per proxy per HSM with one HSM lost: Little's law, then the headroom factor.
    busy = per_proxy / survivors * op_s
    sessions = max(1, _ceil(busy * h.session_factor))
    pool_size = max(1, _ceil(sessions / workers))
    notes: list[str] = []
    if pool_size > MAX_POOL_SIZE:
        notes.append(
            f"pool_size {pool_size} is above the largest allowed ({MAX_POOL_SIZE}): "
            "plan more proxies or workers"
        )
        pool_size = MAX_POOL_SIZE
    if pool_size > shape.max_pool_size:
        notes.append(
            f"pool_size {pool_size} is above max_pool_size {shape.max_pool_size}: "
            f"set max_pool_size to at least {pool_size}"
        )
    if n_hsms > MAX_HSMS_PER_PROXY:
        notes.append(
            f"{n_hsms} HSMs: a proxy uses at most {MAX_HSMS_PER_PROXY}; "
            "split the keys over several key stores"
        )
    if proxies > 1 and limit == "cpu" and shape.workers < shape.cpus:
        notes.append(
            f"workers = {shape.workers} on {shape.cpus} CPUs: more workers per proxy "
            "would need fewer proxies"
        )
    return Plan(
        rate=rate,
        headroom=h,
        shape=shape,
        http_cpu_us=http_cpu_us,
        hsm_cpu_us=hsm_cpu_us,
        in_flight=cpu_bound / shape.workers / len(hsms) * op_s,
        hsm_cpu_us_planned=hsm_cpu_planned,
        op_ms=op_s * 1000,
        cpu_bound=cpu_bound,
        session_bound=session_bound,
        hsm_bound=hsm_bound,
        proxy_max=bounds[limit],
        proxy_limit=limit,
        hsm_bound_is_lower=any(m.max_is_lower_bound for m in hsms),
        proxy_planned=planned,
        proxies=proxies,
        rate_per_proxy=per_proxy,
        workers=workers,
        per_hsm_max=per_hsm_max,
        hsms=n_hsms,
        sessions_busy=busy,
        sessions=sessions,
        pool_size=pool_size,
        hsm_sessions=proxies * workers * (pool_size + 1),
        notes=tuple(notes),
    )


# ---- measuring ------------------------------------------------------------------------------


def step_sizes(bound: int) -> list[int]:
    """1, 2, 4 ... and *bound* itself last if it is not a power of two."""
    sizes = []
    c = 1
    while c < bound:
        sizes.append(c)
        c *= 2
    sizes.append(max(1, bound))
    return sizes


def time_bound(hsms: int, bound: int, step_seconds: float) -> float:
    """The longest the measurement can take, HSMs one after another (each step may run one
    request deadline past its time)."""
    return hsms * (WARM_SECONDS + len(step_sizes(bound)) * (step_seconds + 0.25))


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of values sorted ascending (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_step(
    hsm: Hsm,
    key_id: str,
    version: int,
    concurrency: int,
    seconds: float,
    deadline_s: float,
    *,
    clock: Callable[[], float] = time.perf_counter,
    cpu: Callable[[], float] = time.process_time,
) -> Step:
    """*concurrency* callers, each an Encrypt then a Decrypt of its ciphertext, again and
    again, for *seconds*; each operation within *deadline_s* as a request's would be."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failed: dict[str, int] = {}
    start, cpu_start = clock(), cpu()
    end = start + seconds

    def fail(what: str) -> None:
        failed[what] = failed.get(what, 0) + 1

    async def caller() -> None:
        while clock() < end:
            try:
                t0 = clock()
                iv, out = await hsm.encrypt(
                    key_id, version, PLAINTEXT, AAD, loop.time() + deadline_s
                )
                t1 = clock()
                latencies.append(t1 - t0)
                back = await hsm.decrypt(key_id, version, iv, out, AAD, loop.time() + deadline_s)
                latencies.append(clock() - t1)
            except XksError as exc:
                fail(f"{exc.error_name}: {getattr(exc, 'detail', None) or exc.message}")
                await asyncio.sleep(0.01)  # a failing HSM answers at once: do not spin on it
                continue
            if back != PLAINTEXT:
                fail("a decrypt returned another plaintext")

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu_used = clock() - start, cpu() - cpu_start
    latencies.sort()
    worst = max(failed, key=lambda k: failed[k]) if failed else ""
    return Step(
        concurrency=concurrency,
        ops=len(latencies),
        errors=sum(failed.values()),
        seconds=elapsed,
        cpu_seconds=cpu_used,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        mean_ms=sum(latencies) / len(latencies) * 1000 if latencies else 0.0,
        error_detail=worst,
    )


async def measure(
    hsm: Hsm,
    key_id: str,
    *,
    model: str,
    iv_mode: str,
    bound: int,
    step_seconds: float,
    deadline_s: float,
    on_step: Callable[[Step], None] | None = None,
) -> HsmMeasurement:
    """Step the concurrency up on *hsm*'s key *key_id* (the health key) until the throughput
    stops growing by more than 10 %, this process runs out of CPU, a step has errors or
    *bound* callers run; CapacityError if the key cannot be found or one caller fails."""
    loop = asyncio.get_running_loop()
    try:
        version = (await hsm.key_info(key_id, loop.time() + deadline_s)).current_version
    except XksError as exc:
        why = f"{exc.error_name}: {getattr(exc, 'detail', None) or exc.message}"
        raise CapacityError(f"hsm {hsm.name}: UNAVAILABLE: {why}") from exc
    warm = await run_step(hsm, key_id, version, 1, min(WARM_SECONDS, step_seconds), deadline_s)
    if warm.errors or not warm.ops:
        raise CapacityError(
            f"hsm {hsm.name}: UNAVAILABLE: {warm.error_detail or 'no operation completed'}"
        )
    steps: list[Step] = []
    stop = STOP_BOUND
    best = 0.0
    for size in step_sizes(bound):
        step = await run_step(hsm, key_id, version, size, step_seconds, deadline_s)
        steps.append(step)
        if on_step is not None:
            on_step(step)
        if (step.errors or not step.ops) and len(steps) == 1:
            why = step.error_detail or "no operation completed"
            raise CapacityError(f"hsm {hsm.name}: UNAVAILABLE: {why}")
        verdict = stop_after(step, best)
        if verdict is not None:
            stop = verdict
            break
        best = max(best, step.ops_per_second)
    return HsmMeasurement(hsm.name, model, iv_mode, bound, tuple(steps), stop)


def stop_after(step: Step, best: float) -> str | None:
    """Why the stepping ends after *step* (the best rate of the steps before it: *best*), or
    None to go on to the next concurrency."""
    if step.errors or not step.ops:
        return STOP_ERRORS
    if step.cpu_busy >= CPU_BOUND_BUSY:
        return STOP_CPU
    if best and step.ops_per_second <= best * GROWTH:
        return STOP_FLAT
    return None


# ---- output ---------------------------------------------------------------------------------

LIMIT_TEXT = {
    STOP_FLAT: "the HSM's maximum (throughput stopped growing)",
    STOP_CPU: "at least (the measuring process ran out of CPU first)",
    STOP_BOUND: "at least (still growing at the concurrency bound)",
}
BOUND_TEXT = {
    "cpu": "CPU of the workers",
    "sessions": "sessions (workers x max_pool_size per HSM)",
    "hsm": "the HSMs' measured maximum",
}


def measurement_json(m: HsmMeasurement) -> dict[str, Any]:
    return {
        "name": m.name,
        "model": m.model,
        "ivMode": m.iv_mode,
        "concurrencyBound": m.bound,
        "steps": [
            {
                "concurrency": s.concurrency,
                "operations": s.ops,
                "errors": s.errors,
                "seconds": round(s.seconds, 3),
                "opsPerSecond": round(s.ops_per_second, 1),
                "p50Ms": round(s.p50_ms, 3),
                "p99Ms": round(s.p99_ms, 3),
                "meanMs": round(s.mean_ms, 3),
                "cpuUsPerOp": round(s.cpu_us_per_op, 1),
                "cpuBusy": round(s.cpu_busy, 3),
                **({"error": s.error_detail} if s.error_detail else {}),
            }
            for s in m.steps
        ],
        "stoppedBy": m.stop,
        "opMs": round(m.op_seconds * 1000, 3),
        "maxOpsPerSecond": round(m.max_ops, 1),
        "maxIsLowerBound": m.max_is_lower_bound,
    }


def plan_json(p: Plan, measured: Sequence[HsmMeasurement]) -> dict[str, Any]:
    """The plan and its inputs as JSON (field by field in docs/operations/capacity.md)."""
    return {
        "rate": p.rate,
        "hsmsMeasured": [measurement_json(m) for m in measured],
        "headroom": {
            "cpuTarget": p.headroom.cpu_target,
            "sessionFactor": p.headroom.session_factor,
            "hsmTarget": p.headroom.hsm_target,
        },
        "proxyShape": asdict(p.shape) | {"cores": p.shape.cores},
        "cpuUsPerRequest": {
            "http": round(p.http_cpu_us, 1),
            "hsmCalls": round(p.hsm_cpu_us, 1),
            "total": round(p.cpu_us_per_request, 1),
            "inFlightPerWorkerPerHsm": round(p.in_flight, 2),
            "hsmCallsAtRatePerProxy": round(p.hsm_cpu_us_planned, 1),
        },
        "perWorkerMax": round(p.per_worker_max, 1),
        "opMs": round(p.op_ms, 3),
        "oneProxy": {
            "bounds": {
                "cpu": round(p.cpu_bound, 1),
                "sessions": round(p.session_bound, 1),
                "hsm": round(p.hsm_bound, 1),
            },
            "max": round(p.proxy_max, 1),
            "limitedBy": p.proxy_limit,
            "hsmBoundIsLowerBound": p.hsm_bound_is_lower,
            "planned": round(p.proxy_planned, 1),
        },
        "plan": {
            "proxies": p.proxies,
            "ratePerProxy": round(p.rate_per_proxy, 1),
            "workersPerProxy": p.workers,
            "perHsmMax": round(p.per_hsm_max, 1),
            "hsms": p.hsms,
            "hsmsServingWithOneLost": p.survivors,
            "sessionsBusyPerProxyPerHsm": round(p.sessions_busy, 2),
            "sessionsPerProxyPerHsm": p.sessions,
            "poolSize": p.pool_size,
            "sessionsPerHsm": p.hsm_sessions,
        },
        "notes": list(p.notes),
    }
