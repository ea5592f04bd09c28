"""sd_notify messages (xksproxy/sdnotify.py) on local sockets (AF_UNIX): none without
NOTIFY_SOCKET, none lost to an unreachable one, an abstract socket reached.  Readiness from a
real proxy: tests/integration/test_sdnotify_proxy.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from xksproxy import sdnotify


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
