"""Test helpers for the fault-injection PKCS#11 module, kept under the names the tests use.

The module's sources and helpers live in :mod:`xksproxy.dev.faultinject` (so that ``xksproxy
dev-setup --fault-injection`` can build it from an installed package); see the README there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from xksproxy.dev.faultinject import (
    CFLAGS,
    CONF_NAME,
    DEFAULT_PROFILE,
    ENV_CONTROL,
    ENV_REAL_MODULE,
    FAULT_HEADER,
    FAULT_LIBRARY_NAME,
    FAULT_SOURCE,
    FAULT_SOURCE_DIR,
    LDLIBS,
    FaultControl,
    FaultModuleBuildError,
    build_fault_module,
    ckr_names,
    faultable_functions,
    install_copy,
)

__all__ = [
    "CFLAGS",
    "CONF_NAME",
    "ENV_CONTROL",
    "ENV_REAL_MODULE",
    "FAULT_HEADER",
    "FAULT_LIBRARY_NAME",
    "FAULT_SOURCE",
    "FAULT_SOURCE_DIR",
    "LDLIBS",
    "FaultControl",
    "FaultModuleBuildError",
    "build_fault_module",
    "ckr_names",
    "faultable_functions",
    "init_token",
    "install_copy",
    "restore_environment_at_exit",
    "softhsm_copy",
]

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")


def init_token(label: str, so_pin: str, pin: str, home: Path) -> Path:
    """A SoftHSM configuration with its own token directory under *home*, and a token labelled
    *label* made in it; returns the configuration file."""
    tokens = home / "tokens"
    tokens.mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--so-pin", so_pin, "--pin", pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return conf


def restore_environment_at_exit(stack: ExitStack, names: Iterable[str]) -> None:
    """Put these environment variables back as they are now when *stack* closes.

    The shim and SoftHSM read them when loaded and initialised; subprocesses started by other
    tests must not inherit them."""
    saved = {name: os.environ.get(name) for name in names}

    @stack.callback
    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def softhsm_copy(
    built: Path,
    home: Path,
    control_file: Path,
    token: tuple[str, str, str],
    profile: str = DEFAULT_PROFILE,
) -> tuple[Path, Path, FaultControl]:
    """A copy of SoftHSM in *home* with a token of its own (*token*: label, SO PIN, user PIN),
    behind a copy of the module built in *built* that obeys *control_file* (set to "ok") and
    behaves as *profile*; returns the module copy to load, the SoftHSM configuration to set in
    SOFTHSM2_CONF when loading it, and the control."""
    conf = init_token(*token, home)
    real = home / "libsofthsm2.so"
    shutil.copy2(SOFTHSM, real)
    control = FaultControl(control_file)
    control.ok()
    so = install_copy(built, home, real_module=real, control=control.path, profile=profile)
    return so, conf, control
