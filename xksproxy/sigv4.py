"""SigV4 (AWS4-HMAC-SHA256) request verification for the XKS API (docs/spec-notes.md §3.2).

Pure and synchronous: the HTTP layer hands in the request as received and gets back the access
key id that signed it, or an :class:`AuthenticationFailedError` whose ``reason`` is a short word
for the log.  The canonical form follows botocore's ``SigV4Auth`` for non-S3 services, except
that the payload hash is always computed from the body (``x-amz-content-sha256`` is not trusted).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote, unquote_to_bytes

from xksproxy.errors import AuthenticationFailedError

__all__ = ["ALGORITHM", "SigV4Verifier"]

ALGORITHM = "AWS4-HMAC-SHA256"

_ALGORITHM_TOKEN_RE = re.compile(r"[A-Za-z0-9-]+")
# Everything after "AWS4-HMAC-SHA256 ": strict, except optional blanks after the commas.
_AUTH_PARAMS_RE = re.compile(
    r"Credential=([^/,\s]+)/([0-9]{8})/([^/,\s]+)/([^/,\s]+)/aws4_request,[ \t]*"
    r"SignedHeaders=([^,\s]+),[ \t]*"
    r"Signature=([0-9a-f]{64})"
)
# [0-9], not \d: \d also matches non-ASCII digits, which int() would then accept.
_AMZ_DATE_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})Z")
# A path that is already canonical: unreserved characters only, no empty or dot segments.
_PLAIN_PATH_RE = re.compile(r"/|(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._~-]+)+/?")

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_QUERY_SAFE = "-_.~"


def _fail(reason: str) -> AuthenticationFailedError:
    return AuthenticationFailedError(reason)


def _parse_amz_date(value: str) -> int | None:
    """Return the Unix time of a ``YYYYMMDDTHHMMSSZ`` value, or None if it is not one."""
    match = _AMZ_DATE_RE.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = map(int, match.groups())
    if hour > 23 or minute > 59 or second > 59:
        return None
    try:
        days = datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    return days * 86400 + hour * 3600 + minute * 60 + second


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, plus dropping empty segments, exactly as botocore normalises paths."""
    if not path:
        return "/"
    output: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if output:
                output.pop()
        elif segment and segment != ".":
            output.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and output else ""
    return first + "/".join(output) + last


def _canonical_uri(path: str) -> str:
    """Canonical URI of a raw (still percent-encoded) path: normalised, then encoded once more."""
    if _PLAIN_PATH_RE.fullmatch(path):
        return path  # the XKS paths: encoding and normalising would not change anything
    # Non-S3 SigV4 encodes the already-encoded path again, so "%3A" becomes "%253A".
    return quote(_remove_dot_segments(path), safe="/~")


def _canonical_query(query: str) -> str:
    """Canonical query string: each name and value re-encoded, pairs sorted by name then value."""
    if not query:
        return ""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        # Via bytes so that any escape (even of invalid UTF-8) round-trips unchanged.
        pairs.append(
            (
                quote(unquote_to_bytes(name), safe=_QUERY_SAFE),
                quote(unquote_to_bytes(value), safe=_QUERY_SAFE),
            )
        )
    pairs.sort()
    return "&".join([f"{name}={value}" for name, value in pairs])


def _trim(value: str) -> str:
    """SigV4 Trimall: strip, and collapse runs of whitespace to one space (as botocore does)."""
    return " ".join(value.split())


