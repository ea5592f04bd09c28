"""What a unit test may not do, enforced: open an IPv4 or IPv6 socket, start a process, or load
a PKCS#11 module.  ``tests/unit/conftest.py`` wraps every unit test in :meth:`UnitGuard.watching`.

Three layers, so that neither a swallowed exception nor C code gets past:

* an audit hook (``sys.addaudithook``) refuses, before it happens, every ``socket`` created,
  bound, connected or sent to in the ``AF_INET``/``AF_INET6`` families (asyncio's ``AF_UNIX``
  self-pipe stays allowed), every new process (``subprocess.Popen``, ``os.fork``, ``os.exec*``,
  ``os.posix_spawn``, ``os.system``, ``os.spawn*``) and every ``ctypes`` load of a file that
  exports ``C_GetFunctionList`` (what makes a shared object a PKCS#11 module);
* python-pkcs11's ``pkcs11.lib()`` is replaced while a test runs, so that it refuses to load;
* after the test, any shared object newly mapped into the process that exports
  ``C_GetFunctionList`` (python-pkcs11 loads its module with its own ``dlopen``), and any IPv4
  or IPv6 socket newly open in it (one made in C, out of the audit hook's sight), is a violation.

Each violation raises :class:`GuardViolation` where it happens and is recorded as well, so the
test fails at teardown even if it caught the exception.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

PKCS11_ENTRY = b"C_GetFunctionList"
_INET = (socket.AF_INET, socket.AF_INET6)
_PROCESS_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "pty.spawn",
    }
)
_ADDRESS_EVENTS = frozenset({"socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"})
_NET_TABLES = ("tcp", "tcp6", "udp", "udp6")


class GuardViolation(RuntimeError):
    """A unit test did what only an integration test may do."""


def exports_symbol(path: str | os.PathLike[str], name: bytes = PKCS11_ENTRY) -> bool:
    """Whether the ELF shared object at *path* defines the dynamic symbol *name* (False for
    anything that is not a readable ELF file)."""
    try:
        with open(path, "rb") as f:
            return _elf_defines(f, name)
    except (OSError, struct.error, ValueError):
        return False


def _elf_defines(f: Any, name: bytes) -> bool:
    ident = f.read(16)
    if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return False
    wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
    f.seek(0x28 if wide else 0x20)
    (shoff,) = struct.unpack(order + ("Q" if wide else "I"), f.read(8 if wide else 4))
    f.seek(0x3A if wide else 0x2E)
    shentsize, shnum = struct.unpack(order + "HH", f.read(4))
    section = order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
    headers = []
    for i in range(shnum):
        f.seek(shoff + i * shentsize)
        headers.append(struct.unpack(section, f.read(struct.calcsize(section))))
    for _, sh_type, _, _, offset, size, link, _, _, entsize in headers:
        if sh_type != 11 or not entsize:  # SHT_DYNSYM
            continue
        f.seek(headers[link][4])
        strings = f.read(headers[link][5])
        f.seek(offset)
        table = f.read(size)
        for start in range(0, size - entsize + 1, entsize):
            # st_name, then (64-bit) st_info, st_other or (32-bit) st_value, st_size, st_info,
            # st_other, then st_shndx: 0 for a symbol the object uses but does not define.
            layout = order + ("I2xH" if wide else "I10xH")
            st_name, st_shndx = struct.unpack_from(layout, table, start)
            if st_shndx and strings[st_name : st_name + len(name) + 1] == name + b"\0":
                return True
    return False


def mapped_files(maps: str | None = None) -> set[str]:
    """The files mapped into this process (the text of /proc/self/maps, or *maps*)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    found = set()
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            found.add(parts[5].removesuffix(" (deleted)"))
    return found


def pkcs11_modules(paths: Iterable[str]) -> list[str]:
    """Those of *paths* that are PKCS#11 modules."""
    return sorted(p for p in paths if exports_symbol(p))


def socket_inodes(fd_dir: str = "/proc/self/fd") -> set[int]:
    """The inodes of the sockets this process has open."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def inet_inodes(tables: Iterable[str] | None = None) -> set[int]:
    """The inodes of IPv4 and IPv6 sockets in /proc/net/{tcp,tcp6,udp,udp6} (or in *tables*,
    texts in that format)."""
    if tables is None:
        texts = []
        for name in _NET_TABLES:
            with contextlib.suppress(OSError):
                texts.append(Path("/proc/net", name).read_text())
        tables = texts
    found = set()
    for text in tables:
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9].isdigit():
                found.add(int(fields[9]))
    return found


class UnitGuard:
    """Watches one test at a time; see the module's documentation."""

    _stack: ClassVar[list[UnitGuard]] = []  # the innermost watching guard hears the events
    _hooked: ClassVar[bool] = False

    def __init__(self) -> None:
        self.violations: list[str] = []

    @classmethod
    def _install(cls) -> None:
        if not cls._hooked:
            sys.addaudithook(cls._dispatch)
            cls._hooked = True

    @classmethod
    def _dispatch(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls._stack:
            cls._stack[-1]._audit(event, args)

    def _refuse(self, what: str) -> None:
        self.violations.append(what)
        raise GuardViolation(f"a unit test may not {what} (tests/unit: see docs/testing.md)")

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.__new__":
            if len(args) > 1 and args[1] in _INET:
                self._refuse(f"open an {socket.AddressFamily(args[1]).name} socket")
        elif event in _ADDRESS_EVENTS:
            if len(args) > 1 and isinstance(args[1], tuple):
                self._refuse(f"use a network address ({event} {args[1]!r})")
        elif event in _PROCESS_EVENTS:
            self._refuse(f"start a process ({event} {_first(args)!r})")
        elif event == "ctypes.dlopen" and args and _is_path(args[0]) and exports_symbol(args[0]):
            self._refuse(f"load a PKCS#11 module ({args[0]})")

    def _refusing_lib(self, so: str, *args: Any, **kwargs: Any) -> Any:
        self._refuse(f"load a PKCS#11 module (pkcs11.lib({so!r}))")

    @contextlib.contextmanager
    def watching(self) -> Iterator[UnitGuard]:
        """Refuse what a unit test may not do until the block ends, then check what got past;
        GuardViolation at the end if anything was refused or found."""
        import pkcs11  # loads python-pkcs11's extension only, never a PKCS#11 module

        self._install()
        mapped, sockets = mapped_files(), socket_inodes()
        real_lib = pkcs11.lib
        pkcs11.lib = self._refusing_lib
        self._stack.append(self)
        try:
            yield self
        finally:
            self._stack.remove(self)
            pkcs11.lib = real_lib
        for path in pkcs11_modules(mapped_files() - mapped):
            self.violations.append(f"load a PKCS#11 module ({path} is mapped)")
        new = socket_inodes() - sockets
        if new and (leaked := new & inet_inodes()):
            self.violations.append(f"open an IPv4 or IPv6 socket ({len(leaked)} left open)")
        if self.violations:
            raise GuardViolation(
                "a unit test may not " + "; nor ".join(dict.fromkeys(self.violations))
            )


def _is_path(name: object) -> bool:
    return isinstance(name, str) and os.sep in name


def _first(args: tuple[Any, ...]) -> Any:
    return args[0] if args else None
