"""The load generator's logic (loadtest/): statistics, scheduling, HTTP framing, error counts,
in this process.  Behaviour only, never speed.  The engine against a server, and the
multi-process driver: tests/integration/test_loadtest_runs.py.
"""

from __future__ import annotations

import itertools

import pytest

from loadtest import driver, presign
from loadtest.engine import ProtocolError, ResponseParser, error_name
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


def test_wrk_script_keeps_every_byte_of_a_request() -> None:
    from loadtest.wrk_script import lua_string, script

    raw = b'POST /p HTTP/1.1\r\nX: "q" \\ \x7f\r\n\r\n{"a":1}'
    assert lua_string(raw) == (
        '"POST /p HTTP/1.1\\013\\010X: \\"q\\" \\\\ \\127\\013\\010\\013\\010{\\"a\\":1}"'
    )
    assert script([raw, raw]).count(lua_string(raw)) == 2
