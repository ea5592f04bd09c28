"""A fleet: ``dev-setup --proxies 3`` behind the real HAProxy, restarted one proxy at a time (and
one proxy killed) under open-loop load, loses no request; a proxy leaving on SIGTERM fails
/ping first, keeps serving and closes keep-alive connections, then exits; bad fleet options get
one line.  The figures at 400 requests/s come from loadtest/rolling_restart.py, not from here:
this suite asserts what was answered, never how fast."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.presign import Target, path, signed
from loadtest.rolling_restart import Fleet, roll, running, wait_for
from loadtest.servers import pinging
from tests.support.commands import assert_one_line_failure, xksproxy
from tests.support.paths import ROOT

PROXIES = 3
RATE = 150.0  # requests per second: well inside what this shared 2-core machine serves
LOAD_ERRORS = {"ThrottlingException", "DependencyTimeoutException"}


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_block(n: int) -> int:
    """A first port of *n* consecutive free ones."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        if all(_free(base + i) for i in range(n)):
            return base
    raise AssertionError("no block of free ports")


def make_fleet(directory: Path, *options: str) -> Path:
    port = free_block(PROXIES + 1)
    metrics = free_block(PROXIES)
    xksproxy(
        "dev-setup",
        str(directory),
        "--proxies",
        str(PROXIES),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics),
        *options,
    )
    return directory


def events_of(log: Path) -> list[str]:
    return [json.loads(line).get("event") for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def fleet_rig(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fleet(tmp_path_factory.mktemp("fleet") / "rig")


@pytest.mark.timeout(600)
def test_a_rolling_restart_through_haproxy_loses_no_request(fleet_rig: Path) -> None:
    fleet = Fleet.of_rig(fleet_rig, fleet_rig)
    with running(fleet):
        out = roll(fleet, RATE)
    assert out["restarts_within_load"], out
    assert [(r["proxy"], r["how"]) for r in out["restarts"]] == [
        (k, "SIGTERM") for k in range(1, PROXIES + 1)
    ]
    assert out["sent"] == out["requests"], json.dumps(out)
    assert out["lost"] == 0, json.dumps(out)  # every request was answered by a proxy
    # What a proxy may answer on a machine this small and shared, whatever the restarts: an
    # HSM call or a session wait cut short by a starved CPU.  Never an error of the restarts.
    assert set(out["answered_errors"]) <= LOAD_ERRORS, json.dumps(out)
    assert out["fleet_size"] == PROXIES
    for k in range(1, PROXIES + 1):  # each left the balancer the way it should
        events = events_of(fleet_rig / f"proxy-{k}.log")
        # Twice: the restart, and the stop at the end.
        assert events.count("draining") == 2 and events.count("drained") == 2, k


@pytest.mark.timeout(600)
def test_a_proxy_killed_under_load_loses_at_most_its_requests_in_flight(fleet_rig: Path) -> None:
    fleet = Fleet.of_rig(fleet_rig, fleet_rig)
    connections = 16
    with running(fleet):
        out = roll(fleet, RATE, kill=2, connections=connections)
    assert [r["how"] for r in out["restarts"]] == ["SIGKILL"]
    # At most what was in flight on the killed proxy: no more than the generator's
    # connections (one request each); HAProxy sends the ones that never got there elsewhere.
    assert out["lost"] <= connections, json.dumps(out)
    assert set(out["answered_errors"]) <= LOAD_ERRORS, json.dumps(out)


def _request(conn: http.client.HTTPConnection, target: Target) -> http.client.HTTPResponse:
    body = json.dumps({"requestMetadata": {"kmsRequestId": "d", "kmsOperation": "Health"}})
    raw = signed(target, path("health", ""), body.encode())
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    method, url, _ = lines[0].split(" ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    conn.request(method, url, body=payload, headers=headers)
    return conn.getresponse()


@pytest.mark.timeout(300)
def test_sigterm_fails_ping_first_keeps_serving_and_closes_keep_alive(tmp_path: Path) -> None:
    rig = make_fleet(tmp_path / "rig")
    config = rig / "proxy-1" / "xksproxy.toml"
    port = Fleet.of_rig(rig, tmp_path).members[0].port
    target = Target.from_rig(rig).with_port(port)
    with (tmp_path / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        wait_for(pinging(port), "/ping 200", proc)
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        first = _request(kept, target)
        first.read()
        assert first.status == 200 and first.getheader("Connection") != "close"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not pinging(port)(), "/ping no longer 200", proc)
        ping = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        ping.request("GET", "/ping")
        answer = ping.getresponse()
        assert answer.status == 503 and json.loads(answer.read()) == {"status": "draining"}
        # Still served on the connection it already had, which it then closes.
        second = _request(kept, target)
        second.read()
        assert second.status == 200 and second.getheader("Connection") == "close"
        # A new connection is still served too while the drain lasts (2 s in a fleet rig).
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        third = _request(fresh, target)
        third.read()
        assert third.status == 200 and third.getheader("Connection") == "close"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    events = events_of(tmp_path / "proxy.log")
    assert events.index("stopping") < events.index("draining") < events.index("drained")


def test_bad_fleet_options_get_one_line(tmp_path: Path) -> None:
    port = free_block(8)
    # The API ports (port+1..port+3) run into the metrics ports (port+2..port+4).
    proc = xksproxy(
        "dev-setup",
        str(tmp_path / "overlap"),
        "--proxies",
        "3",
        "--port",
        str(port),
        "--metrics-port",
        str(port + 2),
        check=False,
    )
    assert "would serve both" in assert_one_line_failure(proc)
    assert not (tmp_path / "overlap").exists()  # refused before anything was made
    proc = xksproxy(
        "dev-setup", str(tmp_path / "big"), "--proxies", "3", "--port", "65534", check=False
    )
    assert "out of range" in assert_one_line_failure(proc)
    # No HAProxy on PATH: said so, nothing made.
    empty = tmp_path / "empty-path"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "xksproxy", "dev-setup", str(tmp_path / "nohap"), "--proxies", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PATH=str(empty)),
        check=False,
    )
    assert "HAProxy is not installed" in assert_one_line_failure(proc)
    assert not (tmp_path / "nohap").exists()
    # A rig made without --proxies does not become a fleet, nor a fleet another size.
    plain = tmp_path / "plain"
    p, m = free_block(1), free_block(1)
    xksproxy("dev-setup", str(plain), "--port", str(p), "--metrics-port", str(m))
    proc = xksproxy("dev-setup", str(plain), "--proxies", "2", "--port", str(p), check=False)
    assert "without --proxies" in assert_one_line_failure(proc)


def test_a_fleet_of_another_size_is_refused(fleet_rig: Path) -> None:
    proc = xksproxy("dev-setup", str(fleet_rig), "--proxies", "2", check=False)
    assert "fleet rig of 3 proxies" in assert_one_line_failure(proc)


def test_each_proxy_has_its_own_port_and_haproxy_takes_the_file(fleet_rig: Path) -> None:
    members = Fleet.of_rig(fleet_rig, fleet_rig).members
    ports = [m.port for m in members]
    balancer = Target.from_rig(fleet_rig).port
    assert ports == [balancer + k for k in range(1, PROXIES + 1)]
    proc = subprocess.run(
        ["haproxy", "-c", "-f", str(fleet_rig / "haproxy.cfg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