class SigV4Verifier:
    """Verifies AWS4-HMAC-SHA256 signed requests for one region and service."""

    __slots__ = (
        "_key_cache",
        "_scope_suffix",
        "key_cache_size",
        "key_derivations",
        "max_skew_seconds",
        "region",
        "service",
    )

    def __init__(
        self,
        *,
        region: str,
        service: str = "kms-xks-proxy",
        max_skew_seconds: float = 300.0,
        key_cache_size: int = 256,
    ) -> None:
        if not region or not service:
            raise ValueError("region and service must be non-empty")
        if max_skew_seconds < 0:
            raise ValueError("max_skew_seconds must be >= 0")
        if key_cache_size < 1:
            raise ValueError("key_cache_size must be >= 1")
        self.region = region
        self.service = service
        self.max_skew_seconds = max_skew_seconds
        self.key_cache_size = key_cache_size
        self.key_derivations = 0  # signing keys derived so far; lets tests see the cache work
        self._scope_suffix = f"/{region}/{service}/aws4_request"
        self._key_cache: dict[tuple[str, str], bytes] = {}

    @property
    def cached_key_count(self) -> int:
        """Number of signing keys currently cached."""
        return len(self._key_cache)

    def verify(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        credentials: Mapping[str, str],
        now: float,
    ) -> str:
        """Verify; return the access key id that signed. Raise AuthenticationFailedError(reason)."""
        values: dict[str, list[str]] = {}
        for name, value in headers:
            lname = name.lower()
            bucket = values.get(lname)
            if bucket is None:
                values[lname] = [value]
            else:
                bucket.append(value)

        auth_values = values.get("authorization")
        if auth_values is None:
            raise _fail("missing_authorization")
        if len(auth_values) != 1:
            raise _fail("multiple_authorization")
        algorithm, sep, params = auth_values[0].partition(" ")
        if algorithm != ALGORITHM:
            if sep and _ALGORITHM_TOKEN_RE.fullmatch(algorithm):
                raise _fail("unsupported_algorithm")
            raise _fail("malformed_authorization")
        match = _AUTH_PARAMS_RE.fullmatch(params)
        if match is None:
            raise _fail("malformed_authorization")
        access_key_id, scope_date, region, service, signed_headers, signature = match.groups()

        if service != self.service:
            raise _fail("wrong_service")
        if region != self.region:
            raise _fail("wrong_region")
        secret = credentials.get(access_key_id)
        if secret is None:
            raise _fail("unknown_access_key")

        # SigV4 lists signed headers lowercase, sorted and unique; anything else was not
        # produced by a conforming signer, so refuse it rather than guess.
        names = signed_headers.split(";")
        if signed_headers != signed_headers.lower():
            raise _fail("signed_headers_not_canonical")
        previous = ""
        for name in names:
            if name <= previous:  # also catches an empty name, as "" <= ""
                raise _fail("signed_headers_not_canonical")
            previous = name
        if "host" not in names:
            raise _fail("host_not_signed")
        if "x-amz-date" not in names:
            raise _fail("x_amz_date_not_signed")

        date_values = values.get("x-amz-date")
        if date_values is None:
            raise _fail("missing_x_amz_date")
        amz_date = date_values[0]
        timestamp = _parse_amz_date(amz_date) if len(date_values) == 1 else None
        if timestamp is None:
            raise _fail("bad_x_amz_date")
        if scope_date != amz_date[:8]:
            raise _fail("scope_date_mismatch")
        if abs(now - timestamp) > self.max_skew_seconds:
            raise _fail("clock_skew")

        canonical_headers: list[str] = []
        for name in names:
            header_values = values.get(name)
            if header_values is None:
                raise _fail("signed_header_missing")
            if len(header_values) == 1:
                canonical_headers.append(f"{name}:{_trim(header_values[0])}\n")
            else:
                joined = ",".join([_trim(v) for v in header_values])
                canonical_headers.append(f"{name}:{joined}\n")

        try:
            canonical_request = "\n".join(
                (
                    method,
                    _canonical_uri(path),
                    _canonical_query(query),
                    "".join(canonical_headers),
                    signed_headers,
                    hashlib.sha256(body).hexdigest(),
                )
            ).encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise _fail("malformed_request") from None
        string_to_sign = (
            f"{ALGORITHM}\n{amz_date}\n{scope_date}{self._scope_suffix}\n"
            f"{hashlib.sha256(canonical_request).hexdigest()}"
        ).encode()

        key = self._signing_key(secret, scope_date)
        expected = hmac.digest(key, string_to_sign, "sha256").hex()
        if not hmac.compare_digest(expected, signature):
            raise _fail("signature_mismatch")
        return access_key_id

    def _signing_key(self, secret: str, date: str) -> bytes:
        """Return the signing key for *secret* on *date*, derived at most once while cached."""
        # Only reached for a known access key whose scope date is within the skew window, so an
        # unauthenticated client can neither grow this cache nor make it churn.
        cache_key = (secret, date)
        key = self._key_cache.get(cache_key)
        if key is None:
            key = hmac.digest(f"AWS4{secret}".encode(), date.encode("ascii"), "sha256")
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self.key_derivations += 1
            if len(self._key_cache) >= self.key_cache_size:
                self._key_cache.clear()  # simple and rare: steady state is ~2 keys per credential
            self._key_cache[cache_key] = key
        return key
