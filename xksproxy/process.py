"""Starting the proxy as a process: its PID file, its log, one process or a supervisor of
workers, and how it ends (``xksproxy serve``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from xksproxy.config import Config
from xksproxy.errors import OperatorError

if TYPE_CHECKING:
    from xksproxy.workerlink import WorkerLink


class StartupError(OperatorError):
    """The proxy cannot start: the message names what to fix (a configuration matter)."""

    exit_code = 78


def serve(config: Config, pid_file: Path | None) -> int:
    """Run the proxy until it is told to stop: as a worker of a supervisor (which started this
    process), or as the supervisor of ``[server] workers`` processes, or alone."""
    from xksproxy.workerlink import WorkerLink

    for hsm in config.hsms:  # a missing PIN is a configuration error: fail before binding
        hsm.read_pin()
    worker = WorkerLink.from_env()
    if worker is not None:
        # A worker of a supervisor, which set PROMETHEUS_MULTIPROC_DIR and emptied it.
        configure_log(config, worker.index)
        return serve_process(config, worker)
    if pid_file is not None:
        write_pid_file(pid_file)
    try:
        return serve_supervised(config, pid_file)
    finally:
        remove_pid_file(pid_file)


def write_pid_file(path: Path) -> None:
    """This process's PID in *path* (written whole, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StartupError(f"--pid-file {path}: cannot write it: {exc.strerror}") from exc


def remove_pid_file(path: Path | None) -> None:
    """Remove *path* if it still names this process (another may have taken it over)."""
    if path is None:
        return
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def serve_supervised(config: Config, pid_file: Path | None) -> int:
    from xksproxy.supervisor import metrics_directory

    private_dir = False
    metrics_dir = config.metrics.multiprocess_dir
    if config.server.workers > 1:
        metrics_dir, private_dir = metrics_directory(config)
    if metrics_dir is not None:
        # prometheus-client picks its mode when first imported: set the directory before.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        from xksproxy.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(metrics_dir)
    configure_log(config, None)
    if config.server.workers > 1:
        from xksproxy.app import tls_context
        from xksproxy.supervisor import run_supervisor

        tls_context(config)  # an unusable certificate is a config error, not a worker failure
        assert metrics_dir is not None
        return run_supervisor(config, metrics_dir, private_dir)
    return serve_process(config, None, pid_file)


def configure_log(config: Config, worker: int | None) -> None:
    from xksproxy import log

    try:
        log.configure(config.logging.level, worker=worker, file=config.logging.file)
    except OSError as exc:
        raise StartupError(
            f"logging.file: cannot open {config.logging.file}: {exc.strerror}"
        ) from exc


def serve_process(config: Config, worker: WorkerLink | None, pid_file: Path | None = None) -> int:
    import uvloop

    from xksproxy.app import serve  # after PROMETHEUS_MULTIPROC_DIR is set

    clean = uvloop.run(serve(config, worker=worker))  # ListenError: an OperatorError
    if not clean:
        # Threads stuck inside the HSM's library would keep the interpreter from exiting.
        remove_pid_file(pid_file)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
