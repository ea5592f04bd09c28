"""Bounds on connections before any request is authenticated (xksproxy/http/connections.py),
on real sockets against a real proxy: one worker, headers within 2 s, 4 connections at most,
TLS handshakes within 1 s."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import b64
from tests.support.metrics import scrape, value
from tests.support.proxies import Server, spawn_proxy, start_server, stop_server
from tests.support.rigs import make_rig
from tests.support.tls import make_cert
from tests.support.waiting import until_in
from tests.support.xks_client import XksClient

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 4
PING = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"


def bounded(directory: Path, *, tls: bool) -> tuple[Server, int]:
    server: dict[str, Any] = {
        "workers": 1,
        "header_timeout_seconds": HEADER_TIMEOUT,
        "handshake_timeout_seconds": 1,
        "max_connections": MAX_CONNECTIONS,
    }
    if tls:
        cert, key = make_cert(directory, "ecdsa")
        server["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    rig = make_rig(directory / "rig", settings={"server": server})
    return start_server(rig.config, rig.port, directory / "proxy.log"), rig.metrics_port


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    server, metrics_port = bounded(tmp_path_factory.mktemp("bounds"), tls=False)
    yield server, metrics_port
    stop_server(server)


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the proxy closes *sock* (reading and dropping what it sends)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def closed_count(metrics_port: int, reason: str) -> float:
    return value(scrape(metrics_port)[2], "xks_connections_closed_total", reason=reason)


def test_a_silent_connection_is_closed_after_the_header_timeout(plain: tuple[Server, int]) -> None:
    server, metrics_port = plain
    before = closed_count(metrics_port, "header_timeout")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        took = closed_after(s, 10)
    assert HEADER_TIMEOUT - 0.5 < took < HEADER_TIMEOUT + 2, took
    assert closed_count(metrics_port, "header_timeout") == before + 1


def test_headers_trickled_a_byte_at_a_time_are_cut_off(plain: tuple[Server, int]) -> None:
    server, _ = plain
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        try:
            for byte in b"POST /example/xks/kms/xks/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " * 9:
                s.sendall(bytes([byte]))
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_after(s, 10)
    assert time.monotonic() - started < HEADER_TIMEOUT + 2


def test_a_kept_alive_connection_waits_between_requests(plain: tuple[Server, int]) -> None:
    """The header deadline runs only while a request's headers are coming: a client may wait
    longer than it between two requests (the idle timeout is what bounds that)."""
    server, _ = plain
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(PING)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT + 0.5)


def test_one_connection_too_many_is_closed_at_once(plain: tuple[Server, int]) -> None:
    server, metrics_port = plain
    before = closed_count(metrics_port, "too_many_connections")
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in held:  # each one answered: accepted and counted before the next comes
            s.settimeout(5)
            s.sendall(PING)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            assert closed_after(extra, 5) < 1.0
        assert closed_count(metrics_port, "too_many_connections") == before + 1
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # room again
        s.sendall(PING)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_stalled_tls_handshake_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    server, _ = bounded(tmp_path, tls=True)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            took = closed_after(s, 30)  # asyncio's own default is 60 s
        assert took < 4, took
    finally:
        stop_server(server)


def test_connections_never_exhaust_the_open_file_limit(tmp_path: Path) -> None:
    """With an open-file limit of 320 (soft and hard, so it cannot be raised), 400 idle
    connections from clients: the worker holds connections only up to the limit less its
    reserve and closes the rest at once, so accept() never fails with EMFILE; a request made
    meanwhile is refused at once, not left hanging, and once the idle connections reach the
    header timeout the proxy serves again by itself, with no error logged."""
    rig = make_rig(
        tmp_path / "rig", settings={"server": {"workers": 1, "header_timeout_seconds": 2}}
    )
    log = tmp_path / "proxy.log"
    proc = spawn_proxy(rig.config, log, open_files=(320, 320))
    held: list[socket.socket] = []
    try:
        until_in(log, '"listening"')
        assert '"max_connections_lowered"' in log.read_text()
        for _ in range(400):
            held.append(socket.create_connection(("127.0.0.1", rig.port)))
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        started = time.monotonic()
        with pytest.raises(OSError):  # full: closed at once
            client.encrypt("foo", plaintext=b64(b"x"))
        assert time.monotonic() - started < 1
        time.sleep(HEADER_TIMEOUT + 1)  # the idle ones are closed: room again
        assert client.encrypt("foo", plaintext=b64(b"x")).status == 200
        text = log.read_text()
        assert "Too many open files" not in text and "Traceback" not in text
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(30)
