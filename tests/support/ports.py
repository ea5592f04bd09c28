"""Ports for listeners: always free ones, never a fixed number (``make run`` may be serving on
8000 and 9100 beside the suite)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int) -> list[int]:
    """*n* different TCP ports of 127.0.0.1 that nothing listens on now (each bound to port 0,
    all held at once so that no two are alike, then let go)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    (port,) = free_ports(1)
    return port
