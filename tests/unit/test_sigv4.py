"""Tests for xksproxy.sigv4, cross-checked against botocore's independent SigV4 signer."""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from xksproxy.errors import AuthenticationFailedError
from xksproxy.sigv4 import SigV4Verifier

REGION = "us-east-1"
SERVICE = "kms-xks-proxy"
HOST = "xks.example.com"
PREFIX = "/example/xks/kms/xks/v1"
KEY_PATH = f"{PREFIX}/keys/foo/encrypt"
BODY = b'{"requestMetadata":{"kmsOperation":"Encrypt"},"plaintext":"SGVsbG8="}'

AKID_1 = "ABCDEFGHIJKLMNOPQRST2345"
SECRET_1 = "K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols="
AKID_2 = "ZYXWVUTSRQPONMLKJIHG7654"
SECRET_2 = "b4dS3cr3tb4dS3cr3tb4dS3cr3tb4dS3cr3tb4dS3cr3t="
CREDS = {AKID_1: SECRET_1, AKID_2: SECRET_2}

SIGNED_AT = datetime.datetime(2024, 5, 15, 12, 34, 56)  # naive UTC, as botocore uses it
NOW = float(calendar.timegm(SIGNED_AT.timetuple()))


@dataclass(frozen=True)
class Req:
    """A request as the HTTP layer would hand it to the verifier."""

    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    method: str = "POST"

    def header(self, name: str) -> str:
        return next(v for n, v in self.headers if n.lower() == name.lower())

    def with_header(self, name: str, value: str) -> Req:
        """Replace the (single) header *name* by *value*."""
        lname = name.lower()
        return replace(
            self, headers=[(n, value if n.lower() == lname else v) for n, v in self.headers]
        )

    def without_header(self, name: str) -> Req:
        lname = name.lower()
        return replace(self, headers=[(n, v) for n, v in self.headers if n.lower() != lname])


class _SelectiveSigV4Auth(SigV4Auth):  # type: ignore[misc]
    """botocore's signer, optionally restricted to signing only the headers in *only*."""

    def __init__(
        self, credentials: Credentials, service: str, region: str, only: Iterable[str] | None
    ) -> None:
        super().__init__(credentials, service, region)
        self._only = None if only is None else frozenset(only)

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = super().headers_to_sign(request)
        if self._only is not None:
            for name in set(headers):
                if name not in self._only:
                    del headers[name]
        return headers


def sign(
    *,
    path: str = KEY_PATH,
    query: str = "",
    body: bytes = BODY,
    extra_headers: Iterable[tuple[str, str]] = (),
    akid: str = AKID_1,
    secret: str = SECRET_1,
    region: str = REGION,
    service: str = SERVICE,
    when: datetime.datetime = SIGNED_AT,
    only: Iterable[str] | None = None,
) -> Req:
    """Sign a POST with botocore at time *when*; return it as received on the wire."""
    url = f"https://{HOST}{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method="POST", url=url, data=body)
    request.headers["Host"] = HOST  # explicit, so the signed value is also on the wire
    for name, value in extra_headers:
        request.headers[name] = value  # HTTPHeaders appends: repeated names stay repeated
    signer = _SelectiveSigV4Auth(Credentials(akid, secret), service, region, only)
    # botocore takes its clock from botocore.auth.get_current_datetime; freeze that, not us.
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        signer.add_auth(request)
    return Req(path=path, query=query, headers=list(request.headers.items()), body=body)


def verify(
    req: Req,
    *,
    verifier: SigV4Verifier | None = None,
    credentials: Mapping[str, str] = CREDS,
    now: float = NOW,
) -> str:
    return (verifier or SigV4Verifier(region=REGION)).verify(
        method=req.method,
        path=req.path,
        query=req.query,
        headers=req.headers,
        body=req.body,
        credentials=credentials,
        now=now,
    )


def reason_of(
    req: Req,
    *,
    verifier: SigV4Verifier | None = None,
    credentials: Mapping[str, str] = CREDS,
    now: float = NOW,
) -> str:
    """Verify *req*, expecting failure; return the failure's reason."""
    with pytest.raises(AuthenticationFailedError) as info:
        verify(req, verifier=verifier, credentials=credentials, now=now)
    return info.value.reason


