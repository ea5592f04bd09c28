"""The fault-injection PKCS#11 module: building it, configuring a copy, and its control file.

The C sources ship in this package (``xks_fault_pkcs11.c``, ``pkcs11_min.h``; see README.md
here), so ``xksproxy dev-setup --fault-injection`` can build the module with the system C
compiler wherever xksproxy is installed, and the tests build the same file.

``build_fault_module`` compiles it; ``install_copy`` puts a copy of the ``.so`` in a directory
with its own ``xksfault.conf`` (the real module it forwards to, its control file, its vendor
profile), so several copies in one process each forward to their own module, obey their own
control file and behave as their own vendor's HSM; ``FaultControl`` writes a control file.

A vendor profile (``PROFILES``) makes a copy behave, for single-part ``CKM_AES_GCM``, as that
vendor's PKCS#11 library does in front of SoftHSM (who makes the IV and where it comes back);
``VENDOR_OF_PROFILE`` gives the proxy's ``vendor`` setting that matches each profile.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

FAULT_SOURCE_DIR = Path(__file__).resolve().parent
FAULT_SOURCE = FAULT_SOURCE_DIR / "xks_fault_pkcs11.c"
FAULT_HEADER = FAULT_SOURCE_DIR / "pkcs11_min.h"
FAULT_LIBRARY_NAME = "libxksfault.so"
#: The per-copy configuration file, looked for beside the module's own ``.so``.
CONF_NAME = "xksfault.conf"

# The flags of the Makefile here; the module must build warning-free with them.
CFLAGS = ("-O2", "-Wall", "-Wextra", "-fPIC", "-shared")
LDLIBS = ("-ldl", "-lpthread")

#: Environment variable naming the real module, used only when there is no xksfault.conf.
ENV_REAL_MODULE = "XKS_FAULT_REAL_MODULE"
#: Environment variable naming the control file, used only when there is no xksfault.conf.
ENV_CONTROL = "XKS_FAULT_CONTROL"
#: Environment variable naming the vendor profile, used only when there is no xksfault.conf.
ENV_PROFILE = "XKS_FAULT_PROFILE"

#: The vendor profiles of the module (``profile = NAME`` in xksfault.conf; README.md, "Vendor
#: profiles").  "softhsm", the default, forwards everything unchanged; "lost-iv" is no vendor
#: but a broken HSM that never returns the IV it made.
PROFILES: tuple[str, ...] = (
    "softhsm",
    "cloudhsm",
    "luna-fips",
    "luna",
    "nshield",
    "protectserver-fips",
    "lost-iv",
)
#: The default profile: SoftHSM as it is.
DEFAULT_PROFILE = "softhsm"
#: The proxy's ``vendor`` setting for an HSM behind a copy with each profile.
VENDOR_OF_PROFILE: dict[str, str] = {
    "softhsm": "softhsm",
    "cloudhsm": "cloudhsm",
    "luna-fips": "luna",
    "luna": "luna",
    "nshield": "nshield",
    "protectserver-fips": "protectserver",
    "lost-iv": "softhsm",
}

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


def copy_file(source: Path, target: Path) -> bool:
    """Copy *source* to *target* unless it holds the same bytes already; True if copied.

    Written under a temporary name and renamed into place: a process that has the old file
    mapped keeps it, and nobody sees a half-written library.
    """
    data = source.read_bytes()
    if target.exists() and target.read_bytes() == data:
        return False
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return True


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(
            f"unknown fault-injection profile {profile!r} (expected one of {', '.join(PROFILES)})"
        )


def conf_text(
    real_module: Path,
    control: Path | None,
    profile: str = DEFAULT_PROFILE,
    token_clock: Path | None = None,
) -> str:
    """The content of an ``xksfault.conf``; the ``profile`` line only when not the default,
    the ``token_clock`` line only when given.

    Raises :class:`ValueError` for a profile that is not in :data:`PROFILES`.
    """
    _check_profile(profile)
    lines = ["# The fault-injection module beside this file reads it (README.md of the module).\n"]
    lines.append(f"real_module = {real_module}\n")
    if control is not None:
        lines.append(f"control = {control}\n")
    if token_clock is not None:
        lines.append(f"token_clock = {token_clock}\n")
    if profile != DEFAULT_PROFILE:
        lines.append(f"profile = {profile}\n")
    return "".join(lines)


def set_token_clock(path: Path, offset_seconds: int | None) -> None:
    """Set the token clock that ``token_clock = PATH`` gives an HSM: this host's clock plus
    *offset_seconds*, or no clock on the token (None).  Replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("off\n" if offset_seconds is None else f"{offset_seconds}\n")
    os.replace(tmp, path)


