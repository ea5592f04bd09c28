"""Several worker processes on one port: start them, watch them, restart them, stop them.

``[server] workers = N`` (default: one per CPU) makes ``xksproxy serve`` a supervisor.  Each
worker is a fresh ``python -m xksproxy serve`` process that binds the same address with
``SO_REUSEPORT`` (the kernel spreads connections over the workers), opens its own HSM sessions
and runs its own health probes.  Why processes: Python runs one core per process, and two
processes double throughput where two threads do not (docs/architecture.md §3).

The supervisor itself touches no HSM.  It serves ``/metrics`` for all workers from
prometheus-client's multiprocess files, forwards SIGHUP, restarts a worker that dies (with
back-off), and on SIGTERM stops the workers, each draining its in-flight requests.

Link to the workers: the environment variable ``XKSPROXY_WORKER`` carries the worker's index
and two inherited file descriptors: a pipe on which the worker reports that it is listening
and then beats once a second from its event loop, and a pipe the supervisor holds open for its
whole life (a worker that sees it close stops: no worker outlives a killed supervisor).

Watchdog: a worker whose beats stop for ``[server] worker_heartbeat_timeout_seconds`` (its
event loop stopped: a SIGSTOP, a call that holds it, a deadlock) still holds its connections
and stalls them; the supervisor kills it (SIGKILL) and starts another in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from xksproxy import sdnotify
from xksproxy.config import Config
from xksproxy.workerlink import HEARTBEAT_INTERVAL, WORKER_ENV, WorkerLink

log = structlog.get_logger(__name__)

START_TIMEOUT = 60.0  # seconds for a worker to open its HSMs and listen
STOP_TIMEOUT = 30.0  # seconds for workers to exit after SIGTERM and drain_seconds, then SIGKILL
RESTART_BACKOFF_MIN = 1.0
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long resets the restart back-off


class StartError(Exception):
    """A worker could not start; ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def check_port_free(host: str, port: int) -> None:
    """Fail if anything listens on *host:port* already.

    SO_REUSEPORT lets any process of the same user join a port silently, so a second proxy
    started on the same port by mistake would share its traffic.  A plain bind (without the
    option) fails whenever a listener exists.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections of an earlier run still in TIME_WAIT do not count (a
        # restart under traffic must work); a listening socket still makes the bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}", 1) from exc


@dataclass
class Reloads:
    """How many reloads (SIGHUP) the supervisor has passed on."""

    count: int = 0


class Worker:
    """One worker process and its restarts."""

    def __init__(self, index: int, config: Config, life_fd: int, env: dict[str, str]) -> None:
        self.index = index
        self.config = config
        self.life_fd = life_fd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = RESTART_BACKOFF_MIN
        self.ready = False  # listening, with its signal handlers in place
        self.reloads_at_spawn = 0
        self.last_beat = 0.0  # time.monotonic() of its last heartbeat
        self._beats: int | None = None  # the read end of its ready/heartbeat pipe

    async def start(self, reloads: Reloads) -> None:
        """Start the process and wait until it listens; StartError if it exits first."""
        self.ready = False
        self.reloads_at_spawn = reloads.count
        ready_r, ready_w = os.pipe()
        link = WorkerLink(self.index, ready_w, self.life_fd)
        try:
            # Popen, not asyncio's subprocesses: their child watcher reported exit status 255
            # ("unknown child process") for workers that exited at once.  Forking takes a few
            # milliseconds, and the supervisor's loop only serves /metrics.
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "xksproxy", "serve", "-c", str(self.config.path)],
                env={**self.env, WORKER_ENV: link.encode()},
                pass_fds=(ready_w, self.life_fd),
            )
        finally:
            os.close(ready_w)
        self.started = time.monotonic()
        try:
            ready = await asyncio.wait_for(_read_line(ready_r), START_TIMEOUT)
        except TimeoutError:
            ready = b""
        if not ready.startswith(b"ready"):
            os.close(ready_r)
        else:
            log.info("worker_started", worker=self.index, pid=self.proc.pid)
            self.ready = True
            self._follow_beats(ready_r)
            if reloads.count != self.reloads_at_spawn:  # it may have read the files before
                self.signal(signal.SIGHUP)
            return
        code = await self._stop_failed()
        raise StartError(f"worker {self.index} did not start (exit status {code})", code or 1)

    def _follow_beats(self, fd: int) -> None:
        """Record each heartbeat of the running worker on *fd* (closed when it ends)."""
        self._close_beats()
        loop = asyncio.get_running_loop()
        self._beats, self.last_beat = fd, time.monotonic()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if data:
                self.last_beat = time.monotonic()
            else:  # the worker is gone
                self._close_beats()

        loop.add_reader(fd, readable)

    def _close_beats(self) -> None:
        if self._beats is not None:
            asyncio.get_running_loop().remove_reader(self._beats)
            os.close(self._beats)
            self._beats = None

    def silent_for(self) -> float:
        """Seconds since the running worker's last heartbeat (0 while it starts)."""
        if not self.ready or self.proc is None or self.proc.returncode is not None:
            return 0.0
        return time.monotonic() - self.last_beat

    async def _stop_failed(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return await self.wait()

    async def wait(self) -> int:
        """The worker's exit status, once it has exited (waited for through a pidfd)."""
        assert self.proc is not None
        return await wait_process(self.proc)

    def signal(self, sig: int, *, starting_too: bool = False) -> None:
        """Send *sig* if the worker runs and has its handlers in place (or *starting_too*)."""
        if self.proc is not None and self.proc.returncode is None and (self.ready or starting_too):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


async def wait_process(proc: subprocess.Popen[bytes]) -> int:
    """Wait for *proc* to exit without blocking the loop or a thread: its pidfd becomes
    readable when it exits (Linux 5.3+)."""
    if proc.poll() is not None:
        return proc.returncode
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)
    loop.add_reader(pidfd, _settle_once, exited)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()