def with_authorization(req: Req, old: str, new: str) -> Req:
    auth = req.header("Authorization")
    assert old in auth
    return req.with_header("Authorization", auth.replace(old, new))


# --- valid signatures -------------------------------------------------------------------------


def test_botocore_signature_verifies_and_returns_access_key_id() -> None:
    req = sign()
    assert "SignedHeaders=host;x-amz-date," in req.header("Authorization")
    assert verify(req) == AKID_1


def test_second_credential_of_same_prefix_verifies() -> None:
    assert verify(sign(akid=AKID_2, secret=SECRET_2)) == AKID_2


def test_credentials_lacking_the_access_key_id_fail() -> None:
    assert reason_of(sign(), credentials={AKID_2: SECRET_2}) == "unknown_access_key"


def test_curl_style_content_type_host_x_amz_date_verifies() -> None:
    req = sign(extra_headers=[("Content-Type", "application/json")])
    assert "SignedHeaders=content-type;host;x-amz-date," in req.header("Authorization")
    assert verify(req) == AKID_1


def test_unsigned_extra_headers_on_the_wire_are_ignored() -> None:
    req = sign()
    wire = replace(req, headers=[*req.headers, ("Content-Length", "71"), ("User-Agent", "x/1")])
    assert verify(wire) == AKID_1


def test_header_names_are_case_insensitive() -> None:
    req = sign(extra_headers=[("Content-Type", "application/json")])
    swapped = replace(req, headers=[(n.swapcase(), v) for n, v in req.headers])
    assert verify(swapped) == AKID_1


def test_repeated_headers_are_joined_and_whitespace_collapsed() -> None:
    req = sign(extra_headers=[("X-Multi", "  a  b "), ("X-Multi", "c\t d")])
    assert "x-multi" in req.header("Authorization")
    assert verify(req) == AKID_1


def test_empty_body_verifies() -> None:
    assert verify(sign(body=b"")) == AKID_1


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (KEY_PATH, ""),
        (f"{PREFIX}/keys/foo%3Abar/encrypt", ""),
        (f"{PREFIX}/keys/a%2Fb%20c/decrypt", ""),
        (f"{PREFIX}/keys/k.1_2-3~4/metadata", ""),
        (f"{PREFIX}/health/", ""),
        (f"{PREFIX}//keys/./x/../foo/encrypt", ""),
        (KEY_PATH, "b=2&a=1&a=0"),
        (KEY_PATH, "c=x%2Fy&flag&d=~&e=%20"),
    ],
)
def test_path_and_query_canonicalised_like_botocore(path: str, query: str) -> None:
    assert verify(sign(path=path, query=query)) == AKID_1


def test_query_is_decoded_and_reencoded_per_sigv4() -> None:
    # A client that over-encodes "~" (or uses lowercase hex) still canonicalises like SigV4 says.
    req = sign(query="d=~&c=x%2Fy")
    assert verify(replace(req, query="c=x%2fy&d=%7E")) == AKID_1


def test_percent_encoding_of_path_is_significant() -> None:
    req = sign(path=f"{PREFIX}/keys/foo%3Abar/encrypt")
    decoded = replace(req, path=f"{PREFIX}/keys/foo:bar/encrypt")
    assert reason_of(decoded) == "signature_mismatch"


# --- signature failures -----------------------------------------------------------------------


def test_wrong_secret_fails_and_reason_leaks_nothing() -> None:
    expected_signature = sign().header("Authorization")[-64:]  # what the verifier computes
    with pytest.raises(AuthenticationFailedError) as info:
        verify(sign(secret=SECRET_1 + "x"))
    assert info.value.reason == "signature_mismatch"
    for text in (info.value.reason, str(info.value), repr(info.value)):
        assert SECRET_1 not in text
        assert expected_signature not in text


def test_wrong_service_name_fails() -> None:
    assert reason_of(sign(service="kms")) == "wrong_service"


def test_wrong_region_fails() -> None:
    assert reason_of(sign(region="eu-west-1")) == "wrong_region"


def test_tampered_body_fails() -> None:
    req = sign()
    assert reason_of(replace(req, body=req.body.replace(b"SGVsbG8=", b"SGVsbG9="))) == (
        "signature_mismatch"
    )


