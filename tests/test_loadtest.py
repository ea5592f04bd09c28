"""The load generator's logic (loadtest/): statistics, scheduling, HTTP framing, error counts.

Behaviour only, never speed.  The engine runs against a tiny aiohttp app on 127.0.0.1 in this
process, and the multi-process driver against the floor server in a subprocess; no SoftHSM.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from loadtest import driver, presign
from loadtest.engine import ProtocolError, ResponseParser, Share, clock, error_name, run_share
from loadtest.presign import Pool, Target
from loadtest.servers import ROOT, free_port, listening
from loadtest.stats import Samples, latency_ms, merge, percentile

HEAD = "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{length}: {n}\r\n{extra}\r\n"


def response(status: int, body: bytes, length: str = "Content-Length", extra: str = "") -> bytes:
    head = HEAD.format(status=status, length=length, n=len(body), extra=extra)
    return head.encode() + body


# ---- statistics ----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 1001)]
    assert percentile(values, 50) == 500
    assert percentile(values, 99) == 990
    assert percentile(values, 99.9) == 999
    assert percentile(values, 100) == 1000
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_latency_summary_in_ms() -> None:
    out = latency_ms([0.003, 0.001, 0.002, 0.004])
    assert out == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "p99.9": 4.0, "max": 4.0, "mean": 2.5}
    assert latency_ms([]) == {}


def test_merge_adds_up_processes() -> None:
    a, b = Samples.empty(("encrypt",)), Samples.empty(("encrypt",))
    a.latencies[0].extend([0.1, 0.2])
    b.latencies[0].append(0.3)
    a.errors["ThrottlingException"] = 1
    b.errors["ThrottlingException"] = 2
    a.started, a.ended, b.started, b.ended = 1.0, 3.0, 0.5, 2.0
    m = merge([a, b])
    assert sorted(m.latencies[0]) == [0.1, 0.2, 0.3]
    assert m.errors == {"ThrottlingException": 3}
    assert (m.started, m.ended) == (0.5, 3.0)


# ---- scheduling ----------------------------------------------------------------------------


def test_open_loop_schedule_is_dealt_out_exactly() -> None:
    load = driver.Load("open", connections=5, duration=2.0, rate=1000.0, procs=3)
    shares = driver.split(load, pool_size=512)
    assert sum(s.connections for s in shares) == 5
    numbers = sorted(g for s in shares for g in range(s.offset, s.total, s.stride))
    assert numbers == list(range(2000))  # every request of the schedule, once
    due = [g / load.rate for g in numbers]  # request g is due g/rate after the start
    assert all(b - a == pytest.approx(0.001) for a, b in itertools.pairwise(due))


def test_closed_loop_split_divides_connections_and_budget() -> None:
    shares = driver.split(driver.Load("closed", 7, 1.0, procs=2, requests=101), pool_size=512)
    assert [s.connections for s in shares] == [4, 3]
    assert sum(s.requests for s in shares) == 101
    assert [s.offset for s in shares] == [0, 256]  # the processes start at different slots
    assert len(driver.split(driver.Load("closed", 1, 1.0, procs=4), 512)) == 1


def test_mix_is_interleaved_in_proportion() -> None:
    weights = presign.parse_weights("encrypt=45,decrypt=45,metadata=9,health=1")
    apis = presign.interleave(weights, 1000)
    assert {a: apis.count(a) for a in weights} == {
        "encrypt": 450,
        "decrypt": 450,
        "metadata": 90,
        "health": 10,
    }
    assert 4 <= apis[:10].count("encrypt") <= 5  # spread out, not in blocks
    with pytest.raises(ValueError):
        presign.parse_weights("encrypt=1,sign=1")


# ---- HTTP framing --------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 12, 40, 70])
def test_response_split_across_reads(cut: int) -> None:
    raw = response(400, b'{"errorName":"ValidationException"}')
    parser = ResponseParser()
    pieces = [raw[i : i + cut] for i in range(0, len(raw), cut)]
    got = [parser.feed(p) for p in pieces]
    assert got[:-1] == [None] * (len(pieces) - 1)
    assert got[-1] == (400, b'{"errorName":"ValidationException"}')
    assert parser.feed(response(200, b"{}")) == (200, b"{}")  # ready for the next response


def test_response_header_names_are_case_insensitive() -> None:
    parser = ResponseParser()
    assert parser.feed(response(200, b"ok", length="content-length")) == (200, b"ok")
    assert parser.feed(response(503, b"", extra="connection: close\r\n")) == (503, b"")
    assert parser.closes


def test_response_without_length_is_refused() -> None:
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_error_name_from_body_or_status() -> None:
    assert error_name(404, b'{"errorName":"KeyNotFoundException"}') == "KeyNotFoundException"
    assert error_name(502, b"<html>bad gateway</html>") == "HTTP 502"
    assert error_name(500, b"[1]") == "HTTP 500"


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


def test_wrk_script_keeps_every_byte_of_a_request() -> None:
    from loadtest.wrk_script import lua_string, script

    raw = b'POST /p HTTP/1.1\r\nX: "q" \\ \x7f\r\n\r\n{"a":1}'
    assert lua_string(raw) == (
        '"POST /p HTTP/1.1\\013\\010X: \\"q\\" \\\\ \\127\\013\\010\\013\\010{\\"a\\":1}"'
    )
    assert script([raw, raw]).count(lua_string(raw)) == 2
