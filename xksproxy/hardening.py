"""Process hardening applied at the start of every command: no core dumps, and as many open
files as the hard limit allows.

A core dump of a serving process holds the SigV4 secrets of every prefix, the HSM PIN and the
plaintext of the requests in flight; one of a key command, the security officer's PIN.  So
every process sets ``RLIMIT_CORE`` to 0 (inherited by what it starts) and marks itself not
dumpable with ``prctl(PR_SET_DUMPABLE, 0)``, which the kernel resets on ``execve``, so each
worker sets it again.  Not dumpable also means that only root may attach a debugger or read
``/proc/PID/mem`` and ``/proc/PID/environ``.  The systemd unit adds ``LimitCORE=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def forbid_core_dumps() -> list[str]:
    """Core size limit 0 and not dumpable; returns what could not be done (for a warning)."""
    problems: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        problems.append(f"RLIMIT_CORE: {exc}")
    libc = _libc()
    if libc is None:
        problems.append("PR_SET_DUMPABLE: no C library found")
    elif libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"PR_SET_DUMPABLE: errno {ctypes.get_errno()}")
    return problems


def raise_open_file_limit() -> str | None:
    """Raise the soft limit on open files to the hard one (each connection, session and log
    costs one; running out makes accept() fail); returns why it could not, or None."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        return f"RLIMIT_NOFILE: {exc}"
    return None


def open_files() -> tuple[int, int] | None:
    """This process's open descriptors and its soft limit on them, or None without ``/proc``.
    Listing ``/proc/self/fd`` takes a descriptor itself: when none is left, the count is the
    limit, which is the truth of the moment."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except FileNotFoundError:
        return None
    except OSError:  # EMFILE, ENFILE
        used = limit
    return used, limit


def dumpable() -> bool:
    """Whether this process may dump core (prctl PR_GET_DUMPABLE)."""
    libc = _libc()
    return libc is None or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0