def test_tampered_path_fails() -> None:
    req = sign()
    assert reason_of(replace(req, path=KEY_PATH.replace("/foo/", "/bar/"))) == "signature_mismatch"


def test_tampered_query_fails() -> None:
    assert reason_of(replace(sign(), query="a=1")) == "signature_mismatch"


def test_tampered_method_fails() -> None:
    assert reason_of(replace(sign(), method="PUT")) == "signature_mismatch"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Host", "evil.example.com"),
        ("Content-Type", "text/plain"),
        ("X-Amz-Date", "20240515T123457Z"),  # one second later: still in the window
    ],
)
def test_tampered_signed_header_value_fails(name: str, value: str) -> None:
    req = sign(extra_headers=[("Content-Type", "application/json")])
    assert reason_of(req.with_header(name, value)) == "signature_mismatch"


# --- malformed or missing parts ---------------------------------------------------------------


def test_missing_authorization_fails() -> None:
    assert reason_of(sign().without_header("Authorization")) == "missing_authorization"


def test_repeated_authorization_fails() -> None:
    req = sign()
    doubled = replace(req, headers=[*req.headers, ("authorization", req.header("Authorization"))])
    assert reason_of(doubled) == "multiple_authorization"


@pytest.mark.parametrize(
    "transform",
    [
        lambda a: "garbage",
        lambda a: "",
        lambda a: " " + a,
        lambda a: "AWS4-HMAC-SHA256 garbage",
        lambda a: a.replace("Credential=", "credential="),
        lambda a: a.replace(", SignedHeaders", " SignedHeaders"),
        lambda a: a.replace("/aws4_request", "/aws5_request"),
        lambda a: a[:-1],  # 63 hex digits
        lambda a: a[:-64] + a[-64:].upper(),
        lambda a: a + ", Extra=1",
        lambda a: a + " ",
        lambda a: a.replace("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256  "),
    ],
)
def test_garbage_authorization_fails(transform: Callable[[str], str]) -> None:
    req = sign()
    garbled = req.with_header("Authorization", transform(req.header("Authorization")))
    assert reason_of(garbled) == "malformed_authorization"


@pytest.mark.parametrize("separator", [",", ", ", ",  ", ",\t"])
def test_optional_whitespace_after_commas_is_tolerated(separator: str) -> None:
    req = sign()
    assert verify(with_authorization(req, ", ", separator)) == AKID_1


@pytest.mark.parametrize("algorithm", ["AWS4-HMAC-SHA512", "AWS4-ECDSA-P256-SHA256", "Bearer"])
def test_wrong_algorithm_fails(algorithm: str) -> None:
    assert reason_of(with_authorization(sign(), "AWS4-HMAC-SHA256", algorithm)) == (
        "unsupported_algorithm"
    )


def test_missing_x_amz_date_fails() -> None:
    assert reason_of(sign().without_header("X-Amz-Date")) == "missing_x_amz_date"


@pytest.mark.parametrize(
    "value",
    [
        "20240515T123456",
        "2024-05-15T12:34:56Z",
        "20240515t123456z",
        "20241315T123456Z",
        "20240230T123456Z",
        "20240515T243456Z",
        "20240515T126056Z",
        "20240515T123460Z",
        "\uff120240515T123456Z",  # a fullwidth digit: int() would take it, SigV4 does not
        "Wed, 15 May 2024 12:34:56 GMT",
        "",
    ],
)
def test_bad_x_amz_date_fails(value: str) -> None:
    assert reason_of(sign().with_header("X-Amz-Date", value)) == "bad_x_amz_date"


def test_repeated_x_amz_date_fails() -> None:
    req = sign()
    doubled = replace(req, headers=[*req.headers, ("x-amz-date", req.header("X-Amz-Date"))])
    assert reason_of(doubled) == "bad_x_amz_date"


def test_signed_headers_without_host_fails() -> None:
    assert reason_of(sign(only={"x-amz-date"})) == "host_not_signed"


def test_signed_headers_without_x_amz_date_fails() -> None:
    assert reason_of(sign(only={"host"})) == "x_amz_date_not_signed"


