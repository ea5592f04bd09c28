"""Servers a benchmark starts: the floor and the proxy, as subprocesses that are always stopped.

Each runs in its own session (process group), is stopped with SIGTERM to its leader and, if
still running after :data:`STOP_TIMEOUT`, SIGKILL to the whole group (its worker processes
included).  Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
METRICS_PORT = 9100  # the proxy's default metrics port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def listening(port: int) -> Callable[[], bool]:
    return lambda: port_busy(port)


def pinging(port: int) -> Callable[[], bool]:
    """Whether ``GET /ping`` on 127.0.0.1:port answers 200."""

    def ready() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    return ready


@contextlib.contextmanager
def running(cmd: list[str], log: Path, ready: Callable[[], bool]) -> Iterator[None]:
    """Run *cmd* (output to *log*) until the block ends; it is ready when *ready()* is."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2]} not ready after {START_TIMEOUT} s; see {log}")
            time.sleep(0.1)
        yield
    finally:
        stop(proc)
        trim(log)


def trim(log: Path, marker: bytes = b'"xks_request"', keep: int = 200) -> None:
    """Drop the per-request lines (those with *marker*) of a log beyond the first *keep*:
    the proxy logs one per request, and the rest is what explains a failed run."""
    kept: list[bytes] = []
    seen = 0
    with log.open("rb") as f:
        for line in f:
            if marker in line:
                seen += 1
                if seen > keep:
                    continue
            kept.append(line)
    if seen > keep:
        kept.append(f"... {seen - keep} more {marker.decode()} lines cut\n".encode())
        log.write_bytes(b"".join(kept))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the leader, then SIGKILL to its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    proc.wait()


def floor_cmd(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "loadtest.floor", "--port", str(port), "--workers", str(workers)]


def serve_has_workers() -> bool:
    """Whether ``xksproxy serve`` takes ``--workers``."""
    out = subprocess.run(
        [sys.executable, "-m", "xksproxy", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    return "--workers" in out.stdout


def proxy_config(rig: Path) -> tuple[Path, str | None]:
    """The configuration to serve the rig with, and a note if it is not the rig's own.

    A rig without a ``[metrics]`` table would open the metrics listener on port 9100; if that
    is taken, a copy beside the original (``bench-xksproxy.toml``) sets a free port.
    """
    config = rig / "xksproxy.toml"
    text = config.read_text()
    if "metrics" in tomllib.loads(text) or not port_busy(METRICS_PORT):
        return config, None
    port = free_port()
    copy = rig / "bench-xksproxy.toml"
    copy.write_text(text + f"\n[metrics]\nport = {port}\n")
    return copy, f"port {METRICS_PORT} was taken: served {copy.name} (metrics on port {port})"


def proxy_cmd(config: Path, workers: int, with_flag: bool) -> list[str]:
    cmd = [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)]
    return [*cmd, "--workers", str(workers)] if with_flag else cmd
