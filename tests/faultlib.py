"""Test helpers for the fault-injection PKCS#11 module (faultinject/).

``build_fault_module`` compiles ``faultinject/xks_fault_pkcs11.c`` with the system C compiler;
``FaultControl`` writes the module's control file.  See faultinject/README.md for the module.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAULT_SOURCE_DIR = REPO_ROOT / "faultinject"
FAULT_SOURCE = FAULT_SOURCE_DIR / "xks_fault_pkcs11.c"
FAULT_HEADER = FAULT_SOURCE_DIR / "pkcs11_min.h"
FAULT_LIBRARY_NAME = "libxksfault.so"

# The flags of faultinject/Makefile; the module must build warning-free with them.
CFLAGS = ("-O2", "-Wall", "-Wextra", "-fPIC", "-shared")
LDLIBS = ("-ldl", "-lpthread")

#: Environment variable naming the real PKCS#11 module the fault module forwards to.
ENV_REAL_MODULE = "XKS_FAULT_REAL_MODULE"
#: Environment variable naming the control file.
ENV_CONTROL = "XKS_FAULT_CONTROL"

_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)")
_MAX_SLOW_MS = 86_400_000  # the module's own limit (XKS_MAX_SLOW_MS)


class FaultModuleBuildError(RuntimeError):
    """The fault-injection module could not be compiled."""


def build_fault_module(out_dir: Path, *, compiler: str = "gcc") -> Path:
    """Compile the fault-injection module into *out_dir* and return the path of the ``.so``.

    Nothing is compiled if the library is newer than its sources.  The library is written under
    a temporary name and renamed into place, so concurrent builds never see a partial file.
    Raises :class:`FaultModuleBuildError` if the compiler is missing or the build fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / FAULT_LIBRARY_NAME
    sources_mtime = max(FAULT_SOURCE.stat().st_mtime_ns, FAULT_HEADER.stat().st_mtime_ns)
    if target.exists() and target.stat().st_mtime_ns >= sources_mtime:
        return target

    cc = shutil.which(compiler)
    if cc is None:
        raise FaultModuleBuildError(
            f"C compiler {compiler!r} not found on PATH: it is needed to build the "
            f"fault-injection PKCS#11 module from {FAULT_SOURCE}"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=".libxksfault-", suffix=".so", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [cc, *CFLAGS, "-o", str(tmp), str(FAULT_SOURCE), *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FaultModuleBuildError(
                f"building the fault-injection module failed ({proc.returncode}):\n"
                f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@functools.cache
def ckr_names() -> frozenset[str]:
    """The ``CKR_*`` names that the module's control file accepts (read from its source)."""
    text = FAULT_SOURCE.read_text(encoding="utf-8")
    return frozenset(re.findall(r'\{"(CKR_[A-Z0-9_]+)", 0x[0-9A-F]+UL\}', text))


class FaultControl:
    """The control file of the fault-injection module.

    Every write replaces the file atomically (temporary file in the same directory, then
    ``os.replace``), and gives it a modification time strictly later than the previous
    version's, so the module, which re-reads the file only when its inode, size or times
    change, can never mistake a new version for an old one.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def ok(self) -> None:
        """Forward every call normally."""
        self._write("ok")

    def error(self, name: str | int) -> None:
        """Fail the faultable calls with *name*: ``"CKR_DEVICE_ERROR"``, ``"0x30"`` or ``0x30``."""
        if isinstance(name, int):
            if not 0 <= name < 2**64:
                raise ValueError(f"CKR value out of range: {name}")
            code = f"{name:#x}"
        elif name.upper() in ckr_names():
            code = name.upper()
        elif _NUMBER.fullmatch(name):
            code = name
        else:
            raise ValueError(f"not a PKCS#11 v2.40 CKR_* name or a number: {name!r}")
        self._write(f"error {code}")

    def slow(self, ms: int) -> None:
        """Delay each faultable call by *ms* milliseconds, then forward it."""
        if isinstance(ms, bool) or not 0 <= ms <= _MAX_SLOW_MS:
            raise ValueError(f"slow needs 0..{_MAX_SLOW_MS} milliseconds, not {ms!r}")
        self._write(f"slow {ms}")

    def hang(self) -> None:
        """Block each faultable call until the mode changes."""
        self._write("hang")

    def read(self) -> str:
        """The current control line ("ok" if the file is missing or empty)."""
        try:
            line = self.path.read_text(encoding="ascii").partition("\n")[0].strip()
        except FileNotFoundError:
            return "ok"
        return line or "ok"

    def _write(self, line: str) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        try:
            previous_ns = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            previous_ns = 0
        stamp = max(time.time_ns(), previous_ns + 1)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as tmp:
                tmp.write(line + "\n")
            os.chmod(tmp_name, 0o644)
            os.utime(tmp_name, ns=(stamp, stamp))
            if os.stat(tmp_name).st_mtime_ns <= previous_ns:
                # A file system with coarse timestamps truncated it: move on a whole second.
                stamp = previous_ns + 1_000_000_000
                os.utime(tmp_name, ns=(stamp, stamp))
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
