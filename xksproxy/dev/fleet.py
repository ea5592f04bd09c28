"""``xksproxy dev-setup DIR --proxies N``: a fleet rig, N proxies on the same HSMs behind HAProxy.

Proxy K (from 1) serves ``DIR/proxy-K/xksproxy.toml``: its API on port P+K and its /metrics on
M+K-1 (P is ``--port``, M ``--metrics-port``), ``fleet_size = N`` and a drain period on SIGTERM
that outlasts HAProxy's health checks (docs/operations/fleet.md).  ``DIR/haproxy.cfg`` has
HAProxy listen on P, check each proxy's ``/ping`` twice a second and balance over those that
answer 200; ``DIR/kms-xks-config.json`` names P.  ``DIR/xksproxy.toml`` is the rig's own
configuration, for the key commands (the same HSMs, keys and credentials).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xksproxy.errors import OperatorError

MAX_PROXIES = 16
#: Seconds a fleet rig's proxy keeps serving after SIGTERM with /ping at 503: HAProxy, checking
#: every 0.5 s and taking a server out after one failed check, has stopped sending by then.
DRAIN_SECONDS = 2.0
HAPROXY_CHECK_MS = 500


class FleetError(OperatorError):
    """The fleet rig cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class FleetPorts:
    balancer: int
    api: tuple[int, ...]  # proxy K's API port at index K-1
    metrics: tuple[int, ...]


def fleet_ports(port: int, metrics_port: int, proxies: int) -> FleetPorts:
    """The ports of a fleet of *proxies*; FleetError if any is out of range or used twice."""
    if not 1 <= proxies <= MAX_PROXIES:
        raise FleetError(f"--proxies {proxies}: must be between 1 and {MAX_PROXIES}")
    ports = FleetPorts(
        port,
        tuple(port + k for k in range(1, proxies + 1)),
        tuple(metrics_port + k for k in range(proxies)),
    )
    named = [("--port (HAProxy)", port)]
    named += [(f"proxy-{k} API", p) for k, p in enumerate(ports.api, start=1)]
    named += [(f"proxy-{k} metrics", p) for k, p in enumerate(ports.metrics, start=1)]
    out = [f"{what} {p}" for what, p in named if not 1 <= p <= 65535]
    if out:
        raise FleetError(f"ports out of range: {', '.join(out)} (--port and --metrics-port)")
    seen: dict[int, str] = {}
    for what, p in named:
        if p in seen:
            raise FleetError(
                f"port {p} would serve both {seen[p]} and {what}: the API ports are --port+1 "
                f"to --port+{proxies} and the metrics ports --metrics-port to "
                f"--metrics-port+{proxies - 1}; choose ranges that do not overlap"
            )
        seen[p] = what
    return ports


def find_haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        raise FleetError(
            "HAProxy is not installed (apt-get install haproxy): the fleet rig puts it in "
            "front of the proxies"
        )
    return path


def haproxy_cfg(host: str, ports: FleetPorts, path: Path) -> str:
    """HAProxy in front of the proxies: HTTP, round robin over the proxies whose /ping says
    200; a request that could not be sent (a proxy gone) is sent to another."""
    servers = "".join(
        f"    server proxy-{k} {_addr(host, p)}\n" for k, p in enumerate(ports.api, start=1)
    )
    return f"""\
# HAProxy in front of the rig's {len(ports.api)} proxies (xksproxy dev-setup --proxies).
# Start it with: haproxy -f {path}
# (it stays in the foreground; stop it by its PID)
global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 5s
    timeout queue 1s
    # A request that never reached a proxy (refused, or its idle connection closed as the
    # proxy left) is sent again, to another proxy.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend xks
    bind {_addr(host, ports.balancer)}
    default_backend proxies

backend proxies
    balance roundrobin
    option httpchk GET /ping
    http-check expect status 200
    # Out after one failed check (a draining proxy says 503), back after two good ones.
    default-server check inter {HAPROXY_CHECK_MS}ms fastinter 250ms downinter 1s rise 2 fall 1
{servers}"""


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_haproxy_cfg(haproxy: str, cfg: Path) -> None:
    proc = subprocess.run(
        [haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise FleetError(f"haproxy -c rejects {cfg}: {why[-1] if why else proc.returncode}")


def existing_proxies(directory: Path) -> int | None:
    """How many proxies the fleet rig in *directory* has; None if it is not a fleet rig."""
    if not (directory / "haproxy.cfg").exists():
        return None
    return sum(1 for p in directory.glob("proxy-*/xksproxy.toml"))


def write_fleet(
    directory: Path,
    ports: FleetPorts,
    host: str,
    config_text: Callable[[int, int, str], str],
) -> list[Path]:
    """Each proxy's configuration (made by ``config_text(api_port, metrics_port, extra)``,
    *extra* the [server] lines of a fleet member) and ``haproxy.cfg``, where missing; the
    proxies' configuration paths.  FleetError if HAProxy is missing or rejects the file."""
    haproxy = find_haproxy()
    n = len(ports.api)
    extra = (
        f"fleet_size = {n}\ndrain_seconds = {DRAIN_SECONDS:g}  # /ping 503 first, on SIGTERM\n"
        "workers = 1  # the fleet is the proxies: one process each on this one host\n"
    )
    paths = []
    for k, (api, metrics) in enumerate(zip(ports.api, ports.metrics, strict=True), start=1):
        home = directory / f"proxy-{k}"
        home.mkdir(mode=0o700, exist_ok=True)
        path = home / "xksproxy.toml"
        if not path.exists():
            path.write_text(config_text(api, metrics, extra))
        paths.append(path)
    cfg = directory / "haproxy.cfg"
    if not cfg.exists():
        cfg.write_text(haproxy_cfg(host, ports, cfg))
    check_haproxy_cfg(haproxy, cfg)
    return paths
