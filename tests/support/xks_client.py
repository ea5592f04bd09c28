"""A test client that signs XKS requests with botocore's SigV4Auth (an independent signer)."""

from __future__ import annotations

import datetime
import http.client
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "kms-xks-proxy"


@contextmanager
def signer_clock(when: datetime.datetime) -> Iterator[None]:
    """Make botocore sign as if it were *when* (patches the signer, never the proxy)."""
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        yield


def sign(
    method: str,
    url: str,
    body: bytes,
    akid: str,
    secret: str,
    *,
    region: str,
    service: str = SERVICE,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers for a SigV4-signed request (botocore signs host, x-amz-date and *headers*)."""
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    SigV4Auth(Credentials(akid, secret), service, region).add_auth(req)
    return dict(req.headers.items())


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_name(self) -> str | None:
        try:
            data = self.json
        except ValueError:
            return None
        return data.get("errorName") if isinstance(data, dict) else None


@dataclass
class XksClient:
    host: str
    port: int
    prefix: str
    akid: str
    secret: str
    region: str = "us-east-1"
    extra_headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_kms(cls, kms: Mapping[str, Any], port: int) -> XksClient:
        """A client signing as the KMS console file *kms* (dev-setup's kms-xks-config.json)
        says, to 127.0.0.1:*port*."""
        cred = kms["XksProxyAuthenticationCredential"]
        path: str = kms["XksProxyUriPath"]
        assert path.endswith("/kms/xks/v1"), path
        return cls(
            "127.0.0.1", port, path.removesuffix("/kms/xks/v1").strip("/"),
            cred["AccessKeyId"], cred["RawSecretAccessKey"], kms["Region"],
        )  # fmt: skip

    @property
    def base(self) -> str:
        return f"/{self.prefix}/kms/xks/v1" if self.prefix else "/kms/xks/v1"

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def connection(self) -> http.client.HTTPConnection:
        """A new connection to the proxy (HTTPS in a subclass)."""
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def signed(
        self,
        path: str,
        body: bytes,
        *,
        akid: str | None = None,
        secret: str | None = None,
        service: str = SERVICE,
        region: str | None = None,
        content_type: bool = True,
    ) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if content_type else {}
        return sign(
            "POST",
            self.url(path),
            body,
            akid or self.akid,
            secret or self.secret,
            region=region or self.region,
            service=service,
            headers=headers,
        )

    def call(self, api_path: str, body: Any, **sign_opts: Any) -> Response:
        """POST *body* (dict -> JSON, bytes as is) to base + *api_path*, signed."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        path = self.base + api_path
        return self.raw("POST", path, raw, self.signed(path, raw, **sign_opts))

    def health(self, operation: str = "KmsHealthCheck") -> Response:
        return self.call("/health", {"requestMetadata": health_meta(operation)})

    def metadata(self, key: str, meta: Mapping[str, Any] | None = None) -> Response:
        return self.call(
            f"/keys/{key}/metadata", {"requestMetadata": meta or key_meta("CreateKey")}
        )

    def encrypt(self, key: str, **fields: Any) -> Response:
        body = {"requestMetadata": key_meta("Encrypt"), "encryptionAlgorithm": "AES_GCM"}
        body.update(fields)
        return self.call(f"/keys/{key}/encrypt", body)

    def decrypt(self, key: str, **fields: Any) -> Response:
        body = {"requestMetadata": key_meta("Decrypt"), "encryptionAlgorithm": "AES_GCM"}
        body.update(fields)
        return self.call(f"/keys/{key}/decrypt", body)


def health_meta(operation: str = "KmsHealthCheck") -> dict[str, str]:
    return {"kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae", "kmsOperation": operation}


def key_meta(operation: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/a1b2c3d4-5678-90ab-cdef-EXAMPLE11111",
        "kmsOperation": operation,
        "kmsRequestId": "5112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsViaService": "ebs",
    }


def decrypt_fields(enc: Mapping[str, Any], aad: str | None = None) -> dict[str, Any]:
    """Decrypt request fields from an Encrypt response."""
    out = {
        "ciphertext": enc["ciphertext"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
    }
    if aad is not None:
        out["additionalAuthenticatedData"] = aad
    return out
