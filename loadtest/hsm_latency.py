"""A network HSM on the rig: every data-path PKCS#11 call slowed by N ms for a run.

A rig made with ``xksproxy dev-setup DIR --fault-injection`` puts each HSM behind the fault-
injection module, whose control file (``DIR/faults/<hsm>``) can slow chosen calls.  For the run,
:func:`hsm_latency` writes ``slow N C_EncryptInit C_Encrypt C_DecryptInit C_Decrypt`` to every
HSM's control file (about what a Luna or nShield over a LAN costs a call: 1 ms; a WAN HSM: 5 ms),
and ``ok`` again afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from xksproxy.dev.faultinject import FaultControl

#: The calls an Encrypt or Decrypt makes (two each: the init and one data call).
DATA_CALLS = ("C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt")


def controls(rig: str | Path) -> list[FaultControl]:
    """The control files of a rig's HSMs; SystemExit if it was made without fault injection."""
    found = sorted((Path(rig) / "faults").glob("*"))
    files = [FaultControl(f) for f in found if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise SystemExit(
            f"{rig} has no fault-injection control files: make the rig with "
            "`xksproxy dev-setup DIR --fault-injection` to give its HSMs a latency"
        )
    return files


@contextlib.contextmanager
def hsm_latency(rig: str | Path, ms: int) -> Iterator[None]:
    """Within the block, every HSM of *rig* takes *ms* ms per data-path call (0: as it is)."""
    if not ms:
        yield
        return
    files = controls(rig)
    try:
        for control in files:
            control.slow(ms, DATA_CALLS)
        yield
    finally:
        for control in files:
            control.ok()
