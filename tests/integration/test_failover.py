"""Failover drills against real SoftHSM instances behind the fault-injection module.

A rig made by ``xksproxy dev-setup DIR --hsms 2 --fault-injection`` (two independent SoftHSM
instances, each behind its own copy of the fault module), served by a real proxy process, under
concurrent signed load from this test.  The proxy runs unmodified.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.commands import hsm_tool
from tests.support.faultlib import FaultControl
from tests.support.metrics import scrape, value
from tests.support.proxies import Server, start_server, stop_server
from tests.support.rigs import dev_rig
from tests.support.waiting import wait_for
from tests.support.xks_client import XksClient, decrypt_fields, key_meta, sign

PROBE_INTERVAL = 1.0


@dataclass
class Drill:
    dir: Path
    server: Server
    client: XksClient
    faults: dict[str, FaultControl]
    metrics_port: int

    def states(self) -> dict[str, str]:
        details = self.client.health().json["ekmFleetDetails"]
        return {d["id"]: d["healthStatus"] for d in details}


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    base = tmp_path_factory.mktemp("drill")
    settings = {
        "health": {"interval_seconds": PROBE_INTERVAL},
        "server": {"workers": 2},  # whatever the CPU count
    }
    made = dev_rig(base / "rig", "--hsms", "2", "--fault-injection", settings=settings)
    rig, cfg, port, metrics_port, kms = (
        made.dir,
        made.config,
        made.port,
        made.metrics_port,
        made.kms,
    )
    faults = {name: FaultControl(rig / "faults" / name) for name in ("softhsm-1", "softhsm-2")}
    server = start_server(cfg, port, base / "proxy.log")
    client = XksClient.from_kms(kms, port)
    d = Drill(rig, server, client, faults, metrics_port)
    wait_for(lambda: set(d.states().values()) == {"ACTIVE"}, "both HSMs ACTIVE", 15)
    yield d
    for f in faults.values():
        f.ok()
    stop_server(server)


@pytest.fixture
def healthy(drill: Drill) -> Drill:
    for f in drill.faults.values():
        f.ok()
    wait_for(lambda: set(drill.states().values()) == {"ACTIVE"}, "both HSMs ACTIVE", 20)
    return drill


@dataclass
class Load:
    """Paced, mixed encrypt/decrypt load; records every outcome."""

    drill: Drill
    rate: float = 250.0
    workers: int = 16
    statuses: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    async def run(self, seconds: float) -> None:
        c = self.drill.client
        url = c.url(c.base + "/keys/foo/encrypt")
        durl = c.url(c.base + "/keys/foo/decrypt")
        interval = self.workers / self.rate
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def post(target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                raw = json.dumps(body).encode()
                headers = sign("POST", target, raw, c.akid, c.secret, region=c.region)
                async with session.post(target, data=raw, headers=headers) as resp:
                    return resp.status, await resp.json(content_type=None)

            async def worker() -> None:
                nxt = time.monotonic()
                while time.monotonic() < stop:
                    plaintext = base64.b64encode(os.urandom(32)).decode()
                    enc_body = {
                        "requestMetadata": key_meta("Encrypt"),
                        "plaintext": plaintext,
                        "encryptionAlgorithm": "AES_GCM",
                    }
                    status, enc = await post(url, enc_body)
                    self.sent += 1
                    self.statuses[f"encrypt {status} {enc.get('errorName', '')}"] += 1
                    if status == 200:
                        dec_body = {
                            "requestMetadata": key_meta("Decrypt"),
                            "encryptionAlgorithm": "AES_GCM",
                            **decrypt_fields(enc),
                        }
                        status, dec = await post(durl, dec_body)
                        self.sent += 1
                        ok = status == 200 and dec.get("plaintext") == plaintext
                        self.statuses[f"decrypt {status} {dec.get('errorName', '')}"] += 1
                        if status == 200 and not ok:
                            self.statuses["decrypt returned a wrong plaintext"] += 1
                    nxt += interval
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()))

            await asyncio.gather(*(worker() for _ in range(self.workers)))

    def failures(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items() if " 200 " not in k}


async def test_hang_then_device_error_then_recovery_loses_no_request(healthy: Drill) -> None:
    d = healthy
    load = Load(d)
    task = asyncio.create_task(load.run(14))
    loop = asyncio.get_running_loop()

    async def until(cond: Callable[[], bool], what: str, timeout: float) -> float:
        return await loop.run_in_executor(None, wait_for, cond, what, timeout)

    await asyncio.sleep(2)
    d.faults["softhsm-1"].hang()
    took = await until(
        lambda: d.states()["softhsm-1"] == "UNAVAILABLE", "HSM 1 UNAVAILABLE", PROBE_INTERVAL + 3
    )
    assert d.states()["softhsm-2"] == "ACTIVE"
    await asyncio.sleep(2)
    d.faults["softhsm-1"].error("CKR_DEVICE_ERROR")
    await asyncio.sleep(2)
    d.faults["softhsm-1"].ok()
    await until(lambda: d.states()["softhsm-1"] == "ACTIVE", "HSM 1 ACTIVE again", 10)
    await task
    assert load.failures() == {}, load.statuses
    assert load.sent >= 2000, load.statuses  # >= 200 requests/s for >= 10 s
    print(f"UNAVAILABLE after {took:.2f} s; {dict(load.statuses)}", file=sys.stderr)
    # HSM 1 serves again, on sessions recovered without a restart.
    calls = {"hsm": "softhsm-1", "call": "encrypt"}
    before = value(scrape(d.metrics_port)[2], "xks_hsm_call_duration_seconds_count", **calls)
    for _ in range(20):
        assert d.client.encrypt("foo", plaintext=base64.b64encode(b"x").decode()).status == 200
    after = value(scrape(d.metrics_port)[2], "xks_hsm_call_duration_seconds_count", **calls)
    assert after > before
    assert d.server.proc.poll() is None


async def test_all_hsms_hung_answers_every_request_within_its_deadline(healthy: Drill) -> None:
    d = healthy
    for f in d.faults.values():
        f.hang()
    try:
        for _ in range(10):
            started = time.monotonic()
            resp = d.client.encrypt("foo", plaintext=base64.b64encode(b"x").decode())
            assert time.monotonic() - started < 2  # a bound against hanging, not a speed claim
            assert resp.status in (500, 503), resp.body
        wait_for(lambda: set(d.states().values()) == {"UNAVAILABLE"}, "all UNAVAILABLE", 10)
        assert d.client.raw("GET", "/ping").status == 503
    finally:
        for f in d.faults.values():
            f.ok()


def test_a_differing_copy_is_never_served(healthy: Drill) -> None:
    """Key "split" has different material on each HSM (made on each alone, not replicated).
    Without a majority the first configured HSM's copy is the reference, so every ciphertext
    must come from HSM 1: all of them decrypt on HSM 1 alone, and none on HSM 2."""
    d = healthy
    cfg = str(d.dir / "xksproxy.toml")
    for hsm in ("softhsm-1", "softhsm-2"):
        hsm_tool("generate", cfg, hsm, "split")
    kcvs = {h: hsm_tool("kcv", cfg, h, "split").stdout for h in ("softhsm-1", "softhsm-2")}
    assert kcvs["softhsm-1"] != kcvs["softhsm-2"]
    blobs = []
    for _ in range(12):  # the router alternates between equally loaded HSMs
        enc = d.client.encrypt("split", plaintext=base64.b64encode(b"secret").decode())
        assert enc.status == 200, enc.body
        blobs.append(enc.json)
    for enc in blobs:
        dec = d.client.decrypt("split", **decrypt_fields(enc))
        assert dec.status == 200 and dec.json["plaintext"] == base64.b64encode(b"secret").decode()
    assert '"key_copy_mismatch"' in d.server.log_text()
    _, _, samples = scrape(d.metrics_port)
    assert value(samples, "xks_key_copy_mismatches_total", hsm="softhsm-2") >= 1
    assert value(samples, "xks_keys_excluded", hsm="softhsm-2") >= 1
    # With HSM 1 gone, the key is not served from the differing copy on HSM 2.
    d.faults["softhsm-1"].error("CKR_DEVICE_ERROR")
    try:
        resp = d.client.encrypt("split", plaintext=base64.b64encode(b"x").decode())
        assert resp.status != 200, resp.body
        assert d.client.encrypt("foo", plaintext=base64.b64encode(b"x").decode()).status == 200
    finally:
        d.faults["softhsm-1"].ok()
