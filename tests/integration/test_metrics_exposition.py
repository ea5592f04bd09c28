"""Prometheus metrics (xksproxy.metrics) served and summed: the /metrics app over real HTTP on
127.0.0.1, and multiprocess mode with real worker processes.  Names, labels and bounds, in this
process: tests/unit/test_metrics.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.exposition import label_values, parse, value
from xksproxy.http.listen import metrics_app
from xksproxy.metrics import (
    MULTIPROC_ENV,
    Metrics,
    mark_worker_dead,
    prepare_multiprocess_dir,
    render,
)

# --- the /metrics app over real HTTP ---------------------------------------------------------


@pytest.fixture
async def metrics_server() -> AsyncIterator[TestServer]:
    m = Metrics(version="1.2.3")
    m.request("encrypt", 200, None, 0.002)
    server = TestServer(metrics_app(lambda: render(m)), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def fetch(server: TestServer, method: str, path: str) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.make_url(path)) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def test_get_metrics_serves_the_exposition(metrics_server: TestServer) -> None:
    status, content_type, body = await fetch(metrics_server, "GET", "/metrics")
    assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    labels = {"api": "encrypt", "status": "200", "error_name": "none"}
    assert value(parse(body), "xks_requests_total", **labels) == 1


async def test_post_metrics_is_405(metrics_server: TestServer) -> None:
    status, _, _ = await fetch(metrics_server, "POST", "/metrics")
    assert status == 405


async def test_other_paths_are_404(metrics_server: TestServer) -> None:
    status, _, _ = await fetch(metrics_server, "GET", "/")
    assert status == 404


# --- multiprocess mode, with real processes --------------------------------------------------

WORKER = """
import os, sys
from xksproxy.metrics import Metrics
m = Metrics(hsm_names=["hsm-1"], version="9.9")
for _ in range(int(sys.argv[1])):
    m.request("encrypt", 200, None, 0.004)
m.pool_sample("hsm-1", int(sys.argv[1]), 0, 0, 0)
print(os.getpid())
"""

RENDER = """
import sys
from xksproxy.metrics import Metrics, render
sys.stdout.buffer.write(render(Metrics(version="9.9"))[0])
"""


def run_python(code: str, directory: Path, *args: str) -> bytes:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=dict(os.environ, **{MULTIPROC_ENV: str(directory)}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


@pytest.fixture(scope="module")
def worker_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Metric files left by two worker processes: 3 and 4 requests, 3 and 4 idle sessions."""
    directory = tmp_path_factory.mktemp("multiproc")
    prepare_multiprocess_dir(directory)
    pids = [int(run_python(WORKER, directory, n)) for n in ("3", "4")]
    return directory, pids


@pytest.fixture
def workers(worker_files: tuple[Path, list[int]], tmp_path: Path) -> tuple[Path, list[int]]:
    """A private copy of the worker files, so that a test may change them."""
    directory, pids = worker_files
    copy = tmp_path / "multiproc"
    shutil.copytree(directory, copy)
    return copy, pids


def test_multiprocess_render_sums_the_request_counters(workers: tuple[Path, list[int]]) -> None:
    found = parse(run_python(RENDER, workers[0]))
    labels = {"api": "encrypt", "status": "200", "error_name": "none"}
    assert value(found, "xks_requests_total", **labels) == 7
    assert value(found, "xks_request_duration_seconds_count", api="encrypt") == 7


def test_multiprocess_pool_gauges_sum_over_workers(workers: tuple[Path, list[int]]) -> None:
    found = parse(run_python(RENDER, workers[0]))
    assert value(found, "xks_pool_sessions", hsm="hsm-1", state="idle") == 7


def test_multiprocess_build_info_is_one_series(workers: tuple[Path, list[int]]) -> None:
    found = parse(run_python(RENDER, workers[0]))
    assert label_values(found, "xks_build_info", "version") == {"9.9"}
    assert value(found, "xks_build_info", version="9.9") == 1


def test_a_dead_workers_gauges_go_and_its_counts_stay(workers: tuple[Path, list[int]]) -> None:
    directory, pids = workers
    mark_worker_dead(directory, pids[1])
    found = parse(run_python(RENDER, directory))
    assert value(found, "xks_pool_sessions", hsm="hsm-1", state="idle") == 3
    labels = {"api": "encrypt", "status": "200", "error_name": "none"}
    assert value(found, "xks_requests_total", **labels) == 7