def install_copy(
    built: Path,
    directory: Path,
    *,
    real_module: Path,
    control: Path | None,
    profile: str = DEFAULT_PROFILE,
    token_clock: Path | None = None,
) -> Path:
    """A copy of the built module in *directory*, with its own ``xksfault.conf``.

    The copy forwards to *real_module*, obeys *control*, behaves as *profile* (one of
    :data:`PROFILES`) and, with *token_clock*, reports a clock on the token set by that file
    (:func:`set_token_clock`), whatever the process environment says.  Existing files are rewritten
    only if their content would change.  Raises :class:`ValueError` for an unknown profile,
    before writing anything.
    """
    _check_profile(profile)
    directory.mkdir(parents=True, exist_ok=True)
    so = directory / FAULT_LIBRARY_NAME
    copy_file(built, so)
    conf = directory / CONF_NAME
    text = conf_text(real_module, control, profile, token_clock)
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return so


@functools.cache
def ckr_names() -> frozenset[str]:
    """The ``CKR_*`` names that the module's control file accepts (read from its source)."""
    text = FAULT_SOURCE.read_text(encoding="utf-8")
    return frozenset(re.findall(r'\{"(CKR_[A-Z0-9_]+)", 0x[0-9A-F]+UL\}', text))


@functools.cache
def faultable_functions() -> frozenset[str]:
    """The ``C_*`` functions that obey the control file (read from the module's source)."""
    text = FAULT_SOURCE.read_text(encoding="utf-8")
    return frozenset(re.findall(r"\[XKS_FN_(C_\w+)\] = 1,", text))


class FaultControl:
    """The control file of the fault-injection module.

    Every write replaces the file atomically (temporary file in the same directory, then
    ``os.replace``), and gives it a modification time strictly later than the previous
    version's, so the module, which re-reads the file only when its inode, size or times
    change, can never mistake a new version for an old one.

    *functions* (for example ``["C_UnwrapKey"]``) limits a mode to those functions; the others
    are forwarded normally.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def ok(self) -> None:
        """Forward every call normally."""
        self._write("ok")

    def error(self, name: str | int, functions: Sequence[str] = ()) -> None:
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
        self._write(f"error {code}", functions)

    def slow(self, ms: int, functions: Sequence[str] = ()) -> None:
        """Delay each faultable call by *ms* milliseconds, then forward it."""
        if isinstance(ms, bool) or not 0 <= ms <= _MAX_SLOW_MS:
            raise ValueError(f"slow needs 0..{_MAX_SLOW_MS} milliseconds, not {ms!r}")
        self._write(f"slow {ms}", functions)

    def hang(self, functions: Sequence[str] = ()) -> None:
        """Block each faultable call until the mode changes."""
        self._write("hang", functions)

    def read(self) -> str:
        """The current control line ("ok" if the file is missing or empty)."""
        try:
            line = self.path.read_text(encoding="ascii").partition("\n")[0].strip()
        except FileNotFoundError:
            return "ok"
        return line or "ok"

    def _write(self, line: str, functions: Sequence[str] = ()) -> None:
        unknown = sorted(set(functions) - faultable_functions())
        if unknown:
            raise ValueError(f"not faultable functions of the module: {', '.join(unknown)}")
        if functions:
            line = " ".join((line, *functions))
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
