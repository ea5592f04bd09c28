"""Integration fixtures: a real SoftHSM rig made by the CLI, and a real proxy process serving it.

The test process itself never loads SoftHSM here (a PKCS#11 module is initialised once per
process, with one SOFTHSM2_CONF; test_faultinject.py and test_vendor_emulation.py are the
exceptions): rigs are made with ``xksproxy`` subprocesses (tests/support/rigs.py), and the proxy
runs as ``python -m xksproxy serve``, so these tests drive exactly what an operator runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faultrig import FaultRig, started_fault_rig
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import XksClient


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(tmp_path_factory.mktemp("rig"))


@pytest.fixture(scope="session")
def server(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(rig.config, rig.port, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(rig: Rig, server: Server) -> XksClient:
    return XksClient("127.0.0.1", server.port, rig.prefix, rig.akid, rig.secret, rig.region)


@pytest.fixture(scope="module")
def fault_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRig]:
    """One worker on SoftHSM behind the fault-injection module, per module that uses it.  A
    pool that cannot grow: the pool-exhaustion cases need its two sessions to run out."""
    with started_fault_rig(tmp_path_factory.mktemp("faults"), max_pool_size=2) as rig:
        yield rig
