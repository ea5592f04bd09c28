"""Key commands that change a key wait for each other, key by key.

Two commands changing one key at once (two imports, an import and the ``rotate-due`` timer's
rotation) would each read the key, each pick the same next version and each write it: two
objects for one version, which no proxy can serve.  So every command that changes a key holds
that key's lock from before it reads the key until it has written the last object: an
exclusive ``flock(2)`` on ``<lock_directory>/key-<KEY_ID>.lock`` (:func:`lock_name`;
``[keys] lock_directory``, default ``/run/lock/xksproxy``).  Commands on different keys never
wait for each other; a command over many keys (``rotate-due``, ``purge-due``, ``replicate``)
holds one key's lock at a time.  A command that has waited ``lock_wait_seconds`` gives up,
having changed nothing.

The kernel drops a lock when its holder dies, however it dies, so a killed command never leaves
a key locked.  Lock files are kept (removing one while another command waits on it would let two
commands in).  The locks serialise the commands of one host, or of every host that shares the
lock directory on a file system with working ``flock`` (NFSv4, for instance); run key commands
from one administration host otherwise.  The proxy itself takes no lock: it only reads keys.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from xksproxy.config import KeysConfig
from xksproxy.errors import KeyAdminError
from xksproxy.models import KEY_ID_RE

POLL_SECONDS = 0.1


class KeyLocks:
    """The per-key locks of a directory.  Re-entrant within a process: a command that holds
    a key's lock may call another that takes it (``rotate-due`` calls ``rotate``)."""

    def __init__(self, directory: Path, wait_seconds: float) -> None:
        self.directory = directory
        self.wait_seconds = wait_seconds
        self._held: dict[str, int] = {}  # key id -> how many holds of this process

    @contextlib.contextmanager
    def hold(
        self, key_id: str, file_name: str | None = None, *, say: bool = True
    ) -> Iterator[None]:
        """Hold *key_id*'s lock for the block; KeyAdminError if it cannot be had in time.
        (*file_name*: another lock of the directory, such as :func:`login_lock`'s.)"""
        if key_id in self._held:
            self._held[key_id] += 1
            try:
                yield
            finally:
                self._held[key_id] -= 1
            return
        fd = self._open(key_id, file_name or lock_name(key_id))
        try:
            self._lock(fd, key_id)
            if say:  # who holds it, for the message of a command that has to wait
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv[1:3])}\n".encode(), 0)
            self._held[key_id] = 1
            try:
                yield
            finally:
                del self._held[key_id]
        finally:
            os.close(fd)  # releases the lock

    def _open(self, key_id: str, file_name: str) -> int:
        try:
            self.directory.mkdir(mode=0o770, parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            return os.open(self.directory / file_name, flags, 0o660)
        except OSError as exc:
            raise KeyAdminError(
                f"cannot open the lock of key {key_id!r} in {self.directory}: "
                f"{exc.strerror or exc} (run key commands as one user, or set "
                "[keys] lock_directory to a directory it may write)"
            ) from exc

    def _lock(self, fd: int, key_id: str) -> None:
        deadline = time.monotonic() + self.wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise KeyAdminError(f"cannot lock key {key_id!r}: {exc.strerror}") from exc
            holder = _holder(fd)
            if time.monotonic() >= deadline:
                raise KeyAdminError(
                    f"key {key_id!r} is being changed by another key command ({holder}) "
                    f"for more than {self.wait_seconds:g} s; nothing was changed, try again"
                )
            if not told and sys.stderr.isatty():  # someone is there to read it
                print(f"waiting for another key command on {key_id!r} ({holder})", file=sys.stderr)
                told = True
            time.sleep(POLL_SECONDS)


def lock_name(key_id: str) -> str:
    """The lock file's name: ``key-<KEY_ID>.lock`` for the ids key commands make (letters,
    digits, ``.``, ``_``, ``-``), a hash of any other label found in a token."""
    if KEY_ID_RE.match(key_id):
        return f"key-{key_id}.lock"
    return f"key-sha256-{hashlib.sha256(key_id.encode(errors='surrogateescape')).hexdigest()}.lock"


def _holder(fd: int) -> str:
    """What the lock file says about its holder: "pid 123, keys rotate"."""
    try:
        pid, _, command = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return "unknown"
    return f"pid {pid}, {command}" if pid.isdigit() else "unknown"


_locks: KeyLocks | None = None


def use(keys: KeysConfig) -> None:
    """Use the lock directory of *keys* (``[keys]``) for this process's key commands."""
    global _locks
    _locks = KeyLocks(keys.lock_directory, keys.lock_wait_seconds)


def _current() -> KeyLocks:
    if _locks is None:
        use(KeysConfig())
    assert _locks is not None
    return _locks


def key_lock(key_id: str) -> contextlib.AbstractContextManager[None]:
    """Hold *key_id*'s lock (see :func:`use`; the default directory until it is called)."""
    return _current().hold(key_id)


@contextlib.contextmanager
def login_lock(hsm: str) -> Iterator[None]:
    """Hold HSM *hsm*'s login lock while a key command finds its token and logs in.  SoftHSM
    rewrites its token file in place at every login, and another process reading it in that
    instant finds no token ("token not found"): so the key commands of one host take turns to
    log in.  Not a key's lock: held for a moment, never while a key is changed; where the lock
    directory cannot be used, the command goes on without it (a key's lock is never skipped)."""
    name = "hsm-" + hashlib.sha256(hsm.encode()).hexdigest()[:16]
    with contextlib.ExitStack() as held:
        with contextlib.suppress(KeyAdminError):
            held.enter_context(_current().hold("\0" + name, f"{name}.lock", say=False))
        yield