async def _read_line(fd: int) -> bytes:
    """Read *fd* up to its first newline, or to end of file, without blocking the loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    chunks: list[bytes] = []

    def readable() -> None:
        data = os.read(fd, 1)  # one byte at a time: what follows the line is the heartbeats'
        if data:
            chunks.append(data)
        if (not data or data == b"\n") and not done.done():
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def metrics_directory(config: Config) -> tuple[Path, bool]:
    """The multiprocess metrics directory for this run, and whether it is private to it."""
    if config.metrics.multiprocess_dir is not None:
        return config.metrics.multiprocess_dir, False
    return Path(tempfile.mkdtemp(prefix="xksproxy-metrics-")), True


async def supervise(config: Config, metrics_dir: Path) -> int:
    """Run ``config.server.workers`` workers until SIGTERM/SIGINT; return the exit status."""
    from xksproxy.http.listen import ListenError, start_metrics_listener
    from xksproxy.metrics import mark_worker_dead

    server = config.server
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    life_r, life_w = os.pipe()
    env = dict(os.environ)
    workers = [Worker(i, config, life_r, env) for i in range(server.workers)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = Reloads()
    # From the start; a worker still starting gets the reload once it listens.
    loop.add_signal_handler(signal.SIGHUP, _reload, workers, reloads)
    metrics_runner = None
    try:
        config.logging.read_chain_key()  # a bad audit chain key: exit 78 before any worker starts
        check_port_free(server.host, server.port)
        if config.metrics.enabled:
            try:
                metrics_runner = await start_metrics_listener(config, None)
            except ListenError as exc:
                raise StartError(str(exc), 1) from exc
        # One at a time: SoftHSM processes that initialise at the same moment were seen to miss
        # the token ("token not found"); and a worker that cannot start says why before the
        # next one tries.
        for w in workers:
            await w.start(reloads)
        log.info(
            "listening",
            host=server.host,
            port=server.port,
            workers=len(workers),
            tls=server.tls is not None,
            metrics=f"{config.metrics.host}:{config.metrics.port}"
            if config.metrics.enabled
            else None,
        )
        sdnotify.notify("READY=1", f"STATUS=serving on {server.port}, {len(workers)} workers")
        watchers = [asyncio.create_task(_watch(w, stop, metrics_dir, reloads)) for w in workers]
        watchers.append(
            asyncio.create_task(_watchdog(workers, server.worker_heartbeat_timeout_seconds))
        )
        await stop.wait()
        log.info("stopping", workers=len(workers))
        sdnotify.notify("STOPPING=1")
        for task in watchers:
            task.cancel()
        return 0
    except StartError as exc:
        log.error("worker_start_failed", error=str(exc))
        print(f"xksproxy: error: {exc}", file=sys.stderr)
        return exc.code
    finally:
        await _stop_all(workers, server.drain_seconds)
        os.close(life_w)
        os.close(life_r)
        for w in workers:
            if w.proc is not None:
                mark_worker_dead(metrics_dir, w.proc.pid)
        if metrics_runner is not None:
            await metrics_runner.cleanup()


def _reload(workers: list[Worker], reloads: Reloads) -> None:
    from xksproxy.log import reopen

    if (why := reopen()) is not None:  # its own lines: the workers reopen theirs
        log.error("log_reopen_failed", error=why)
    reloads.count += 1
    log.info("sighup_forwarded", workers=sum(w.ready for w in workers))
    for w in workers:
        w.signal(signal.SIGHUP)


async def _watch(w: Worker, stop: asyncio.Event, metrics_dir: Path, reloads: Reloads) -> None:
    """Restart *w* whenever it exits before the supervisor stops."""
    from xksproxy.metrics import mark_worker_dead

    while not stop.is_set():
        assert w.proc is not None
        code = await w.wait()
        if stop.is_set():
            return
        mark_worker_dead(metrics_dir, w.proc.pid)
        ran = time.monotonic() - w.started
        if ran > STABLE_AFTER:
            w.backoff = RESTART_BACKOFF_MIN
        log.error(
            "worker_exited", worker=w.index, pid=w.proc.pid, status=code, restart_in=w.backoff
        )
        await asyncio.sleep(w.backoff)
        w.backoff = min(RESTART_BACKOFF_MAX, w.backoff * 2)
        try:
            await w.start(reloads)
        except StartError as exc:
            log.error("worker_restart_failed", worker=w.index, error=str(exc))


async def _watchdog(workers: list[Worker], timeout: float) -> None:
    """Kill a worker whose heartbeats stopped for *timeout* seconds; _watch restarts it."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        for w in workers:
            silent = w.silent_for()
            if silent >= timeout and w.proc is not None:
                log.error(
                    "worker_unresponsive",
                    worker=w.index,
                    pid=w.proc.pid,
                    silent_seconds=round(silent, 1),
                )
                w.ready = False  # not again while it dies
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()


async def _stop_all(workers: list[Worker], drain: float) -> None:
    """SIGTERM every worker, wait for them to drain (*drain* seconds, then their requests in
    flight) and exit, SIGKILL the rest."""
    running = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for w in workers:
        w.signal(signal.SIGTERM, starting_too=True)
    if not running:
        return
    try:
        await asyncio.wait_for(
            asyncio.gather(*(wait_process(p) for p in running)), drain + STOP_TIMEOUT
        )
    except TimeoutError:
        for p in running:
            if p.poll() is None:
                log.error("worker_killed", pid=p.pid, after_seconds=drain + STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        await asyncio.gather(*(wait_process(p) for p in running))


def run_supervisor(config: Config, metrics_dir: Path, private_dir: bool) -> int:
    """Entry point of ``serve`` with several workers (PROMETHEUS_MULTIPROC_DIR already set)."""
    try:
        return asyncio.run(supervise(config, metrics_dir))
    finally:
        if private_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _settle_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
