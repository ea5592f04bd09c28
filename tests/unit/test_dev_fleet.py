"""The fleet rig's ports and HAProxy file (xksproxy/dev/fleet.py), without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from xksproxy.dev.fleet import MAX_PROXIES, FleetError, fleet_ports, haproxy_cfg


def test_proxy_k_gets_port_plus_k_and_metrics_port_plus_k_minus_1() -> None:
    ports = fleet_ports(8400, 9400, 3)
    assert (ports.balancer, ports.api, ports.metrics) == (
        8400,
        (8401, 8402, 8403),
        (9400, 9401, 9402),
    )


@pytest.mark.parametrize(
    ("port", "metrics", "n", "says"),
    [
        (8400, 8402, 3, "port 8402 would serve both proxy-2 API and proxy-1 metrics"),
        (8400, 8399, 3, "port 8400 would serve both --port (HAProxy) and proxy-2 metrics"),
        (65534, 9400, 3, "ports out of range: proxy-2 API 65536, proxy-3 API 65537"),
        (8400, 0, 2, "ports out of range: proxy-1 metrics 0"),
        (8400, 9400, 0, f"--proxies 0: must be between 1 and {MAX_PROXIES}"),
    ],
)
def test_ranges_that_collide_or_overflow_are_refused(
    port: int, metrics: int, n: int, says: str
) -> None:
    with pytest.raises(FleetError, match=says.replace("(", r"\(").replace(")", r"\)")):
        fleet_ports(port, metrics, n)


def test_haproxy_checks_ping_and_balances_over_every_proxy() -> None:
    text = haproxy_cfg("127.0.0.1", fleet_ports(8400, 9400, 2), Path("/rig/haproxy.cfg"))
    assert "bind 127.0.0.1:8400" in text
    assert "option httpchk GET /ping" in text and "http-check expect status 200" in text
    assert "server proxy-1 127.0.0.1:8401\n" in text and "server proxy-2 127.0.0.1:8402\n" in text
    assert "retry-on conn-failure empty-response" in text and "option redispatch" in text
    assert "haproxy -f /rig/haproxy.cfg" in text
    six = haproxy_cfg("::1", fleet_ports(8400, 9400, 1), Path("/rig/haproxy.cfg"))
    assert "bind [::1]:8400" in six and "server proxy-1 [::1]:8401" in six
