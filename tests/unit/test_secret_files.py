"""Secret files (PINs, the SigV4 credentials file, the audit-chain key, the TLS private key):
regular files that only their owner can read, as ssh requires of a private key."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.support.files import write_secret
from xksproxy.secretfiles import (
    MAX_SECRET_BYTES,
    SecretFileError,
    check_secret_file,
    read_secret_bytes,
)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o620])
def test_a_file_only_its_owner_can_read_is_read(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "pin", "1234\n")
    path.chmod(mode)
    assert read_secret_bytes(path) == b"1234\n"
    check_secret_file(path)


@pytest.mark.parametrize(
    ("mode", "who"), [(0o644, "group and others"), (0o640, "group"), (0o604, "others")]
)
def test_a_file_group_or_others_can_read_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    path = write_secret(tmp_path / "pin", "1234\n")
    path.chmod(mode)
    for check in (read_secret_bytes, check_secret_file):
        with pytest.raises(SecretFileError) as info:
            check(path)
        assert f"readable by {who} (mode {mode:04o})" in str(info.value)
        assert f"chmod 600 {path}" in str(info.value)
        assert "1234" not in str(info.value)


def test_a_fifo_is_refused_at_once_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pin"
    os.mkfifo(fifo, 0o600)
    result: list[str] = []

    def read() -> None:
        try:
            read_secret_bytes(fifo)
        except SecretFileError as exc:
            result.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in result[0]


def test_a_device_and_a_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_bytes(Path("/dev/zero"))
    with pytest.raises(SecretFileError, match="is a directory"):
        read_secret_bytes(tmp_path)


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "credentials.json", "x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(SecretFileError, match="larger than"):
        read_secret_bytes(path)
