"""HSM faults injected at the PKCS#11 boundary (xksproxy/dev/faultinject/), against a real
proxy process.

The proxy runs unmodified, with its HSM's module set to the fault-injection module, which
forwards to SoftHSM until the test tells it to fail, slow down or hang.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import assert_error, b64
from tests.support.faultrig import FaultRig
from tests.support.metrics import scrape, value
from tests.support.waiting import wait_for
from tests.support.xks_client import Response, decrypt_fields


@pytest.fixture
def faults(fault_rig: FaultRig) -> Iterator[FaultRig]:
    """Each test starts healthy and leaves the HSM healthy."""
    fault_rig.control.ok()
    wait_for(
        lambda: fault_rig.client.encrypt("foo", plaintext=b64(b"x")).status == 200,
        "the HSM serves again",
    )
    wait_for(lambda: fault_rig.health_state() == "ACTIVE", "health reports ACTIVE")
    yield fault_rig
    fault_rig.control.ok()


def test_serves_through_the_fault_module(faults: FaultRig) -> None:
    enc = faults.client.encrypt("foo", plaintext=b64(b"hello"))
    assert enc.status == 200
    assert faults.client.decrypt("foo", **decrypt_fields(enc.json)).json == {
        "plaintext": b64(b"hello")
    }
    assert faults.health_state() == "ACTIVE"


def test_hung_hsm_answers_503_within_the_deadline_and_recovers(faults: FaultRig) -> None:
    faults.control.hang()
    started = time.monotonic()
    resp = faults.client.encrypt("foo", plaintext=b64(b"x"))
    assert time.monotonic() - started < 5  # a bound against hanging, not a speed claim
    assert_error(resp, 503, "DependencyTimeoutException")
    # Further requests are answered too (no hang), with 503 while sessions are stuck.
    for _ in range(5):
        assert faults.client.encrypt("foo", plaintext=b64(b"x")).status == 503
    wait_for(lambda: faults.health_state() == "UNAVAILABLE", "health reports UNAVAILABLE")
    assert faults.client.raw("GET", "/ping").status == 503
    faults.control.ok()
    wait_for(
        lambda: faults.client.encrypt("foo", plaintext=b64(b"x")).status == 200,
        "requests succeed after the HSM recovers",
    )
    wait_for(lambda: faults.health_state() == "ACTIVE", "health reports ACTIVE again")
    assert faults.client.raw("GET", "/ping").status == 200


def test_device_error_is_500_then_the_token_is_reopened(faults: FaultRig) -> None:
    faults.control.error("CKR_DEVICE_ERROR")
    resp = faults.client.encrypt("foo", plaintext=b64(b"x"))
    assert_error(resp, 500, "InternalException")
    wait_for(lambda: faults.health_state() == "UNAVAILABLE", "health reports UNAVAILABLE")
    faults.control.ok()
    wait_for(
        lambda: faults.client.encrypt("foo", plaintext=b64(b"x")).status == 200,
        "requests succeed after the token is reopened",
    )
    wait_for(lambda: "hsm_reopen" in faults.server.log_text(), "the proxy reopened the token")
    # Requests may succeed on surviving sessions before the next probe round reports ACTIVE.
    wait_for(lambda: faults.health_state() == "ACTIVE", "health reports ACTIVE again")


@pytest.mark.parametrize(
    "ckr", ["CKR_SESSION_HANDLE_INVALID", "CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED"]
)
def test_hsm_errors_on_encrypt_are_500_not_caller_errors(faults: FaultRig, ckr: str) -> None:
    faults.control.error(ckr)
    assert_error(faults.client.encrypt("foo", plaintext=b64(b"x")), 500, "InternalException")


def test_exhausted_pool_throttles_and_nothing_hangs(faults: FaultRig) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        # Warm every session first: its first use of a key finds the key (3 more calls), which
        # slowed down would overrun the call time limit (503) rather than exhaust the pool.
        warm = list(pool.map(lambda _: faults.client.encrypt("foo", plaintext=b64(b"x")), range(8)))
        assert {r.status for r in warm} == {200}
    faults.control.slow(15)  # an encrypt is 3 PKCS#11 calls: ~45 ms on one of 2 sessions
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        started = time.monotonic()
        results: list[Response] = list(
            pool.map(lambda _: faults.client.encrypt("foo", plaintext=b64(b"x")), range(32))
        )
        elapsed = time.monotonic() - started
    statuses = sorted(r.status for r in results)
    assert elapsed < 10  # a bound against hanging, not a speed claim
    assert 429 in statuses, statuses
    assert set(statuses) <= {200, 429, 503}, statuses
    for r in results:
        if r.status == 429:
            assert_error(r, 429, "ThrottlingException")


def test_decrypt_of_tampered_data_on_a_healthy_hsm_is_still_a_caller_error(
    faults: FaultRig,
) -> None:
    enc = faults.client.encrypt("foo", plaintext=b64(os.urandom(16))).json
    fields = decrypt_fields(enc)
    fields["authenticationTag"] = b64(bytes(16))
    assert_error(faults.client.decrypt("foo", **fields), 400, "InvalidCiphertextException")


def test_proxy_process_survived(faults: FaultRig) -> None:
    assert faults.server.proc.poll() is None
    assert isinstance(faults.rig.dir, Path)


def test_pool_gauges_move_under_load(faults: FaultRig) -> None:
    faults.control.slow(10)  # calls take long enough to be seen busy by the 1 s sampler
    seen: list[float] = []

    def watch() -> None:
        for _ in range(30):
            _, _, samples = scrape(faults.rig.metrics_port)
            seen.append(value(samples, "xks_pool_sessions", hsm="softhsm-1", state="busy"))
            time.sleep(0.1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        watcher = pool.submit(watch)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            list(pool.map(lambda _: faults.client.encrypt("foo", plaintext=b64(b"x")), range(3)))
        watcher.result()
    assert max(seen) > 0, seen
    faults.control.ok()
    wait_for(
        lambda: value(scrape(faults.rig.metrics_port)[2], "xks_pool_sessions", state="busy") == 0,
        "busy sessions back to 0",
    )


def test_sigterm_stops_the_proxy_even_while_an_hsm_call_hangs(fault_rig: FaultRig) -> None:
    """Runs last in this module: it stops the module's proxy."""
    fault_rig.control.hang()
    try:
        assert fault_rig.client.encrypt("foo", plaintext=b64(b"x")).status == 503
        fault_rig.server.proc.send_signal(signal.SIGTERM)
        assert fault_rig.server.proc.wait(timeout=30) == 0
        assert "hsm_calls_still_hung_at_exit" in fault_rig.server.log_text()
    finally:
        fault_rig.control.ok()
