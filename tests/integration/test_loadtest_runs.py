"""The load generator (loadtest/) at work: the engine against a tiny aiohttp app on 127.0.0.1 in
this process, and the multi-process driver against the floor server in a subprocess; no
SoftHSM.  Behaviour only, never speed (its logic alone: tests/unit/test_loadtest.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from loadtest import driver, presign
from loadtest.engine import Share, clock, run_share
from loadtest.presign import Pool, Target
from loadtest.servers import ROOT, free_port, listening

# ---- the engine against a tiny server ------------------------------------------------------


async def answer(request: web.Request) -> web.Response:
    await request.read()
    op = request.match_info["op"]
    if op == "slow":
        await asyncio.sleep(0.03)
    if op in ("encrypt", "slow"):
        return web.json_response({"ciphertext": "AA=="})
    if op == "missing":
        return web.json_response({"errorName": "KeyNotFoundException"}, status=404)
    if op == "closing":
        resp = web.json_response({"errorName": "ThrottlingException"}, status=429)
        resp.force_close()
        return resp
    return web.Response(status=500, text="not json")


@pytest.fixture
async def tiny() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/kms/xks/v1/keys/{key}/{op}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


def pool_for(port: int, ops: list[str]) -> Pool:
    target = Target("127.0.0.1", port, "/kms/xks/v1", "AKIDEXAMPLE", "secret", "us-east-1")
    raws = [presign.signed(target, f"/keys/foo/{op}", b"{}") for op in ops]
    return Pool(tuple(ops), list(range(len(ops))), raws)


async def test_closed_loop_counts_errors_by_name(tiny: int) -> None:
    pool = pool_for(tiny, ["encrypt", "missing", "broken", "closing"])
    share = Share("closed", connections=3, duration=30.0, requests=200)
    s = await run_share("127.0.0.1", tiny, pool, share, clock)
    assert s.sent == s.completed == 200
    assert [len(lat) for lat in s.latencies] == [50, 50, 50, 50]
    assert s.errors == {"KeyNotFoundException": 50, "HTTP 500": 50, "ThrottlingException": 50}
    assert s.statuses == {404: 50, 500: 50, 429: 50}
    assert s.reconnects == 50  # each "Connection: close" answer: a new connection, no loss


async def test_open_loop_keeps_the_schedule(tiny: int) -> None:
    pool = pool_for(tiny, ["encrypt"])
    share = Share("open", connections=4, duration=0.4, rate=500.0, total=200)
    s = await run_share("127.0.0.1", tiny, pool, share, lambda: clock() + 0.01)
    assert s.sent == s.completed == 200
    assert not s.errors
    assert s.ended - s.started >= 0.39  # the last request was not due before 0.398 s


async def test_open_loop_counts_the_wait_for_a_connection(tiny: int) -> None:
    # One connection, 30 ms per answer, a request due every 10 ms: requests queue in the
    # generator, and their latency runs from when they were due, not from when they went out.
    pool = pool_for(tiny, ["slow"])
    share = Share("open", connections=1, duration=0.2, rate=100.0, total=20)
    s = await run_share("127.0.0.1", tiny, pool, share, clock)
    assert s.completed == 20
    latencies = sorted(s.latencies[0])
    assert latencies[0] < 0.3  # the first one did not wait
    assert latencies[-1] > 0.3  # the last one waited for ~19 answers, due 0.19 s in


async def test_unreachable_server_fails_fast() -> None:
    port = free_port()
    with pytest.raises(OSError):
        await run_share(
            "127.0.0.1", port, pool_for(port, ["encrypt"]), Share("closed", 1, 1.0), clock
        )


# ---- several generator processes against the floor server ----------------------------------


@pytest.fixture(scope="module")
def floor_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.floor", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = listening(port)
        deadline = clock() + 20
        while not ready():
            assert proc.poll() is None and clock() < deadline, "the floor server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_processes_share_a_run(floor_port: int) -> None:
    pool = pool_for(floor_port, ["encrypt", "decrypt"])
    s = driver.run(
        "127.0.0.1", floor_port, pool, driver.Load("closed", 4, 30.0, procs=2, requests=300)
    )
    assert s.completed == s.sent == 300
    assert not s.errors
