"""Prometheus metrics (xksproxy.metrics): names, labels and bounds, in this process.  The
/metrics app over HTTP, and multiprocess mode with real processes:
tests/integration/test_metrics_exposition.py.

Output is read back with prometheus-client's own parser, as a scraper would read it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.exposition import Labels, Samples, label_values, parse, value
from xksproxy import sigv4
from xksproxy.errors import ERROR_TABLE
from xksproxy.hsm import pkcs11_errors
from xksproxy.metrics import (
    BUCKETS,
    MAX_HSM_LABELS,
    MULTIPROC_ENV,
    Metrics,
    prepare_multiprocess_dir,
    render,
)


def samples(m: Metrics) -> Samples:
    return parse(render(m)[0])


# --- every metric, after one call -------------------------------------------------------------


def _request(m: Metrics) -> None:
    m.request("encrypt", 200, None, 0.003)


def _pool_sample(m: Metrics) -> None:
    m.pool_sample("hsm-1", 5, 2, 1, 3)


ONE_CALL: list[tuple[str, Callable[[Metrics], None], str, Labels, float]] = [
    (
        "request-count",
        _request,
        "xks_requests_total",
        {"api": "encrypt", "status": "200", "error_name": "none"},
        1,
    ),
    (
        "request-error",
        lambda m: m.request("decrypt", 400, "InvalidCiphertextException", 0.01),
        "xks_requests_total",
        {"api": "decrypt", "status": "400", "error_name": "InvalidCiphertextException"},
        1,
    ),
    ("request-duration", _request, "xks_request_duration_seconds_count", {"api": "encrypt"}, 1),
    (
        "hsm-call",
        lambda m: m.hsm_call("hsm-1", "decrypt", 0.002),
        "xks_hsm_call_duration_seconds_count",
        {"hsm": "hsm-1", "call": "decrypt"},
        1,
    ),
    (
        "hsm-error",
        lambda m: m.hsm_error("hsm-1", "CKR_DEVICE_ERROR"),
        "xks_hsm_errors_total",
        {"hsm": "hsm-1", "ckr": "CKR_DEVICE_ERROR"},
        1,
    ),
    (
        "hsm-state",
        lambda m: m.hsm_state("hsm-1", "DEGRADED"),
        "xks_hsm_state",
        {"hsm": "hsm-1", "state": "DEGRADED"},
        1,
    ),
    (
        "pool-acquire",
        lambda m: m.pool_acquire("hsm-1", 0.0001),
        "xks_pool_acquire_seconds_count",
        {"hsm": "hsm-1"},
        1,
    ),
    ("pool-idle", _pool_sample, "xks_pool_sessions", {"hsm": "hsm-1", "state": "idle"}, 5),
    ("pool-busy", _pool_sample, "xks_pool_sessions", {"hsm": "hsm-1", "state": "busy"}, 2),
    ("pool-stuck", _pool_sample, "xks_pool_sessions", {"hsm": "hsm-1", "state": "stuck"}, 1),
    ("pool-waiters", _pool_sample, "xks_pool_waiters", {"hsm": "hsm-1"}, 3),
    (
        "failover",
        lambda m: m.failover("hsm-1", "hsm-2"),
        "xks_failovers_total",
        {"from_hsm": "hsm-1", "to_hsm": "hsm-2"},
        1,
    ),
    (
        "key-copy-mismatch",
        lambda m: m.key_copy_mismatch("hsm-2"),
        "xks_key_copy_mismatches_total",
        {"hsm": "hsm-2"},
        1,
    ),
    (
        "keys-excluded",
        lambda m: m.keys_excluded("hsm-2", 4),
        "xks_keys_excluded",
        {"hsm": "hsm-2"},
        4,
    ),
    (
        "auth-failure",
        lambda m: m.auth_failure("clock_skew"),
        "xks_auth_failures_total",
        {"reason": "clock_skew"},
        1,
    ),
]


@pytest.mark.parametrize(
    ("call", "name", "labels", "expected"),
    [row[1:] for row in ONE_CALL],
    ids=[r[0] for r in ONE_CALL],
)
def test_one_call_shows_as_one_sample(
    call: Callable[[Metrics], None], name: str, labels: Labels, expected: float
) -> None:
    m = Metrics()
    call(m)
    assert value(samples(m), name, **labels) == expected


def test_every_family_is_exposed_after_one_call_of_each() -> None:
    m = Metrics(version="1.2.3")
    for _, call, *_ in ONE_CALL:
        call(m)
    families = {f.name for f in text_string_to_metric_families(render(m)[0].decode())}
    assert families >= {
        "xks_build_info",
        "xks_requests",
        "xks_request_duration_seconds",
        "xks_hsm_call_duration_seconds",
        "xks_hsm_errors",
        "xks_hsm_state",
        "xks_pool_acquire_seconds",
        "xks_pool_sessions",
        "xks_pool_waiters",
        "xks_failovers",
        "xks_key_copy_mismatches",
        "xks_keys_excluded",
        "xks_auth_failures",
    }


def test_build_info_carries_the_version() -> None:
    assert value(samples(Metrics(version="1.2.3")), "xks_build_info", version="1.2.3") == 1


def test_histograms_have_buckets_for_a_250ms_budget() -> None:
    m = Metrics()
    m.request("encrypt", 200, None, 0.003)
    found = samples(m)
    bucket = "xks_request_duration_seconds_bucket"
    les = label_values(found, bucket, "le")
    assert les == {str(b) for b in BUCKETS} | {"+Inf"}
    assert value(found, bucket, api="encrypt", le="0.0025") == 0
    assert value(found, bucket, api="encrypt", le="0.005") == 1


def test_hsm_state_flips_to_the_new_state() -> None:
    m = Metrics()
    m.hsm_state("hsm-1", "ACTIVE")
    m.hsm_state("hsm-1", "UNAVAILABLE")
    found = samples(m)
    states = {
        s: value(found, "xks_hsm_state", hsm="hsm-1", state=s)
        for s in ("ACTIVE", "DEGRADED", "UNAVAILABLE")
    }
    assert states == {"ACTIVE": 0, "DEGRADED": 0, "UNAVAILABLE": 1}


def test_unknown_hsm_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown HSM state"):
        Metrics().hsm_state("hsm-1", "active")


def test_configured_hsms_have_series_before_any_event() -> None:
    found = samples(Metrics(hsm_names=["hsm-1"]))
    assert value(found, "xks_key_copy_mismatches_total", hsm="hsm-1") == 0
    assert value(found, "xks_keys_excluded", hsm="hsm-1") == 0
    assert value(found, "xks_hsm_call_duration_seconds_count", hsm="hsm-1", call="kat") == 0
    assert value(found, "xks_pool_acquire_seconds_count", hsm="hsm-1") == 0


# --- bounded labels ------------------------------------------------------------------------

BOUNDED: list[tuple[str, Callable[[Metrics], None], str, Labels]] = [
    (
        "unmapped-ckr-code",
        lambda m: m.hsm_error("h", "CKR_0x80000001"),
        "xks_hsm_errors_total",
        {"hsm": "h", "ckr": "CKR_OTHER"},
    ),
    (
        "ckr-unknown",
        lambda m: m.hsm_error("h", "CKR_UNKNOWN"),
        "xks_hsm_errors_total",
        {"hsm": "h", "ckr": "CKR_OTHER"},
    ),
    (
        "timeout-kept",
        lambda m: m.hsm_error("h", "TIMEOUT"),
        "xks_hsm_errors_total",
        {"hsm": "h", "ckr": "TIMEOUT"},
    ),
    (
        "reason",
        lambda m: m.auth_failure("key 1234abcd"),
        "xks_auth_failures_total",
        {"reason": "other"},
    ),
    (
        "api",
        lambda m: m.request("keys/foo", 404, "InvalidUriPathException", 0.001),
        "xks_requests_total",
        {"api": "other", "status": "404", "error_name": "InvalidUriPathException"},
    ),
    (
        "status",
        lambda m: m.request("encrypt", 418, "InternalException", 0.001),
        "xks_requests_total",
        {"api": "encrypt", "status": "other", "error_name": "InternalException"},
    ),
    (
        "error-name",
        lambda m: m.request("encrypt", 500, "KeyError: 'foo'", 0.001),
        "xks_requests_total",
        {"api": "encrypt", "status": "500", "error_name": "other"},
    ),
    (
        "hsm-call",
        lambda m: m.hsm_call("h", "init_token", 0.001),
        "xks_hsm_call_duration_seconds_count",
        {"hsm": "h", "call": "other"},
    ),
]


@pytest.mark.parametrize(
    ("call", "name", "labels"), [row[1:] for row in BOUNDED], ids=[r[0] for r in BOUNDED]
)
def test_unknown_label_values_are_counted_as_other(
    call: Callable[[Metrics], None], name: str, labels: Labels
) -> None:
    m = Metrics()
    call(m)
    assert value(samples(m), name, **labels) == 1


PRODUCED_CKR_NAMES = sorted(set(pkcs11_errors._NAMES.values()) | set(pkcs11_errors._CODES.values()))


@pytest.mark.parametrize("ckr", PRODUCED_CKR_NAMES)
def test_every_ckr_name_the_error_table_produces_is_kept(ckr: str) -> None:
    m = Metrics()
    m.hsm_error("h", ckr)
    assert value(samples(m), "xks_hsm_errors_total", hsm="h", ckr=ckr) == 1


SIGV4_REASONS = sorted(set(re.findall(r'_fail\("([a-z0-9_]+)"\)', inspect.getsource(sigv4))))


def test_sigv4_reasons_are_found_in_its_source() -> None:
    assert len(SIGV4_REASONS) >= 10  # guards the regex below, not sigv4


@pytest.mark.parametrize("reason", SIGV4_REASONS)
def test_every_sigv4_reason_is_kept(reason: str) -> None:
    m = Metrics()
    m.auth_failure(reason)
    assert value(samples(m), "xks_auth_failures_total", reason=reason) == 1


@pytest.mark.parametrize("error_name", sorted(ERROR_TABLE))
def test_every_error_name_is_kept(error_name: str) -> None:
    m = Metrics()
    m.request("encrypt", ERROR_TABLE[error_name], error_name, 0.001)
    found = samples(m)
    assert label_values(found, "xks_requests_total", "error_name") == {error_name}


def test_hsm_labels_beyond_the_cap_are_counted_as_other() -> None:
    m = Metrics()
    for i in range(MAX_HSM_LABELS + 5):
        m.key_copy_mismatch(f"hsm-{i}")
    found = samples(m)
    hsms = label_values(found, "xks_key_copy_mismatches_total", "hsm")
    assert len(hsms) == MAX_HSM_LABELS + 1
    assert value(found, "xks_key_copy_mismatches_total", hsm="other") == 5


# --- registries and rendering ----------------------------------------------------------------


def test_two_instances_share_nothing() -> None:
    a, b = Metrics(), Metrics()
    a.request("encrypt", 200, None, 0.001)
    labels = {"api": "encrypt", "status": "200", "error_name": "none"}
    assert value(samples(b), "xks_requests_total", **labels) is None


def test_the_global_registry_is_left_alone() -> None:
    Metrics(version="x").request("encrypt", 200, None, 0.001)
    assert b"xks_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_an_injected_registry_is_used() -> None:
    registry = prometheus_client.CollectorRegistry()
    Metrics(registry=registry).auth_failure("clock_skew")
    assert registry.get_sample_value("xks_auth_failures_total", {"reason": "clock_skew"}) == 1


def test_render_says_text_format_0_0_4() -> None:
    assert render(Metrics())[1] == "text/plain; version=0.0.4; charset=utf-8"


def test_multiprocess_dir_set_after_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="before the process starts"):
        Metrics()


def test_prepare_multiprocess_dir_removes_only_metric_files(tmp_path: Path) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("keep")
    prepare_multiprocess_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
