"""Requests aiohttp's parser rejects, sent on raw sockets to a real proxy: each is answered 400
and closed, and the log gets no byte of them (no body, no header value, no signature), only a
short rate-limited line with the parser's error class, counted in a metric."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest

from tests.support.metrics import scrape, value
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import make_rig

# Marker values that must never reach the log.
PLAINTEXT = b"PLAINTEXT-MARKER-7f3a"
SIGNATURE = "SIGNATURE-MARKER-9c1e"
SECRET_HEADER = "HEADER-MARKER-51d0"
B64 = base64.b64encode(PLAINTEXT).decode()
BODY = ('{"plaintext":"' + B64 + '","requestMetadata":{"kmsOperation":"Encrypt"}}').encode()
AUTH = f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host, Signature={SIGNATURE}"  # noqa: E501

MALFORMED = {
    "bad chunk framing": (
        b"POST /example/xks/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {AUTH}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n"
        + BODY
        + b"\r\n0\r\n\r\n"
    ),
    "control byte in a header": (
        b"POST /example/xks/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {AUTH}\r\n".encode()
        + f"X-Note: {SECRET_HEADER}\x01{B64}\r\n".encode()
        + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    ),
    "content length not a number": (
        b"POST /example/xks/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {AUTH}\r\n".encode()
        + f"Content-Length: {B64}\r\n\r\n".encode()
        + BODY
    ),
    "header line too long": (
        b"POST /example/xks/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {AUTH}{'A' * 20000}{SECRET_HEADER}\r\n\r\n".encode()
    ),
    "bad request line": f"GET /{B64} HTTP/1.1 {SECRET_HEADER}\r\nHost: x\r\n\r\n".encode(),
}


def send_raw(port: int, data: bytes) -> bytes:
    """Send *data*, read until the proxy closes.  No half-close: aiohttp takes the end of input
    before its answer as the client gone, and drops the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_rejected_request_leaves_no_byte_of_itself_in_the_log(server: Server, name: str) -> None:
    offset = len(server.log_text())
    answer = send_raw(server.port, MALFORMED[name])
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert b"Server: Python" not in answer and b"aiohttp" not in answer
    time.sleep(0.3)
    log = server.log_text()[offset:]
    for marker in (B64, PLAINTEXT.decode(), SIGNATURE, SECRET_HEADER, "AKIDEXAMPLE"):
        assert marker not in log, (name, marker)
    assert "Traceback" not in log


def test_rejections_are_counted_and_their_lines_limited(server: Server) -> None:
    _, _, before = scrape(server_metrics_port(server))
    offset = len(server.log_text())
    for _ in range(40):
        send_raw(server.port, MALFORMED["bad chunk framing"])
    time.sleep(1.2)
    send_raw(server.port, MALFORMED["bad chunk framing"])  # reports what the second saw
    _, _, after = scrape(server_metrics_port(server))
    name = "xks_http_requests_rejected_total"
    assert value(after, name) - value(before, name) >= 41
    lines = [
        line for line in server.log_text()[offset:].splitlines() if "http_requests_rejected" in line
    ]
    assert 1 <= len(lines) <= 4, lines  # one a second at most, not one per request


def server_metrics_port(server: Server) -> int:
    text = server.log_text()
    marker = '"metrics": "127.0.0.1:'
    start = text.index(marker) + len(marker)
    return int(text[start : text.index('"', start)])


def test_no_answer_names_python_or_aiohttp(server: Server) -> None:
    """The Server header says xksproxy, on the app's answers as on the parser's 400s."""
    ping = send_raw(server.port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    refused = [send_raw(server.port, data) for data in MALFORMED.values()]
    answered = [answer for answer in refused if answer]
    assert len(answered) == len(MALFORMED), refused
    for answer in (ping, *answered):
        head = answer.split(b"\r\n\r\n", 1)[0].decode()
        assert "\r\nServer: xksproxy\r\n" in head + "\r\n", head
        assert "Python" not in head and "aiohttp" not in head


def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    """[server] idle_timeout_seconds (here 1 s): a connection left idle after a request is
    closed by the proxy instead of held for aiohttp's default of about an hour."""
    rig = make_rig(tmp_path / "rig", settings={"server": {"idle_timeout_seconds": 1}})
    srv = start_server(rig.config, rig.port, tmp_path / "proxy.log")
    try:
        with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert s.recv(65536) == b""  # closed by the proxy
            idle = time.monotonic() - started
        assert 0.5 < idle < 5, idle
    finally:
        stop_server(srv)