@pytest.mark.parametrize(
    "signed_headers",
    ["x-amz-date;host", "Host;x-amz-date", "host;host;x-amz-date", "host;;x-amz-date", ";host"],
)
def test_non_canonical_signed_headers_fail(signed_headers: str) -> None:
    req = with_authorization(
        sign(), "SignedHeaders=host;x-amz-date", f"SignedHeaders={signed_headers}"
    )
    assert reason_of(req) == "signed_headers_not_canonical"


def test_signed_header_absent_from_request_fails() -> None:
    req = sign(extra_headers=[("Content-Type", "application/json")])
    assert reason_of(req.without_header("Content-Type")) == "signed_header_missing"


def test_signed_host_absent_from_request_fails() -> None:
    assert reason_of(sign().without_header("Host")) == "signed_header_missing"


def test_scope_date_differs_from_x_amz_date_fails() -> None:
    req = with_authorization(sign(), "/20240515/", "/20240514/")
    assert reason_of(req) == "scope_date_mismatch"


# --- clock skew -------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes", [-6, 6])
def test_clock_skew_over_five_minutes_fails(minutes: int) -> None:
    when = SIGNED_AT + datetime.timedelta(minutes=minutes)
    assert reason_of(sign(when=when)) == "clock_skew"


@pytest.mark.parametrize("minutes", [-4, 4])
def test_clock_skew_under_five_minutes_verifies(minutes: int) -> None:
    assert verify(sign(when=SIGNED_AT + datetime.timedelta(minutes=minutes))) == AKID_1


def test_skew_limit_is_configurable() -> None:
    strict = SigV4Verifier(region=REGION, max_skew_seconds=30.0)
    assert reason_of(sign(), verifier=strict, now=NOW + 31) == "clock_skew"
    assert verify(sign(), verifier=strict, now=NOW + 30) == AKID_1


# --- signing key cache ------------------------------------------------------------------------


def test_signing_key_is_derived_once_per_secret_and_date() -> None:
    verifier = SigV4Verifier(region=REGION)
    for _ in range(3):
        assert verify(sign(), verifier=verifier) == AKID_1
    assert verifier.key_derivations == 1
    assert verify(sign(akid=AKID_2, secret=SECRET_2), verifier=verifier) == AKID_2
    assert verifier.key_derivations == 2
    assert verifier.cached_key_count == 2


def test_failed_early_checks_do_not_derive_keys() -> None:
    verifier = SigV4Verifier(region=REGION)
    reason_of(sign(), verifier=verifier, credentials={})
    reason_of(sign(when=SIGNED_AT + datetime.timedelta(minutes=10)), verifier=verifier)
    assert verifier.key_derivations == 0


def test_signing_key_cache_is_bounded() -> None:
    verifier = SigV4Verifier(region=REGION, key_cache_size=2)
    creds = {f"AKID{i:020d}": f"secret-{i}-{'x' * 40}" for i in range(5)}
    for akid, secret in creds.items():
        req = sign(akid=akid, secret=secret)
        assert verify(req, verifier=verifier, credentials=creds) == akid
        assert verifier.cached_key_count <= 2
    assert verifier.key_derivations == 5
    # After eviction a key is derived again, and still verifies.
    first = next(iter(creds))
    assert (
        verify(sign(akid=first, secret=creds[first]), verifier=verifier, credentials=creds) == first
    )
    assert verifier.key_derivations == 6
    assert verifier.cached_key_count <= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"region": ""},
        {"region": REGION, "service": ""},
        {"region": REGION, "max_skew_seconds": -1},
        {"region": REGION, "key_cache_size": 0},
    ],
)
def test_invalid_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SigV4Verifier(**kwargs)


# --- property ---------------------------------------------------------------------------------

_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(deadline=None, max_examples=150, database=None)
@given(
    body=st.binary(min_size=1, max_size=512),
    header_value=_PRINTABLE,
    index=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_botocore_signed_requests_verify_and_any_body_byte_flip_fails(
    body: bytes, header_value: str, index: int, mask: int
) -> None:
    req = sign(body=body, extra_headers=[("X-Custom", header_value)])
    verifier = SigV4Verifier(region=REGION)
    assert verify(req, verifier=verifier) == AKID_1
    flipped = bytearray(body)
    flipped[index % len(body)] ^= mask
    assert reason_of(replace(req, body=bytes(flipped)), verifier=verifier) == "signature_mismatch"
