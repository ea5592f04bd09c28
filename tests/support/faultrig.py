"""A proxy on SoftHSM behind the fault-injection module (xksproxy/dev/faultinject/), started:
the test tells the module to fail, slow down or hang."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.faultlib import FaultControl, build_fault_module
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import XksClient

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass
class FaultRig:
    rig: Rig
    server: Server
    control: FaultControl
    client: XksClient

    def health_state(self) -> str:
        state: str = self.client.health().json["ekmFleetDetails"][0]["healthStatus"]
        return state


@contextlib.contextmanager
def started_fault_rig(base: Path, max_pool_size: int) -> Iterator[FaultRig]:
    """One worker with 2 sessions (growing to *max_pool_size*) on SoftHSM behind the
    fault-injection module; stopped at exit."""
    module = build_fault_module(base / "build")
    control = FaultControl(base / "faults" / "softhsm-1")
    control.ok()
    hsm = {
        "module": str(module),
        "pool_size": 2,
        "max_pool_size": max_pool_size,
        "key_cache_ttl_seconds": 3600,
        "env": {"XKS_FAULT_REAL_MODULE": SOFTHSM, "XKS_FAULT_CONTROL": str(control.path)},
    }
    # One worker: the pool-exhaustion cases count sessions of one process.
    settings = {"server": {"workers": 1}, "health": {"interval_seconds": 0.5}, "hsms": hsm}
    rig = make_rig(base / "rig", settings=settings)
    server = start_server(rig.config, rig.port, base / "proxy.log")
    client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
    try:
        yield FaultRig(rig, server, control, client)
    finally:
        control.ok()
        stop_server(server)
