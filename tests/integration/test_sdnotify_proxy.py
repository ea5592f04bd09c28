"""Readiness for systemd (Type=notify) from a real proxy: READY=1 once every worker listens,
STOPPING=1 on stop (the messages alone: tests/unit/test_sdnotify.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxies import start_server, stop_server
from tests.support.rigs import Rig, make_rig


@pytest.fixture(scope="module")
def nrig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(tmp_path_factory.mktemp("notify"))


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket, seconds: float = 10.0) -> list[str]:
    """Every message that arrives within *seconds* (or until one says STOPPING=1)."""
    end = time.monotonic() + seconds
    out: list[str] = []
    while time.monotonic() < end:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if "STOPPING=1" in out[-1]:
            break
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_when_listening_and_stopping_on_sigterm(
    nrig: Rig, listener: socket.socket, tmp_path: Path, workers: int
) -> None:
    # w1.toml or w2.toml, beside the rig's: relative paths in it are the rig's
    config = nrig.variant(f"w{workers}", {"server": {"workers": workers}}, new_ports=False)
    server = start_server(config, nrig.port, tmp_path / "proxy.log")
    try:
        # start_server returns once the proxy logged "listening": READY=1 was sent just after.
        first = received(listener, seconds=2.0)
    finally:
        stop_server(server)
    rest = received(listener, seconds=5.0)
    assert first and first[0].splitlines()[0] == "READY=1", first
    assert any(line.startswith("STATUS=serving on") for line in first[0].splitlines())
    assert len([m for m in first if "READY=1" in m]) == 1  # from the supervisor only
    assert any("STOPPING=1" in m for m in first + rest)
