"""Readiness for systemd (Type=notify): READY=1 once every worker listens, STOPPING=1 on stop."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Rig, free_port, make_rig, start_server, stop_server
from xksproxy import sdnotify


@pytest.fixture(scope="module")
def nrig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(tmp_path_factory.mktemp("notify"), free_port())


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
    config = nrig.dir / f"w{workers}.toml"  # relative paths in it are the rig's
    config.write_text(nrig.config.read_text().replace("workers = 2", f"workers = {workers}", 1))
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


def test_nothing_is_sent_without_a_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_an_unreachable_socket_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


def test_an_abstract_socket_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"xksproxy-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"
