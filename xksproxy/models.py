"""Wire models of the four XKS APIs: parsing and validation of untrusted JSON at the edge, and
the JSON of the service's results.

camelCase exists only in this module.  Every problem becomes ValidationError (400) or, for
input larger than this proxy is configured to take but valid per the spec, UnsupportedOperation
(501).  Parsed requests and the service's results are frozen values; each result renders its
own response body (:meth:`wire`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from xksproxy.errors import UnsupportedOperationError, ValidationError

# A key id: the path segment of the key APIs, and the label of a key's objects in the HSM.
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
IV_LENGTHS = (12, 16)
TAG_LENGTH = 16
MAX_CM = 20
_META_STRINGS = (
    "awsPrincipalArn",
    "awsSourceVpc",
    "awsSourceVpce",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
    "kmsViaService",
)
# The specification's longest requestMetadata value: ARNs of up to 2,048 characters must work.
# Longer ones (and other fields that long) are refused, not logged whole.  kmsRequestId is opaque
# and must not be validated: it is not refused, and the audit line keeps its first
# MAX_META_CHARS characters only.
MAX_META_CHARS = 2048
_REQUIRED_META = {
    "health": ("kmsRequestId", "kmsOperation"),
    "metadata": ("kmsRequestId", "kmsOperation", "awsPrincipalArn"),
    "encrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
    "decrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
}


@dataclass(frozen=True, slots=True)
class RequestMetadata:
    """requestMetadata; unknown fields are kept in ``extra`` and otherwise ignored."""

    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    kms_via_service: str | None = None
    aws_source_vpc: str | None = None
    aws_source_vpce: str | None = None


@dataclass(frozen=True, slots=True)
class EncryptRequest:
    metadata: RequestMetadata
    plaintext: bytes
    aad: bytes | None
    want_cdiv: bool


@dataclass(frozen=True, slots=True)
class DecryptRequest:
    metadata: RequestMetadata
    ciphertext: bytes
    ciphertext_metadata: bytes | None
    aad: bytes | None
    iv: bytes
    tag: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """Input sizes this proxy takes (config: server.max_plaintext_bytes, max_aad_bytes)."""

    max_plaintext: int
    max_aad: int


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        # UTF-8 only, as JSON between systems is (RFC 8259 §8.1); json.loads of bytes would also
        # take UTF-16 and UTF-32.
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValidationError("the request body is not UTF-8") from None
    except ValueError:
        raise ValidationError("the request body is not valid JSON") from None
    except RecursionError:  # absurdly deep nesting: no XKS body is more than 3 levels deep
        raise ValidationError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValidationError("the request body must be a JSON object")
    return data


def parse_metadata(data: dict[str, Any], api: str) -> RequestMetadata:
    """Validate requestMetadata for *api* (health, metadata, encrypt, decrypt)."""
    meta = data.get("requestMetadata")
    if not isinstance(meta, dict) or not meta:
        raise ValidationError("requestMetadata is missing or empty")
    values: dict[str, str | None] = {}
    for name in _META_STRINGS:
        value = meta.get(name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"requestMetadata.{name} must be a string")
        if value is not None and len(value) > MAX_META_CHARS and name != "kmsRequestId":
            raise ValidationError(f"requestMetadata.{name} is longer than {MAX_META_CHARS}")
        values[name] = value
    for name in _REQUIRED_META[api]:
        if not values[name]:
            raise ValidationError(f"requestMetadata.{name} is required")
    return RequestMetadata(
        kms_request_id=values["kmsRequestId"] or "",
        kms_operation=values["kmsOperation"] or "",
        aws_principal_arn=values["awsPrincipalArn"],
        kms_key_arn=values["kmsKeyArn"],
        kms_via_service=values["kmsViaService"],
        aws_source_vpc=values["awsSourceVpc"],
        aws_source_vpce=values["awsSourceVpce"],
    )


def b64decode(data: dict[str, Any], field: str, *, required: bool, max_len: int) -> bytes | None:
    """Strict standard base64 (RFC 4648 §4, padded; URL-safe refused) of at most *max_len*."""
    value = data.get(field)
    if value is None:
        if required:
            raise ValidationError(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a base64 string")
    if len(value) > 4 * ((max_len + 2) // 3):
        raise UnsupportedOperationError(f"{field} is longer than this proxy accepts ({max_len} B)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{field} is not valid standard base64") from None
    # Refuse non-canonical encodings (stray bits in the padding), so one value has one form.
    if base64.b64encode(raw) != value.encode("ascii"):
        raise ValidationError(f"{field} is not canonical standard base64")
    if len(raw) > max_len:
        raise UnsupportedOperationError(f"{field} is longer than this proxy accepts ({max_len} B)")
    return raw


def _algorithm(data: dict[str, Any]) -> None:
    if data.get("encryptionAlgorithm") != "AES_GCM":
        raise ValidationError("encryptionAlgorithm must be AES_GCM")


def parse_encrypt(data: dict[str, Any], limits: Limits) -> EncryptRequest:
    meta = parse_metadata(data, "encrypt")
    _algorithm(data)
    plaintext = b64decode(data, "plaintext", required=True, max_len=limits.max_plaintext)
    assert plaintext is not None
    if not plaintext:
        raise ValidationError("plaintext must not be empty")
    aad = b64decode(data, "additionalAuthenticatedData", required=False, max_len=limits.max_aad)
    cdiv_alg = data.get("ciphertextDataIntegrityValueAlgorithm")
    if cdiv_alg is not None and cdiv_alg != "SHA_256":
        raise ValidationError("ciphertextDataIntegrityValueAlgorithm must be SHA_256")
    return EncryptRequest(meta, plaintext, aad, cdiv_alg is not None)


def parse_decrypt(data: dict[str, Any], limits: Limits) -> DecryptRequest:
    meta = parse_metadata(data, "decrypt")
    _algorithm(data)
    ct = b64decode(data, "ciphertext", required=True, max_len=limits.max_plaintext)
    assert ct is not None
    if not ct:
        raise ValidationError("ciphertext must not be empty")
    cm = b64decode(data, "ciphertextMetadata", required=False, max_len=1024)
    if cm is not None and len(cm) > MAX_CM:
        raise ValidationError(f"ciphertextMetadata must be at most {MAX_CM} bytes")
    aad = b64decode(data, "additionalAuthenticatedData", required=False, max_len=limits.max_aad)
    iv = b64decode(data, "initializationVector", required=True, max_len=1024)
    assert iv is not None
    if len(iv) not in IV_LENGTHS:
        raise ValidationError("initializationVector must be 12 or 16 bytes")
    tag = b64decode(data, "authenticationTag", required=True, max_len=1024)
    assert tag is not None
    if len(tag) != TAG_LENGTH:
        raise ValidationError("authenticationTag must be 16 bytes")
    return DecryptRequest(meta, ct, cm, aad, iv, tag)


class WireResult(Protocol):
    """What the service returns for a request: rendered to the response body at the edge."""

    def wire(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class KeyMetadata:
    """GetKeyMetadata: an AES-256 key, what it may be used for and whether it is enabled."""

    usages: tuple[str, ...]
    status: str

    def wire(self) -> dict[str, Any]:
        return {"keySpec": "AES_256", "keyUsage": list(self.usages), "keyStatus": self.status}


@dataclass(frozen=True, slots=True)
class Encrypted:
    """Encrypt: the ciphertext and tag apart, the IV, our ciphertextMetadata, and the CDIV
    when one was asked for."""

    ciphertext: bytes
    ciphertext_metadata: bytes
    iv: bytes
    tag: bytes
    cdiv: bytes | None = None

    def wire(self) -> dict[str, Any]:
        out = {
            "ciphertext": b64(self.ciphertext),
            "ciphertextMetadata": b64(self.ciphertext_metadata),
            "initializationVector": b64(self.iv),
            "authenticationTag": b64(self.tag),
        }
        if self.cdiv is not None:
            out["ciphertextDataIntegrityValue"] = b64(self.cdiv)
        return out


@dataclass(frozen=True, slots=True)
class Decrypted:
    """Decrypt: the plaintext."""

    plaintext: bytes

    def wire(self) -> dict[str, Any]:
        return {"plaintext": b64(self.plaintext)}


@dataclass(frozen=True, slots=True)
class EkmDetail:
    """One HSM in GetHealthStatus's ekmFleetDetails."""

    id: str
    model: str
    state: str  # ACTIVE, DEGRADED or UNAVAILABLE


@dataclass(frozen=True, slots=True)
class HealthReport:
    """GetHealthStatus."""

    fleet_size: int
    proxy_vendor: str
    proxy_model: str
    ekm_vendor: str
    hsms: tuple[EkmDetail, ...]

    def wire(self) -> dict[str, Any]:
        return {
            "xksProxyFleetSize": self.fleet_size,
            "xksProxyVendor": self.proxy_vendor,
            "xksProxyModel": self.proxy_model,
            "ekmVendor": self.ekm_vendor,
            "ekmFleetDetails": [
                {"id": h.id, "model": h.model, "healthStatus": h.state} for h in self.hsms
            ],
        }


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def dumps(obj: dict[str, Any]) -> bytes:
    """Single-line compact JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()
