"""The guard every unit test runs under (tests/support/unit_guard.py) trips on what a unit test
may not do, even when the test catches the exception, and lets through what it may."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest

from tests.support.unit_guard import (
    GuardViolation,
    UnitGuard,
    exports_symbol,
    inet_inodes,
    mapped_files,
    pkcs11_modules,
)

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
needs_softhsm = pytest.mark.skipif(not SOFTHSM.exists(), reason="SoftHSM is not installed")


def test_an_inet_socket_is_refused_before_it_exists() -> None:
    guard = UnitGuard()
    with pytest.raises(GuardViolation, match="AF_INET socket"), guard.watching():
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert guard.violations == ["open an AF_INET socket"]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_caught_violation_still_fails_the_test(family: socket.AddressFamily) -> None:
    guard = UnitGuard()
    refused = pytest.raises(GuardViolation, match="may not open an AF_INET")
    # The block swallows the exception, as a careless test might: the guard still fails it.
    with refused, guard.watching(), contextlib.suppress(Exception):
        socket.socket(family, socket.SOCK_DGRAM)
    assert len(guard.violations) == 1


def test_a_connection_to_a_network_address_is_refused() -> None:
    with pytest.raises(GuardViolation, match="may not"), UnitGuard().watching():
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_local_sockets_and_event_loops_are_allowed(tmp_path: Path) -> None:
    with UnitGuard().watching() as guard:
        a, b = socket.socketpair()  # asyncio's self-pipe
        with a, b:
            a.sendall(b"x")
            assert b.recv(1) == b"x"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
            unix.bind(str(tmp_path / "s"))
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(asyncio.sleep(0, "done")) == "done"
        finally:
            loop.close()
    assert guard.violations == []


def test_a_subprocess_is_refused_before_it_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(GuardViolation, match="start a process"), UnitGuard().watching():
        subprocess.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], check=False)
    assert not marker.exists()


def test_fork_and_exec_are_refused() -> None:
    guard = UnitGuard()
    with pytest.raises(GuardViolation), guard.watching():
        with contextlib.suppress(GuardViolation):
            os.fork()  # refused by the audit hook: no child is ever made
        os.system("true")
    assert [v.split(" (")[0] for v in guard.violations] == ["start a process"] * 2


def test_python_pkcs11_may_not_load_a_module() -> None:
    before = pkcs11.lib  # this test's own guard has it already
    with pytest.raises(GuardViolation, match="PKCS#11 module"), UnitGuard().watching():
        pkcs11.lib("/nonexistent/libsomething-pkcs11.so")
    assert pkcs11.lib is before  # put back


@needs_softhsm
def test_ctypes_may_not_load_a_pkcs11_module_but_other_libraries() -> None:
    with UnitGuard().watching():
        ctypes.CDLL("libc.so.6")
        ctypes.CDLL(None)
    with pytest.raises(GuardViolation, match="PKCS#11 module"), UnitGuard().watching():
        ctypes.CDLL(str(SOFTHSM))
    assert str(SOFTHSM) not in mapped_files()  # refused before it was loaded


@needs_softhsm
def test_a_pkcs11_module_is_told_by_its_exports() -> None:
    assert exports_symbol(SOFTHSM)
    assert not exports_symbol(sys.executable)
    assert not exports_symbol(Path(pkcs11.__file__))  # python-pkcs11 itself
    assert pkcs11_modules([str(SOFTHSM), sys.executable, "/nonexistent"]) == [str(SOFTHSM)]


def test_maps_and_proc_net_are_read() -> None:
    maps = (
        "7f0000000000-7f0000001000 r-xp 00000000 08:01 42   /usr/lib/libx.so (deleted)\n"
        "7f0000001000-7f0000002000 rw-p 00000000 00:00 0    [heap]\n"
    )
    assert mapped_files(maps) == {"/usr/lib/libx.so"}
    assert Path(sys.executable).resolve().as_posix() in mapped_files()
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
        "  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
        "        0 31337 1 0000000000000000 100 0 0 10 0\n"
    )
    assert inet_inodes([tcp]) == {31337}


def test_the_guard_is_on_for_this_very_test(unit_guard: UnitGuard) -> None:
    with pytest.raises(GuardViolation):
        socket.socket()
    unit_guard.violations.clear()  # this one was on purpose: let the test pass
