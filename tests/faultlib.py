"""Test helpers for the fault-injection PKCS#11 module, kept under the names the tests use.

The module's sources and helpers live in :mod:`xksproxy.faultinject` (so that ``xksproxy
dev-setup --fault-injection`` can build it from an installed package); see the README there.
"""

from __future__ import annotations

from xksproxy.faultinject import (
    CFLAGS,
    CONF_NAME,
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
    "install_copy",
]
