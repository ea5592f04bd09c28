"""Property tests against the running proxy: whatever a correctly signed client sends, the
answer is never 5xx, always JSON, and every error is a well-formed XKS error
(docs/spec-notes.md §4).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.support.xks_client import Response, XksClient, health_meta, key_meta

APIS = {
    "health": "/health",
    "metadata": "/keys/{key}/metadata",
    "encrypt": "/keys/{key}/encrypt",
    "decrypt": "/keys/{key}/decrypt",
}
KEYS = ["foo", "enc-only", "dec-only", "no-usage", "disabled", "no-such-key", "xksproxy-health"]
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True, scope="module")
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep Hypothesis's caches (charmap, constants) out of the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


# --- strategies -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=20,
)


def b64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Things that go in a base64 field: right and wrong lengths, URL-safe, unpadded, non-canonical,
# non-ASCII, and values that are not strings at all.
b64_like = st.one_of(
    st.binary(max_size=64).map(b64_of),
    st.sampled_from([12, 16, 20, 21, 5])
    .flatmap(lambda n: st.binary(min_size=n, max_size=n))
    .map(b64_of),
    st.binary(min_size=1, max_size=48).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.binary(min_size=1, max_size=48).map(lambda b: b64_of(b).rstrip("=")),
    st.sampled_from(["AQAAAAE=", "AQAAAAI=", "AgAAAAE=", "AQ==", "AR==", "====", "", " ", "\n"]),
    st.text(max_size=60),
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=60
    ),
    json_values,
)
algorithms = st.one_of(
    st.just("AES_GCM"),
    st.sampled_from(["aes_gcm", "AES_GCM ", "AES_CBC", "SHA_256", "SYMMETRIC_DEFAULT", ""]),
    json_values,
)
cdiv_algorithms = st.one_of(
    st.just("SHA_256"), st.sampled_from(["sha_256", "SHA256", ""]), json_values
)
b64_fields = [
    "plaintext",
    "ciphertext",
    "initializationVector",
    "authenticationTag",
    "additionalAuthenticatedData",
    "ciphertextMetadata",
]


@st.composite
def request_metadata(draw: st.DrawFn, api: str) -> dict[str, Any]:
    meta: dict[str, Any] = dict(health_meta() if api == "health" else key_meta("Encrypt"))
    meta["kmsOperation"] = draw(
        st.sampled_from(["Encrypt", "Decrypt", "CreateKey", "KmsHealthCheck", "ReEncrypt"])
        | st.text(min_size=1, max_size=30)
    )
    meta["kmsRequestId"] = draw(st.text(min_size=1, max_size=60))
    extra = draw(st.dictionaries(st.text(max_size=20), json_values, max_size=3))
    for name, value in extra.items():
        meta.setdefault(name, value)
    return meta


@st.composite
def almost_right(draw: st.DrawFn, api: str) -> dict[str, Any]:
    """A body with valid requestMetadata and random (often nearly valid) other fields."""
    body: dict[str, Any] = {"requestMetadata": draw(request_metadata(api))}
    if draw(st.booleans()):
        body["encryptionAlgorithm"] = draw(algorithms)
    if draw(st.booleans()):
        body["ciphertextDataIntegrityValueAlgorithm"] = draw(cdiv_algorithms)
    for name in draw(st.lists(st.sampled_from(b64_fields), unique=True)):
        body[name] = draw(b64_like)
    body.update(draw(st.dictionaries(st.text(max_size=20), json_values, max_size=2)))
    return body


@st.composite
def well_formed_decrypt(draw: st.DrawFn) -> dict[str, Any]:
    """Decrypt bodies that pass validation and reach the HSM with random bytes."""
    body: dict[str, Any] = {
        "requestMetadata": key_meta("Decrypt"),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": b64_of(draw(st.binary(min_size=1, max_size=64))),
        "initializationVector": b64_of(draw(st.binary(min_size=12, max_size=12))),
        "authenticationTag": b64_of(draw(st.binary(min_size=16, max_size=16))),
        "ciphertextMetadata": draw(
            st.sampled_from(["AQAAAAE=", "AQAAAAI=", "AQAAAAA=", "AgAAAAE="])
            | st.binary(max_size=20).map(b64_of)
        ),
    }
    if draw(st.booleans()):
        body["additionalAuthenticatedData"] = b64_of(draw(st.binary(max_size=64)))
    return body


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"\xff\xfe{}",
            b'{"requestMetadata": {"kmsRequestId": "\xff"}}',
            b'{"requestMetadata": ',
            b"\xef\xbb\xbf{}",
            b"null",
            b"[]",
            b'"string"',
            b"NaN",
            b"1e999999",
            b"9" * 5000,
            b"[" * 500 + b"]" * 500,
        ]
    ),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
)


# --- the property ---------------------------------------------------------------------------


def path_for(api: str, key: str) -> str:
    return APIS[api].format(key=key)


def assert_well_formed(resp: Response) -> None:
    assert resp.status < 500, (resp.status, resp.body)
    assert resp.headers.get("content-type", "").split(";")[0].strip() == "application/json", (
        resp.headers
    )
    body = json.loads(resp.body)
    assert isinstance(body, dict), body
    # Signed correctly, so the fuzzed body really got past SigV4.
    assert body.get("errorName") != "AuthenticationFailedException", body
    if resp.status == 200:
        assert "errorName" not in body
        return
    assert isinstance(body.get("errorName"), str) and body["errorName"], body
    message = body.get("errorMessage", "")
    assert isinstance(message, str), body
    assert len(message) < 512, body
    assert all(0x20 <= ord(ch) <= 0x7E for ch in message), body


@pytest.mark.parametrize("api", list(APIS))
@FUZZ
@given(body=json_values, key=st.sampled_from(KEYS))
def test_any_json_value(client: XksClient, api: str, body: Any, key: str) -> None:
    assert_well_formed(client.call(path_for(api, key), json.dumps(body).encode()))


@pytest.mark.parametrize("api", list(APIS))
@FUZZ
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_almost_right_bodies(client: XksClient, api: str, data: st.DataObject, key: str) -> None:
    body = data.draw(almost_right(api))
    assert_well_formed(client.call(path_for(api, key), json.dumps(body).encode()))


@pytest.mark.parametrize("api", list(APIS))
@FUZZ
@given(body=raw_bodies, key=st.sampled_from(KEYS))
def test_raw_bytes(client: XksClient, api: str, body: bytes, key: str) -> None:
    assert_well_formed(client.call(path_for(api, key), body))


@FUZZ
@given(body=well_formed_decrypt(), key=st.sampled_from(KEYS))
def test_well_formed_decrypt_of_random_bytes(client: XksClient, body: Any, key: str) -> None:
    resp = client.call(path_for("decrypt", key), json.dumps(body).encode())
    assert_well_formed(resp)
    assert resp.status != 200, resp.body  # random bytes never authenticate


@pytest.mark.parametrize(
    "body",
    [b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 5000 + b"]" * 5000, b"[" * 100000],
    ids=["objects", "arrays", "unterminated"],
)
@pytest.mark.parametrize("api", list(APIS))
def test_deeply_nested_json_is_a_validation_error(client: XksClient, api: str, body: bytes) -> None:
    resp = client.call(path_for(api, "foo"), body)
    assert_well_formed(resp)
    assert resp.error_name == "ValidationException"
