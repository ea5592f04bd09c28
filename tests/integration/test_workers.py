"""Several worker processes behind one supervisor: a real rig, real processes, real HTTP.

Tests that stop, kill or reconfigure a proxy start their own (``procs``), on fresh ports with a
config written beside the rig's (paths in it are relative to its folder); the others use the
suite's shared two-worker ``server``.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import read_config
from tests.support.files import write_secret
from tests.support.metrics import scrape, value
from tests.support.paths import ROOT
from tests.support.proxies import Server
from tests.support.rigs import RIG_WORKERS, Rig, make_rig, ports_of
from tests.support.xks_client import Response, XksClient

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
WAIT = 15.0  # seconds for something that should happen within about a second or two


def events(text: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of *text* whose event is *name*."""
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


def wait_for(what: str, cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def children(pid: int) -> set[int]:
    """Live processes whose parent is *pid*."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


@dataclass
class Proxy:
    """A ``xksproxy serve`` process started by a test, with its log."""

    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    port: int
    seen_workers: set[int] = field(default_factory=set)  # pids, for the final clean-up

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        return events(self.text(), name)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start."""
        pids = {e["worker"]: e["pid"] for e in self.events("worker_started")}
        self.seen_workers.update(pids.values())
        return pids

    def client(self, rig: Rig) -> XksClient:
        return XksClient("127.0.0.1", self.port, rig.prefix, rig.akid, rig.secret, rig.region)


class Proxies:
    """Starts proxies; stops every one of them, and any worker left behind, at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Proxy] = []
        # Private metrics folders go here rather than the system's temporary folder.
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(directory))

    def spawn(self, config: Path, port: int, *args: str) -> Proxy:
        log = self.directory / f"proxy-{len(self.started)}.log"
        with log.open("ab") as logf:  # append mode: every process's lines stay whole
            proc = subprocess.Popen(
                [sys.executable, "-m", "xksproxy", "serve", "-c", str(config), *args],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
            )
        proxy = Proxy(proc, config, log, port)
        self.started.append(proxy)
        return proxy

    def start(self, config: Path, port: int, *args: str) -> Proxy:
        """Start a proxy and wait until it listens with every worker."""
        proxy = self.spawn(config, port, *args)
        deadline = time.monotonic() + START_TIMEOUT
        while not proxy.events("listening"):
            if proxy.proc.poll() is not None:
                raise AssertionError(f"proxy exited {proxy.proc.returncode}: {proxy.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy did not listen: {proxy.text()}")
            time.sleep(0.05)
        proxy.worker_pids()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
                try:
                    proxy.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proxy.proc.kill()
                    proxy.proc.wait()
            proxy.worker_pids()
            for pid in proxy.seen_workers:  # only workers of this proxy, by pid and command
                if alive(pid) and str(proxy.config) in cmdline(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Proxies]:
    proxies = Proxies(tmp_path)
    try:
        yield proxies
    finally:
        proxies.stop_all()


@pytest.fixture(scope="module")
def wrig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """A rig of this module's own, so that its configs can change freely."""
    return make_rig(tmp_path_factory.mktemp("workers-rig"))


def variant(rig: Rig, name: str, *, workers: int | None = None, **settings: Any) -> Path:
    """A copy of the rig's config with fresh ports (and *workers*, and *settings* merged in)."""
    if workers is not None:
        assert read_config(rig.config)["server"]["workers"] == RIG_WORKERS
        settings = {**settings, "server": {"workers": workers}}
    return rig.variant(name, settings)


def server_port(config: Path) -> int:
    return ports_of(config)[0]


@pytest.fixture
def two_workers(wrig: Rig, procs: Proxies, request: pytest.FixtureRequest) -> Proxy:
    """A two-worker proxy of this test's own."""
    config = variant(wrig, request.node.name.replace("[", "-").replace("]", ""))
    return procs.start(config, server_port(config))


def request_despite_resets(client: XksClient, deadline: float) -> Response:
    """An encrypt request, retried while connections fail (a worker dying under it)."""
    while True:
        try:
            return client.encrypt("foo", plaintext="aGVsbG8=")
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# ---- serving -------------------------------------------------------------------------------


def test_both_workers_serve_requests(server: Server, client: XksClient) -> None:
    offset = len(server.log_text())
    served: set[int] = set()
    deadline = time.monotonic() + WAIT
    while served != set(range(RIG_WORKERS)):
        assert time.monotonic() < deadline, f"only workers {served} served"
        assert client.health().status == 200  # a new connection each time
        served = {e["worker"] for e in events(server.log_text()[offset:], "xks_request")}
    assert served == {0, 1}


def test_the_workers_option_starts_that_many_worker_processes(wrig: Rig, procs: Proxies) -> None:
    config = variant(wrig, "three")  # says 2; the option wins
    proxy = procs.start(config, server_port(config), "--workers", "3")
    pids = proxy.worker_pids()
    assert sorted(pids) == [0, 1, 2]
    kids = children(proxy.proc.pid)
    assert kids == set(pids.values())
    for pid in kids:
        assert cmdline(pid)[1:4] == ["-m", "xksproxy", "serve"]


def test_sighup_makes_every_worker_reload(server: Server) -> None:
    def applied() -> collections.Counter[int]:
        return collections.Counter(e["worker"] for e in events(server.log_text(), "reload_applied"))

    before = applied()
    server.proc.send_signal(signal.SIGHUP)
    wait_for(
        "every worker to reload",
        lambda: all(applied()[w] > before[w] for w in range(RIG_WORKERS)),
    )
    assert set(applied() - before) == {0, 1}


def test_metrics_sum_the_requests_of_every_worker(
    rig: Rig, server: Server, client: XksClient
) -> None:
    _, _, samples = scrape(rig.metrics_port)
    before = value(samples, "xks_requests_total")
    offset = len(server.log_text())
    sent = 0
    deadline = time.monotonic() + WAIT
    served: set[int] = set()
    while served != set(range(RIG_WORKERS)) or sent < 10:
        assert time.monotonic() < deadline, f"only workers {served} served"
        assert client.health().status == 200
        sent += 1
        served = {e["worker"] for e in events(server.log_text()[offset:], "xks_request")}

    def counted() -> float:
        return value(scrape(rig.metrics_port)[2], "xks_requests_total") - before

    wait_for(f"{sent} requests in /metrics", lambda: counted() >= sent)
    assert counted() == sent


# ---- restarts and stopping -----------------------------------------------------------------


def test_a_killed_worker_is_replaced(two_workers: Proxy) -> None:
    victim = two_workers.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker 1", lambda: two_workers.worker_pids()[1] != victim)
    exited = two_workers.events("worker_exited")
    assert [(e["worker"], e["pid"], e["status"]) for e in exited] == [(1, victim, -9)]
    assert children(two_workers.proc.pid) == set(two_workers.worker_pids().values())


def test_a_worker_whose_event_loop_stops_is_replaced(
    wrig: Rig, procs: Proxies, request: pytest.FixtureRequest
) -> None:
    """A worker stopped (SIGSTOP: its event loop no longer runs, its connections stall) sends
    no heartbeat: after worker_heartbeat_timeout_seconds the supervisor kills it and starts
    another; before the watchdog it stayed stopped and nobody noticed."""
    config = variant(wrig, request.node.name, server={"worker_heartbeat_timeout_seconds": 2})
    proxy = procs.start(config, server_port(config))
    victim = proxy.worker_pids()[1]
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for("a new worker 1", lambda: proxy.worker_pids()[1] != victim)
    assert time.monotonic() - stopped < 2 + 5
    (event,) = proxy.events("worker_unresponsive")
    assert (event["worker"], event["pid"]) == (1, victim)
    assert event["silent_seconds"] >= 2
    assert children(proxy.proc.pid) == set(proxy.worker_pids().values())
    client = proxy.client(wrig)
    assert client.encrypt("foo", plaintext="aGVsbG8=").status == 200


def test_requests_keep_succeeding_while_a_worker_is_replaced(wrig: Rig, two_workers: Proxy) -> None:
    client = two_workers.client(wrig)
    victim = two_workers.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    during: list[int] = []
    while two_workers.worker_pids()[1] == victim:
        assert time.monotonic() < deadline, "worker 1 was not restarted"
        during.append(request_despite_resets(client, deadline).status)
    after = [request_despite_resets(client, deadline).status for _ in range(20)]
    assert during, "no request was sent while worker 1 was down"
    assert set(during) == {200}
    assert set(after) == {200}


def test_workers_stop_when_the_supervisor_is_killed(two_workers: Proxy) -> None:
    pids = set(two_workers.worker_pids().values())
    two_workers.proc.kill()
    two_workers.proc.wait()
    wait_for("the workers to exit", lambda: not any(alive(p) for p in pids), timeout=10)
    assert sorted(e["worker"] for e in two_workers.events("supervisor_gone")) == [0, 1]


def test_sigterm_stops_the_supervisor_and_every_worker(two_workers: Proxy) -> None:
    pids = set(two_workers.worker_pids().values())
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert [p for p in pids if alive(p)] == []


def test_a_restart_right_after_a_stop_with_open_connections_listens(
    wrig: Rig, procs: Proxies
) -> None:
    config = variant(wrig, "restart")
    port = server_port(config)
    first = procs.start(config, port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /ping HTTP/1.1\r\nHost: xks\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 200")
        first.proc.send_signal(signal.SIGTERM)  # closes the idle keep-alive connection
        assert first.proc.wait(timeout=STOP_TIMEOUT) == 0
        while conn.recv(4096):  # read to the end, so that closing sends no reset
            pass
    procs.start(config, port)


# ---- failures to start ---------------------------------------------------------------------


def run_serve(
    config: Path, *args: str, tmp: Path, command: str = "serve"
) -> subprocess.CompletedProcess[str]:
    """``xksproxy serve`` (or *command*) expected to fail; a timeout means it ran instead."""
    return subprocess.run(
        [sys.executable, "-m", "xksproxy", command, "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_proxy_on_a_busy_port_fails_with_one_line(
    workers: int, rig: Rig, server: Server, tmp_path: Path
) -> None:
    out = run_serve(rig.config, "--workers", str(workers), tmp=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xksproxy: error: ")
    assert f"127.0.0.1:{rig.port}" in lines[0]


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("workers", [0, 65])
def test_a_worker_count_out_of_range_is_a_config_error(
    wrig: Rig, command: str, workers: int, tmp_path: Path
) -> None:
    config = variant(wrig, f"workers-{workers}", workers=workers)
    out = run_serve(config, tmp=tmp_path, command=command)
    assert out.returncode == 78, out.stderr
    assert "server.workers" in out.stderr


def test_a_worker_that_cannot_start_fails_the_supervisor(wrig: Rig, tmp_path: Path) -> None:
    # The supervisor does not read the credentials file; each worker does, before it listens.
    write_secret(wrig.dir / "bad-credentials.json", "{ not json\n")
    config = variant(wrig, "bad-credentials", sigv4={"credentials_file": "bad-credentials.json"})
    out = run_serve(config, tmp=tmp_path)
    assert out.returncode == 78  # the worker's exit status (invalid configuration)
    assert "Traceback" not in out.stderr + out.stdout
    assert "xksproxy: error: worker 0 did not start (exit status 78)" in out.stderr
    assert "bad-credentials.json: not valid JSON" in out.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pid_file_names_the_process_to_signal(
    wrig: Rig, procs: Proxies, tmp_path: Path, workers: int
) -> None:
    """``serve --pid-file``: the PID to send SIGHUP to (the supervisor's with several workers),
    so nobody has to find the proxy by name; the file is removed when the proxy stops."""
    config = variant(wrig, f"pid-{workers}", workers=workers)
    pid_file = tmp_path / "xksproxy.pid"
    proxy = procs.start(config, server_port(config), "--pid-file", str(pid_file))
    assert int(pid_file.read_text()) == proxy.proc.pid
    os.kill(int(pid_file.read_text()), signal.SIGHUP)
    wait_for("every worker to reload", lambda: len(proxy.events("reload_applied")) == workers)
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert not pid_file.exists()


def test_an_unwritable_pid_file_is_a_configuration_error(wrig: Rig, tmp_path: Path) -> None:
    config = variant(wrig, "pid-bad")
    proc = subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "-c", str(config),
         "--pid-file", str(tmp_path / "no" / "such" / "dir" / "x.pid")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 78, proc.stderr
    assert "--pid-file" in proc.stderr and "Traceback" not in proc.stderr
