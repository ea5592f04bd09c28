"""The session pool grows to the HSM's latency: a real proxy (one worker, 2 sessions that may
grow to 8) on SoftHSM behind the fault-injection module, its data calls slowed to 20 ms."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from tests.support.api import b64
from tests.support.faultrig import FaultRig, started_fault_rig
from tests.support.metrics import scrape, value
from tests.support.waiting import wait_for
from tests.support.xks_client import Response

DATA_CALLS = ("C_EncryptInit", "C_Encrypt")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRig]:
    with started_fault_rig(tmp_path_factory.mktemp("growth"), max_pool_size=8) as started:
        yield started


def sessions(rig: FaultRig) -> float:
    samples = scrape(rig.rig.metrics_port)[2]
    return sum(
        value(samples, "xks_pool_sessions", hsm="softhsm-1", state=state) or 0
        for state in ("idle", "busy", "stuck")
    )


def burst(rig: FaultRig, n: int) -> list[Response]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: rig.client.encrypt("foo", plaintext=b64(b"x")), range(n)))


def test_a_slow_hsm_gets_the_sessions_its_latency_needs(rig: FaultRig) -> None:
    assert {r.status for r in burst(rig, 4)} == {200}
    wait_for(lambda: sessions(rig) == 2, "the pool's initial 2 sessions in the metrics")
    # An Encrypt now holds its session for 40 ms: 8 at once need 8 sessions to finish within
    # the 200 ms deadline (on 2, the last would wait 160 ms first).
    rig.control.slow(20, DATA_CALLS)
    first = burst(rig, 8)
    assert {r.status for r in first} <= {200, 429}, [r.status for r in first]
    later = [r.status for _ in range(3) for r in burst(rig, 8)]
    assert set(later) == {200}, later
    rig.control.ok()
    wait_for(lambda: sessions(rig) > 2, "more sessions in the metrics")
    assert sessions(rig) <= 8
    log = rig.server.log_text()
    assert '"hsm_pool_grown"' in log
    assert '"max_size": 8' in log
