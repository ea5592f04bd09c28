"""A rolling restart of a fleet rig under open-loop load, through HAProxy: what a client lost.

The rig is made by ``xksproxy dev-setup DIR --proxies N``.  This starts HAProxy
(``DIR/haproxy.cfg``) and every proxy (``DIR/proxy-K/xksproxy.toml``), sends a fixed rate of
signed Encrypt and Decrypt requests to HAProxy, and meanwhile restarts each proxy in turn as an
operator would: SIGTERM, wait for it to exit, start it again, wait until its ``/ping`` says 200.
With ``--kill K`` it instead SIGKILLs proxy K once (and starts it again).  Then it stops what it
started, by PID, and reports every request that did not get a 200 (status 0: no response),
the latency of the rest, how many took over 250 ms (KMS's limit), each restart's timings and
``xksProxyFleetSize`` as GetHealthStatus reports it through the balancer.

    xksproxy dev-setup /tmp/fleet --proxies 3 --port 8400 --metrics-port 9400
    python -m loadtest.rolling_restart --rig /tmp/fleet --rate 400 [--kill 2] [--json out.json]

A measurement, not a test: it asserts nothing (tests/integration/test_fleet.py does, at a lower
rate).  Everything listens on 127.0.0.1 and every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import driver
from loadtest.presign import Target, path, signed
from loadtest.servers import pinging
from loadtest.stats import Samples, summarize
from loadtest.xks_load import prepare

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
KMS_BUDGET_S = 0.25
# After a proxy answers /ping again, before the next one is stopped: HAProxy (dev-setup's
# haproxy.cfg) sends to it again after two passing checks, 0.25 to 0.5 s apart.
BACK_IN_S = 1.5
# What the generator records for a request no proxy answered (besides "HTTP <status>").
LOST_KINDS = ("NoResponse", "ConnectFailed", "ConnectionLost", "BadResponse")


@dataclass
class Member:
    """One proxy of the fleet: its configuration, API port, and process while it runs."""

    index: int
    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xksproxy", "serve", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,
            )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """Signal the proxy and wait for it to exit; the seconds that took."""
        proc = self.proc
        assert proc is not None
        began = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return time.monotonic() - began


@dataclass
class Restart:
    proxy: int
    how: str  # "SIGTERM" or "SIGKILL"
    exit_s: float = 0.0  # signal to exit
    ready_s: float = 0.0  # start to /ping 200
    at_s: float = 0.0  # when the signal was sent, from the start of the load


@dataclass
class Fleet:
    """The processes of a fleet rig: HAProxy and the proxies."""

    rig: Path
    balancer_port: int
    members: list[Member]
    haproxy: subprocess.Popen[bytes] | None = None
    restarts: list[Restart] = field(default_factory=list)

    @classmethod
    def of_rig(cls, rig: Path, logs: Path) -> Fleet:
        configs = sorted(
            rig.glob("proxy-*/xksproxy.toml"), key=lambda p: int(p.parent.name.split("-")[1])
        )
        if not configs or not (rig / "haproxy.cfg").exists():
            raise SystemExit(f"{rig} is not a fleet rig (xksproxy dev-setup DIR --proxies N)")
        members = []
        for k, config in enumerate(configs, start=1):
            port = _port_of(config)
            members.append(Member(k, config, port, logs / f"proxy-{k}.log"))
        return cls(rig, Target.from_rig(rig).port, members)

    def start(self) -> None:
        log = self.rig / "haproxy.log"
        with log.open("ab") as out:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-f", str(self.rig / "haproxy.cfg")],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for m in self.members:
            m.start()
        for m in self.members:
            wait_for(pinging(m.port), f"proxy-{m.index} /ping 200", m.proc)
        wait_for(pinging(self.balancer_port), "HAProxy passing /ping", self.haproxy)

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None:
                m.stop()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(STOP_TIMEOUT)

    def restart(self, m: Member, sig: signal.Signals, t0: float) -> Restart:
        r = Restart(m.index, sig.name, at_s=round(time.monotonic() - t0, 3))
        r.exit_s = round(m.stop(sig), 3)
        began = time.monotonic()
        m.start()
        wait_for(pinging(m.port), f"proxy-{m.index} /ping 200 again", m.proc)
        r.ready_s = round(time.monotonic() - began, 3)
        self.restarts.append(r)
        return r


def _port_of(config: Path) -> int:
    port: int = tomllib.loads(config.read_text())["server"]["port"]
    return port


def wait_for(ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {START_TIMEOUT:.0f} s")
        time.sleep(0.05)


def fleet_size(target: Target) -> Any:
    """xksProxyFleetSize, from a signed GetHealthStatus sent to the balancer."""
    body = json.dumps({"requestMetadata": {"kmsRequestId": "fleet", "kmsOperation": "Health"}})
    raw = signed(target, path("health", ""), body.encode())
    with contextlib.closing(socket.create_connection((target.host, target.port), 5)) as s:
        s.sendall(raw)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return json.loads(resp.read()).get("xksProxyFleetSize")


@contextlib.contextmanager
def running(fleet: Fleet) -> Iterator[Fleet]:
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def over_budget(samples: Samples) -> int:
    return sum(1 for lat in samples.latencies for x in lat if x > KMS_BUDGET_S)


def roll(
    fleet: Fleet,
    rate: float,
    *,
    kill: int | None = None,
    settle: float = 2.0,
    duration: float | None = None,
    connections: int = 32,
) -> dict[str, Any]:
    """Run the load while restarting each proxy in turn (or SIGKILLing proxy *kill* once);
    the summary.  *duration*: the load's length; by default enough for the restarts."""
    target = Target.from_rig(fleet.rig)
    pool = prepare(target, {"encrypt": 1, "decrypt": 1}, ["foo"], 32, connections=8)
    order = [m for m in fleet.members if kill is None or m.index == kill]
    if kill is not None and not order:
        raise SystemExit(f"--kill {kill}: the rig has proxies 1-{len(fleet.members)}")
    length = duration or settle * 2 + len(order) * (5.0 + BACK_IN_S)
    load = driver.Load("open", connections, length, rate=rate)
    result: dict[str, Samples] = {}
    failure: list[BaseException] = []

    def send() -> None:
        try:
            result["samples"] = driver.run(target.host, target.port, pool, load)
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    sender = threading.Thread(target=send)
    t0 = time.monotonic()
    sender.start()
    time.sleep(settle)
    for m in order:
        fleet.restart(m, signal.SIGKILL if kill is not None else signal.SIGTERM, t0)
        time.sleep(BACK_IN_S)  # HAProxy takes it back after two passing checks
    restarts_done = round(time.monotonic() - t0, 3)
    sender.join()
    if failure:
        raise failure[0]
    samples = result["samples"]
    out: dict[str, Any] = {"rate": rate, "proxies": len(fleet.members), "load_s": length}
    out.update(summarize(samples))
    out["over_250ms"] = over_budget(samples)
    # Lost: no answer at all, or the balancer's own error page (no XKS errorName): the request
    # reached no proxy.  Answered errors are a proxy's (errorName), counted apart.
    lost = {name: n for name, n in samples.errors.items() if name in LOST_KINDS or " " in name}
    out["lost"] = sum(lost.values())
    out["lost_by_kind"] = lost
    out["answered_errors"] = {n: c for n, c in samples.errors.items() if n not in lost}
    out["restarts"] = [r.__dict__ for r in fleet.restarts]
    out["restarts_done_s"] = restarts_done
    out["restarts_within_load"] = restarts_done <= length
    out["fleet_size"] = fleet_size(target)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", type=Path, required=True, help="a rig made with --proxies N")
    p.add_argument("--rate", type=float, default=400.0, help="requests per second (default 400)")
    p.add_argument("--kill", type=int, metavar="K", help="SIGKILL proxy K once instead")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    logs = args.rig / "logs"
    logs.mkdir(exist_ok=True)
    fleet = Fleet.of_rig(args.rig, logs)
    with running(fleet):
        out = roll(
            fleet, args.rate, kill=args.kill, settle=args.settle, connections=args.connections
        )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
