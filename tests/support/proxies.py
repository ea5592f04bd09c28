"""A real proxy process: ``python -m xksproxy serve``, started, waited for and stopped."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.configs import read_config
from tests.support.paths import ROOT


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    workers: int = 1

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def sighup(self) -> None:
        """Reload, and wait until every worker says it applied (or rejected) the reload."""
        before = self.log_text().count('"reload_')
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log_text().count('"reload_') < before + self.workers:
            if time.monotonic() > deadline:
                raise AssertionError("the proxy did not log a reload")
            time.sleep(0.02)


def workers_of(config: Path) -> int:
    """The worker processes a configuration asks for (default: the CPUs we may use)."""
    workers: int = read_config(config).get("server", {}).get("workers", 0)
    return workers or len(os.sched_getaffinity(0))


def spawn_proxy(
    config: Path,
    stdout: Path,
    *,
    stderr: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """`serve -c config`, its output to *stdout* (and *stderr*, or with it); *open_files*: the
    soft and hard open-file limits it starts with.  Not waited for: see
    :func:`tests.support.waiting.until_in`."""

    def limits() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    with stdout.open("wb") as out, (stderr or stdout).open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT if stderr is None else err,
            cwd=ROOT,
            preexec_fn=limits,
        )


def start_server(config: Path, port: int, log: Path) -> Server:
    """`serve -c config`, its output to *log*; returns once every worker listens on *port*."""
    with log.open("wb") as logf:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited {proc.returncode}: {log.read_text()}")
        # "listening" once every worker listens (and can take a reload).
        if '"listening"' in log.read_text(errors="replace"):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return Server(proc, port, log, workers_of(config))
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"proxy did not listen on {port}: {log.read_text()}")


def stop_server(server: Server) -> None:
    stop_process(server.proc, 15)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within *timeout* seconds; waited for."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
