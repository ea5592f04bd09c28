"""The capacity planner's arithmetic (xksproxy/capacity.py): from measured steps to the
sessions, workers, proxies, N+1 HSMs and pool_size a rate needs; when the stepping stops and
what its best rate means; the measuring loop over a fake HSM.  No timing is asserted."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest

from xksproxy.capacity import (
    AAD,
    PLAINTEXT,
    STOP_BOUND,
    STOP_CPU,
    STOP_ERRORS,
    STOP_FLAT,
    CapacityError,
    Headroom,
    HsmMeasurement,
    ProxyShape,
    Step,
    cpu_limited_rate,
    measure,
    percentile,
    plan,
    plan_json,
    step_sizes,
    stop_after,
    time_bound,
)
from xksproxy.errors import InternalError, KeyNotFoundError
from xksproxy.hsm.base import KeyInfo, KeyStatus, ProbeResult

SHAPE = ProxyShape(workers=2, cpus=2, max_pool_size=32, pool_size=8)


def step(
    concurrency: int,
    ops_per_second: float,
    *,
    mean_ms: float = 2.0,
    busy: float = 0.3,
    errors: int = 0,
) -> Step:
    """A one-second step with these figures; this process *busy* (CPU seconds a second)."""
    return Step(
        concurrency=concurrency,
        ops=round(ops_per_second),
        errors=errors,
        seconds=1.0,
        cpu_seconds=busy,
        p50_ms=mean_ms,
        p99_ms=mean_ms * 2,
        mean_ms=mean_ms,
        error_detail="InternalException: device error" if errors else "",
    )


def hsm(
    name: str = "hsm-1",
    *,
    op_ms: float = 2.0,
    cpu_us: float = 200.0,
    max_ops: float = 5000.0,
    stop: str = STOP_FLAT,
) -> HsmMeasurement:
    """An HSM whose operations take *op_ms* and cost *cpu_us* of CPU at every concurrency, and
    whose best step reaches *max_ops*."""
    first = Step(1, 500, 0, 1.0, cpu_us * 500 / 1e6, op_ms, op_ms * 2, op_ms)
    best = Step(8, round(max_ops), 0, 1.0, cpu_us * max_ops / 1e6, op_ms, op_ms * 3, op_ms)
    return HsmMeasurement(name, "Model", "caller", 32, (first, best), stop)


def cpu_steps(*pairs: tuple[int, float]) -> HsmMeasurement:
    """An HSM of 2 ms operations, 50,000 a second, whose CPU per operation is given per
    concurrency."""
    steps = tuple(Step(c, 50_000, 0, 1.0, cpu * 0.05, 2.0, 4.0, 2.0) for c, cpu in pairs)
    return HsmMeasurement("h", "M", "caller", 32, steps, STOP_BOUND)


# ---- the plan ------------------------------------------------------------------------------


def test_one_hsm_cpu_bound_proxy_worked_by_hand() -> None:
    p = plan(1000, [hsm()], SHAPE, http_cpu_us=450)
    assert p.cpu_us_per_request == 650
    assert p.per_worker_max == pytest.approx(1e6 / 650)
    assert p.cpu_bound == pytest.approx(2 * 1e6 / 650)  # 3,077/s
    assert p.session_bound == pytest.approx(2 * 32 / 0.002)  # 32,000/s
    assert p.hsm_bound == 5000
    assert (p.proxy_limit, p.proxy_max) == ("cpu", p.cpu_bound)
    assert p.proxy_planned == pytest.approx(p.cpu_bound * 0.7)  # 2,154/s
    assert p.proxies == 1
    assert p.rate_per_proxy == 1000
    assert p.workers == 1  # 1,000/s x 650 us = 0.65 of a core, under 0.7
    assert p.hsms == 2  # 1,000/s fits in 70 % of one HSM's 5,000/s; plus one spare
    assert p.sessions_busy == pytest.approx(2.0)  # Little: 1,000/s x 2 ms
    assert p.sessions == 4  # twice that
    assert p.pool_size == 4  # one worker
    assert p.hsm_sessions == 1 * 1 * (4 + 1)
    assert p.notes == ()


def test_sessions_scale_with_the_rate() -> None:
    sessions = [plan(rate, [hsm()], SHAPE, http_cpu_us=450).sessions for rate in (500, 1000, 2000)]
    assert sessions == [2, 4, 8]


def test_workers_follow_the_cpu_the_rate_needs() -> None:
    low = plan(1000, [hsm()], SHAPE, http_cpu_us=450)
    high = plan(2000, [hsm()], SHAPE, http_cpu_us=450)  # 1.3 cores / 0.7 -> 2 workers
    assert (low.workers, high.workers) == (1, 2)
    assert high.pool_size == math.ceil(high.sessions / 2)


def test_proxies_are_the_rate_over_what_one_is_planned_for() -> None:
    p = plan(10_000, [hsm(max_ops=50_000)], SHAPE, http_cpu_us=450)
    assert p.proxies == math.ceil(10_000 / (2 * 1e6 / 650 * 0.7))  # 5
    assert p.rate_per_proxy == pytest.approx(10_000 / p.proxies)
    assert p.workers <= SHAPE.cores


def test_hsms_for_n_plus_1() -> None:
    p = plan(10_000, [hsm(max_ops=5000)], SHAPE, http_cpu_us=450)
    assert p.survivors == math.ceil(10_000 / (5000 * 0.7))  # 3 carry the rate
    assert p.hsms == p.survivors + 1
    # With one of them lost, each survivor carries a third of each proxy's rate.
    assert p.sessions_busy == pytest.approx(p.rate_per_proxy / 3 * 0.002)


def test_a_slow_hsm_makes_sessions_the_bound() -> None:
    slow = hsm(op_ms=50, max_ops=100_000)  # a WAN HSM with a huge plateau
    p = plan(100, [slow], ProxyShape(workers=2, cpus=2, max_pool_size=4, pool_size=4), 450)
    assert p.session_bound == pytest.approx(2 * 4 / 0.05)  # 160/s
    assert (p.proxy_limit, p.proxy_max) == ("sessions", p.session_bound)
    # Planned within the sessions of each worker, with the headroom factor: 80/s.
    assert p.proxy_planned == pytest.approx(2 * 4 * 1 / (0.05 * 2))
    assert p.proxies == 2


def test_a_small_hsm_makes_the_hsm_the_bound() -> None:
    p = plan(100, [hsm(max_ops=800)], SHAPE, http_cpu_us=450)
    assert (p.proxy_limit, p.proxy_max) == ("hsm", 800)
    assert not p.hsm_bound_is_lower


def test_several_hsms_plan_on_the_slowest_and_add_up_for_one_proxy() -> None:
    fast = hsm("a", op_ms=1, cpu_us=100, max_ops=9000)
    slow = hsm("b", op_ms=4, cpu_us=300, max_ops=3000)
    p = plan(1000, [fast, slow], SHAPE, http_cpu_us=450)
    assert p.hsm_cpu_us == 300  # the dearer HSM's CPU per operation
    assert p.op_ms == 4
    assert p.per_hsm_max == 3000
    assert p.hsm_bound == 12_000  # one proxy spreads over both
    assert p.session_bound == pytest.approx(2 * 32 / 0.001 + 2 * 32 / 0.004)


def test_a_tiny_rate_needs_one_of_everything_and_a_spare_hsm() -> None:
    p = plan(0.001, [hsm()], SHAPE, http_cpu_us=450)
    assert (p.proxies, p.workers, p.sessions, p.pool_size, p.hsms) == (1, 1, 1, 1, 2)


def test_pool_size_above_max_pool_size_says_what_to_raise() -> None:
    shape = ProxyShape(workers=8, cpus=8, max_pool_size=4, pool_size=2)
    p = plan(3000, [hsm(op_ms=5, max_ops=1e6)], shape, http_cpu_us=450)
    # 3,000/s on one proxy needs 3 workers (1.95 cores at 70 %); 3,000 x 5 ms x 2 = 30
    # sessions, 10 a worker.
    assert (p.proxies, p.workers, p.sessions, p.pool_size) == (1, 3, 30, 10)
    assert any("set max_pool_size to at least 10" in n for n in p.notes)


def test_pool_size_is_capped_at_the_configurations_limit() -> None:
    shape = ProxyShape(workers=1, cpus=1, max_pool_size=1024, pool_size=8)
    p = plan(900, [hsm(op_ms=1000, max_ops=1e6)], shape, http_cpu_us=10)
    assert p.pool_size == 256
    assert any("above the largest allowed (256)" in n for n in p.notes)


def test_more_than_ten_hsms_is_noted() -> None:
    p = plan(100_000, [hsm(max_ops=5000)], SHAPE, http_cpu_us=450)
    assert p.hsms == math.ceil(100_000 / 3500) + 1
    assert any("a proxy uses at most 10" in n for n in p.notes)


def test_workers_beyond_the_cpus_add_no_cpu() -> None:
    many = plan(1000, [hsm()], ProxyShape(workers=8, cpus=2, max_pool_size=32, pool_size=8), 450)
    assert many.shape.cores == 2
    assert many.cpu_bound == pytest.approx(2 * 1e6 / 650)


def test_the_headroom_factors_are_applied_and_reported() -> None:
    loose = Headroom(cpu_target=1.0, session_factor=1.0, hsm_target=1.0)
    p = plan(1000, [hsm()], SHAPE, http_cpu_us=450, headroom=loose)
    assert p.proxy_planned == pytest.approx(p.cpu_bound)
    assert p.sessions == 2
    text = "; ".join(Headroom().describe())
    assert "70%" in text and "2 x" in text
    out = plan_json(plan(1000, [hsm()], SHAPE, http_cpu_us=450), [hsm()])
    assert out["headroom"] == {"cpuTarget": 0.7, "sessionFactor": 2.0, "hsmTarget": 0.7}


def test_the_json_carries_the_plan_and_its_inputs() -> None:
    m = hsm()
    out = plan_json(plan(1000, [m], SHAPE, http_cpu_us=450), [m])
    assert set(out) == {
        "rate",
        "hsmsMeasured",
        "headroom",
        "proxyShape",
        "cpuUsPerRequest",
        "perWorkerMax",
        "opMs",
        "oneProxy",
        "plan",
        "notes",
    }
    assert out["plan"]["poolSize"] == 4 and out["plan"]["hsms"] == 2
    assert out["oneProxy"]["limitedBy"] == "cpu"
    assert out["cpuUsPerRequest"] == {
        "http": 450.0,
        "hsmCalls": 200.0,
        "total": 650.0,
        "inFlightPerWorkerPerHsm": round(2e6 / 650 / 2 * 0.002, 2),
        "hsmCallsAtRatePerProxy": 200.0,
    }
    assert [s["concurrency"] for s in out["hsmsMeasured"][0]["steps"]] == [1, 8]


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_that_is_not_positive_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="above 0"):
        plan(rate, [hsm()], SHAPE)


def test_no_hsm_is_refused() -> None:
    with pytest.raises(ValueError, match="no HSM"):
        plan(1000, [], SHAPE)


# ---- what the steps mean -------------------------------------------------------------------


def test_the_first_step_gives_the_service_time() -> None:
    assert hsm(op_ms=2.5).op_seconds == pytest.approx(0.0025)


@pytest.mark.parametrize(
    ("in_flight", "cpu"),
    [
        (0.5, 400.0),  # below the first step: the first step's
        (1.0, 400.0),
        (2.0, 300.0),
        (3.0, 300.0 - 100.0 * math.log2(1.5)),  # between 2 and 4, in log2 of the concurrency
        (8.0, 100.0),
        (20.0, 100.0),  # beyond the last step: the last step's
    ],
)
def test_cpu_per_operation_at_the_concurrency_in_flight(in_flight: float, cpu: float) -> None:
    m = cpu_steps((1, 400), (2, 300), (4, 200), (8, 100))
    assert m.cpu_us_at(in_flight) == pytest.approx(cpu)


def test_cpu_per_operation_skips_steps_with_errors() -> None:
    failed = Step(4, 1000, 3, 1.0, 0.01, 2.0, 4.0, 2.0)
    steps = (*cpu_steps((1, 400), (2, 300)).steps, failed)
    m = HsmMeasurement("h", "M", "caller", 32, steps, STOP_ERRORS)
    assert m.cpu_us_at(4) == pytest.approx(300)


def test_the_cpu_limited_rate_with_a_fixed_cost() -> None:
    assert cpu_limited_rate(2, 450, lambda r: 200, 200, 200) == pytest.approx(2e6 / 650)


def test_the_cpu_limited_rate_when_the_cost_falls_with_the_rate() -> None:
    # 800 us a request below 2,000/s, 500 from there: 2 cores serve 4,000/s.
    def cost(r: float) -> float:
        return 400.0 if r < 2000 else 100.0

    r = cpu_limited_rate(2, 400, cost, 100, 400)
    assert r == pytest.approx(4000, rel=0.006)
    assert r <= 2e6 / (400 + cost(r))


def test_the_proxy_maximum_uses_the_hsm_cpu_at_the_maximums_concurrency() -> None:
    m = cpu_steps((1, 400), (2, 300), (4, 200), (8, 100))
    p = plan(1000, [m], SHAPE, http_cpu_us=450)
    assert 100 < p.hsm_cpu_us < 400
    assert p.proxy_max == pytest.approx(2e6 / (450 + p.hsm_cpu_us), rel=0.01)
    assert p.in_flight == pytest.approx(p.proxy_max / 2 * 0.002)
    assert p.hsm_cpu_us == pytest.approx(m.cpu_us_at(p.in_flight))
    # At 1,000/s a worker has fewer calls in flight, and each costs more.
    assert p.hsm_cpu_us_planned == pytest.approx(m.cpu_us_at(1000 / 2 * 0.002))
    assert p.hsm_cpu_us_planned > p.hsm_cpu_us


@pytest.mark.parametrize(
    ("steps", "stop", "limit", "lower"),
    [
        # stopped growing with CPU to spare: the HSM's own maximum
        ((step(1, 400), step(2, 800), step(4, 820)), STOP_FLAT, STOP_FLAT, False),
        # this process at a core's worth: a lower bound
        ((step(1, 400), step(2, 800, busy=0.95)), STOP_CPU, STOP_CPU, True),
        # still growing at the bound: a lower bound
        ((step(1, 400), step(2, 800)), STOP_BOUND, STOP_BOUND, True),
        # errors at a higher concurrency: the steps before count, as the HSM's limit
        ((step(1, 400), step(2, 800), step(4, 100, errors=5)), STOP_ERRORS, STOP_FLAT, False),
    ],
)
def test_what_the_best_step_means(
    steps: tuple[Step, ...], stop: str, limit: str, lower: bool
) -> None:
    m = HsmMeasurement("h", "M", "caller", 32, steps, stop)
    assert m.max_ops == pytest.approx(max(s.ops_per_second for s in steps if not s.errors))
    assert (m.limit, m.max_is_lower_bound) == (limit, lower)


def test_steps_with_errors_do_not_count() -> None:
    m = HsmMeasurement("h", "M", "caller", 32, (step(1, 400), step(2, 900, errors=1)), STOP_ERRORS)
    assert m.max_ops == 400


def test_a_measurement_without_a_clean_step_is_refused() -> None:
    with pytest.raises(ValueError, match="no step without errors"):
        HsmMeasurement("h", "M", "caller", 32, (step(1, 10, errors=3),), STOP_ERRORS)


@pytest.mark.parametrize(
    ("this", "best", "verdict"),
    [
        (step(2, 800), 400.0, None),  # doubled: go on
        (step(2, 430), 400.0, STOP_FLAT),  # under 10 % more
        (step(2, 440), 400.0, STOP_FLAT),  # exactly 10 % more is not more than 10 %
        (step(2, 445), 400.0, None),
        (step(2, 800, busy=0.9), 400.0, STOP_CPU),
        (step(2, 800, errors=1), 400.0, STOP_ERRORS),
        (step(1, 400), 0.0, None),  # the first step
    ],
)
def test_when_the_stepping_stops(this: Step, best: float, verdict: str | None) -> None:
    assert stop_after(this, best) == verdict


@pytest.mark.parametrize(
    ("bound", "sizes"),
    [(1, [1]), (2, [1, 2]), (12, [1, 2, 4, 8, 12]), (32, [1, 2, 4, 8, 16, 32])],
)
def test_step_sizes(bound: int, sizes: list[int]) -> None:
    assert step_sizes(bound) == sizes


def test_the_time_bound_grows_with_hsms_and_steps() -> None:
    one = time_bound(1, 32, 1.5)
    assert time_bound(2, 32, 1.5) == pytest.approx(2 * one)
    assert time_bound(1, 64, 1.5) > one


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([], 50) == 0.0


# ---- the measuring loop, over a fake HSM ---------------------------------------------------


@dataclass
class FakeHsm:
    """An HSM behind the Hsm protocol that does *units* operations at a time, each taking a
    millisecond; or fails every call."""

    name: str = "fake-1"
    units: int = 2
    failure: Exception | None = None

    def __post_init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self._units = asyncio.Semaphore(self.units)

    @property
    def model(self) -> str:
        return "Fake"

    @property
    def load(self) -> int:
        return 0

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        return KeyInfo(key_id, KeyStatus.ENABLED, ("ENCRYPT", "DECRYPT"), 3, frozenset({3}))

    async def _op(self) -> None:
        if self.failure is not None:
            raise self.failure
        async with self._units:
            await asyncio.sleep(0.001)

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        await self._op()
        self.calls.append(("encrypt", aad))
        return bytes(12), bytes(b ^ 1 for b in plaintext) + bytes(16)

    async def decrypt(
        self, key_id: str, version: int, iv: bytes, data: bytes, aad: bytes, deadline: float
    ) -> bytes:
        await self._op()
        self.calls.append(("decrypt", aad))
        return bytes(b ^ 1 for b in data[:-16])

    def accepts_iv_length(self, length: int) -> bool:
        return True

    async def kcv(self, key_id: str, version: int, deadline: float) -> str | None:
        return None

    async def probe(self, timeout: float) -> ProbeResult:
        return ProbeResult(True, 0.001, "ok")


async def test_measure_steps_up_from_one_caller_with_encrypt_and_decrypt() -> None:
    fake = FakeHsm(units=2)
    m = await measure(
        fake, "health", model="Fake", iv_mode="caller", bound=8, step_seconds=0.05, deadline_s=1
    )
    sizes = [s.concurrency for s in m.steps]
    assert sizes == step_sizes(8)[: len(sizes)]
    assert m.stop in (STOP_FLAT, STOP_CPU, STOP_BOUND)
    assert all(s.ops > 0 and s.errors == 0 and s.p50_ms <= s.p99_ms for s in m.steps)
    kinds = {kind for kind, _ in fake.calls}
    assert kinds == {"encrypt", "decrypt"}
    assert {aad for _, aad in fake.calls} == {AAD}
    assert len(PLAINTEXT) == 32


async def test_an_hsm_that_fails_every_call_is_unavailable() -> None:
    fake = FakeHsm(failure=InternalError("CKR_DEVICE_ERROR"))
    with pytest.raises(CapacityError, match=r"^hsm fake-1: UNAVAILABLE: InternalException: "):
        await measure(
            fake, "health", model="Fake", iv_mode="caller", bound=4, step_seconds=0.05, deadline_s=1
        )


async def test_an_hsm_without_the_key_is_unavailable() -> None:
    class NoKey(FakeHsm):
        async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
            raise KeyNotFoundError("no such key")

    with pytest.raises(CapacityError, match=r"^hsm fake-1: UNAVAILABLE: KeyNotFoundException: "):
        await measure(
            NoKey(),
            "health",
            model="Fake",
            iv_mode="caller",
            bound=4,
            step_seconds=0.05,
            deadline_s=1,
        )


def test_a_proxy_is_planned_at_the_cpu_its_planned_rate_costs() -> None:
    m = cpu_steps((1, 400), (2, 300), (4, 200), (8, 100))
    p = plan(100_000, [m], SHAPE, http_cpu_us=450)
    cost = 450 + m.cpu_us_at(p.proxy_planned / 2 * 0.002)
    # 70 % of two cores at the planned rate's own cost, which is dearer than at the maximum.
    assert p.proxy_planned * cost / 1e6 == pytest.approx(2 * 0.7, rel=0.006)
    assert p.proxy_planned < 0.7 * p.cpu_bound
    assert p.workers <= SHAPE.cores
    assert p.proxies == math.ceil(100_000 / p.proxy_planned)
