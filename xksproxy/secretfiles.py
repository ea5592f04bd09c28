"""Reading files that hold secrets (PINs, SigV4 credentials, the audit-chain key) safely.

A secret file must be a regular file (a FIFO or a device would block or never end; it is
opened without blocking and checked before anything is read), at most :data:`MAX_SECRET_BYTES`,
and readable by its owner alone, as ssh requires of a private key: a file group or others can
read is refused, with the ``chmod`` that mends it.  For a service user that does not own the
file, systemd's ``LoadCredential=`` hands the service a copy only it can read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_SECRET_BYTES = 1 << 20  # a credentials file of hundreds of prefixes fits many times over


class SecretFileError(Exception):
    """Why a secret file cannot be used: a sentence for the operator, without the secret."""


def mode_problem(mode: int, path: Path) -> str | None:
    """Why a file of *mode* may not hold a secret, or None."""
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        return f"{path} is {kind}"
    if mode & 0o044:
        who = "group and others" if mode & 0o044 == 0o044 else "group" if mode & 0o040 else "others"
        return (
            f"{path} is readable by {who} (mode {stat.S_IMODE(mode):04o}): a secret must be"
            f" readable by its owner only (chmod 600 {path})"
        )
    return None


def check_secret_file(path: Path) -> None:
    """SecretFileError unless *path* is a regular file only its owner can read (for files
    another library opens itself, such as the TLS private key)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    problem = mode_problem(mode, path)
    if problem is not None:
        raise SecretFileError(problem)


def read_secret_bytes(path: Path) -> bytes:
    """The content of the secret file *path*; FileNotFoundError if it is missing,
    SecretFileError for anything else that is wrong with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        problem = mode_problem(st.st_mode, path)
        if problem is None and st.st_size > MAX_SECRET_BYTES:
            problem = f"{path} is larger than {MAX_SECRET_BYTES} bytes"
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise SecretFileError(problem)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_BYTES} bytes")
    return data


def read_secret_text(path: Path) -> str:
    """As :func:`read_secret_bytes`, decoded as UTF-8 (SecretFileError if it is not)."""
    try:
        return read_secret_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
