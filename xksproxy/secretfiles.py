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


MAX_FILE_BYTES = 1 << 20  # a configuration, policy or certificate file: far more than any needs


class SecretFileError(Exception):
    """Why a secret file cannot be used: a sentence for the operator, without the secret."""


def not_regular(mode: int) -> str | None:
    """Why a file of *mode* is no regular file to read (a FIFO blocks, a device never ends),
    as the end of a sentence naming it; None if it is one."""
    if stat.S_ISREG(mode):
        return None
    return "is a directory, not a file" if stat.S_ISDIR(mode) else "is not a regular file"


def kind_problem(mode: int, path: Path) -> str | None:
    why = not_regular(mode)
    return None if why is None else f"{path} {why}"


def check_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> None:
    """SecretFileError unless *path* is a regular file of at most *max_bytes* (for files a
    library opens itself: certificates and CA bundles)."""
    _check_stat(path, max_bytes, secret=False)


def _check_stat(path: Path, max_bytes: int, *, secret: bool) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecretFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    problem = (mode_problem if secret else kind_problem)(st.st_mode, path)
    if problem is None and st.st_size > max_bytes:
        problem = f"{path} is larger than {max_bytes} bytes"
    if problem is not None:
        raise SecretFileError(problem)


def read_regular_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The content of *path*, a regular file of at most *max_bytes*, opened without blocking
    and checked before anything is read; FileNotFoundError if it is missing, SecretFileError
    for anything else."""
    return _read_checked(path, max_bytes, secret=False)


def mode_problem(mode: int, path: Path) -> str | None:
    """Why a file of *mode* may not hold a secret, or None."""
    kind = kind_problem(mode, path)
    if kind is not None:
        return kind
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
    _check_stat(path, MAX_SECRET_BYTES, secret=True)


def read_secret_bytes(path: Path) -> bytes:
    """The content of the secret file *path*; FileNotFoundError if it is missing,
    SecretFileError for anything else that is wrong with it."""
    return _read_checked(path, MAX_SECRET_BYTES, secret=True)


def _read_checked(path: Path, max_bytes: int, *, secret: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        problem = (mode_problem if secret else kind_problem)(st.st_mode, path)
        if problem is None and st.st_size > max_bytes:
            problem = f"{path} is larger than {max_bytes} bytes"
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise SecretFileError(problem)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SecretFileError(f"{path} is larger than {max_bytes} bytes")
    return data


def read_secret_text(path: Path) -> str:
    """As :func:`read_secret_bytes`, decoded as UTF-8 (SecretFileError if it is not)."""
    try:
        return read_secret_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
