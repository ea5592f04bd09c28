"""What a worker process of ``xksproxy serve`` knows of its supervisor (:mod:`xksproxy.supervisor`):
its index and the pipes it reports readiness and heartbeats on, passed in the environment."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

WORKER_ENV = "XKSPROXY_WORKER"
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's beats


@dataclass(frozen=True)
class WorkerLink:
    """What a worker process knows of its supervisor."""

    index: int
    ready_fd: int
    life_fd: int

    def encode(self) -> str:
        return f"{self.index}:{self.ready_fd}:{self.life_fd}"

    @classmethod
    def from_env(cls) -> WorkerLink | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        try:
            index, ready_fd, life_fd = (int(part) for part in raw.split(":"))
        except ValueError:
            raise RuntimeError(f"{WORKER_ENV}={raw!r} is not index:ready_fd:life_fd") from None
        return cls(index, ready_fd, life_fd)

    def report_ready(self) -> bool:
        """Tell the supervisor this worker is listening; False if the supervisor is gone.  The
        pipe stays open for :meth:`beat`."""
        try:
            os.write(self.ready_fd, b"ready\n")
        except BrokenPipeError:
            os.close(self.ready_fd)
            return False
        os.set_blocking(self.ready_fd, False)
        return True

    def beat(self) -> None:
        """One heartbeat (call from the event loop); never blocks, whatever the supervisor."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(self.ready_fd, b".")
