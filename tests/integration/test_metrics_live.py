"""/metrics of a real proxy process: parsed with prometheus-client's own parser."""

from __future__ import annotations

from tests.support.api import b64
from tests.support.metrics import scrape, value
from tests.support.proxies import Server
from tests.support.rigs import RIG_WORKERS, Rig
from tests.support.xks_client import XksClient, decrypt_fields


def test_metrics_count_requests_and_hsm_calls(rig: Rig, server: Server, client: XksClient) -> None:
    _, _, before = scrape(rig.metrics_port)
    enc = client.encrypt("foo", plaintext=b64(b"metrics"))
    client.decrypt("foo", **decrypt_fields(enc.json))
    client.encrypt("nope", plaintext=b64(b"x"))
    status, _, after = scrape(rig.metrics_port)
    assert status == 200
    for api, code, error in (
        ("encrypt", "200", "none"),
        ("decrypt", "200", "none"),
        ("encrypt", "404", "KeyNotFoundException"),
    ):
        name = "xks_requests_total"
        delta = value(after, name, api=api, status=code, error_name=error) - value(
            before, name, api=api, status=code, error_name=error
        )
        assert delta >= 1, (api, code, error)
    calls = "xks_hsm_call_duration_seconds_count"
    assert value(after, calls, hsm="softhsm-1", call="encrypt") > value(
        before, calls, hsm="softhsm-1", call="encrypt"
    )


def test_metrics_show_the_hsm_state_and_build(rig: Rig, server: Server) -> None:
    _, _, samples = scrape(rig.metrics_port)
    assert value(samples, "xks_hsm_state", hsm="softhsm-1", state="ACTIVE") == 1
    assert value(samples, "xks_hsm_state", hsm="softhsm-1", state="UNAVAILABLE") == 0
    assert value(samples, "xks_build_info") == 1
    sessions = {lab["state"]: v for lab, v in samples["xks_pool_sessions"]}
    assert set(sessions) == {"idle", "busy", "stuck"}
    assert sum(sessions.values()) == 8 * RIG_WORKERS  # pool_size in the rig, per worker


def test_authentication_failures_are_counted_by_reason(
    rig: Rig, server: Server, client: XksClient
) -> None:
    _, _, before = scrape(rig.metrics_port)
    client.call(
        "/health", {"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "x"}}, secret="x" * 44
    )
    _, _, after = scrape(rig.metrics_port)
    name = "xks_auth_failures_total"
    assert (
        value(after, name, reason="signature_mismatch")
        - value(before, name, reason="signature_mismatch")
        == 1
    )
