"""The import token of ``keys import-params`` (``ImportToken.bin``): opaque to the customer,
integrity-protected by the HSM that holds the wrapping key.

Format::

    b"XKSIT1" || u32_be(len(body)) || body || HMAC-SHA256(key, everything before it)

``body`` is canonical JSON (sorted keys, no spaces): ``keyId``, ``wrappingKeyId`` (hex),
``wrappingAlgorithm``, ``wrappingKeySpec``, ``publicKeySha256`` (hex SHA-256 of
``WrappingPublicKey.bin``), ``hsm`` (name), ``issued`` and ``expires`` (UTC).  Nothing in it is
secret; the MAC makes it tamper-evident.  The MAC is computed and verified inside the HSM
(``CKM_SHA256_HMAC``) by the *token key*: a 256-bit ``CKK_GENERIC_SECRET`` token object that is
private, sensitive, never extractable and allowed only to sign and verify, created on that HSM
the first time a token is issued and kept (it is not per token).  It has ``CKA_ID``
:data:`TOKEN_KEY_ID` and no label: ``keys list`` looks at every labelled secret key as an
external key, and would warn about a labelled key that is not AES.  A token issued by another
HSM (or another rig) fails verification like an altered one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from xksproxy.errors import KeyAdminError
from xksproxy.hsm import objects
from xksproxy.keys.wrapping import ALGORITHMS, SPECS

MAGIC = b"XKSIT1"
TOKEN_KEY_ID = b"xksproxy-import-token-key"
MAC_BYTES = 32
NOT_VALID = "the import token is not valid (altered, or issued by another HSM)"
_TOKEN_KEY = {
    Attribute.CLASS: ObjectClass.SECRET_KEY,
    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
    Attribute.ID: TOKEN_KEY_ID,
    Attribute.TOKEN: True,
}


@dataclass(frozen=True)
class ImportToken:
    key_id: str
    wrapping_key_id: bytes
    algorithm: str
    spec: str
    public_key_sha256: str
    hsm: str
    issued: datetime
    expires: datetime

    def body(self) -> bytes:
        data = {
            "keyId": self.key_id,
            "wrappingKeyId": self.wrapping_key_id.hex(),
            "wrappingAlgorithm": self.algorithm,
            "wrappingKeySpec": self.spec,
            "publicKeySha256": self.public_key_sha256,
            "hsm": self.hsm,
            "issued": objects.format_time(self.issued),
            "expires": objects.format_time(self.expires),
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_body(cls, body: bytes) -> ImportToken:
        """Parse a body; ValueError (or KeyError, TypeError) if it is not one of ours."""
        data = json.loads(body)
        fields = (data["keyId"], data["wrappingAlgorithm"], data["wrappingKeySpec"], data["hsm"])
        if not all(isinstance(f, str) for f in fields):
            raise ValueError("bad field")
        if data["wrappingAlgorithm"] not in ALGORITHMS or data["wrappingKeySpec"] not in SPECS:
            raise ValueError("unknown algorithm")
        digest = data["publicKeySha256"]
        if not isinstance(digest, str) or len(bytes.fromhex(digest)) != 32:
            raise ValueError("bad digest")
        return cls(
            key_id=data["keyId"],
            wrapping_key_id=bytes.fromhex(data["wrappingKeyId"]),
            algorithm=data["wrappingAlgorithm"],
            spec=data["wrappingKeySpec"],
            public_key_sha256=digest,
            hsm=data["hsm"],
            issued=objects.parse_time(data["issued"]),
            expires=objects.parse_time(data["expires"]),
        )


def _signed_part(body: bytes) -> bytes:
    return MAGIC + len(body).to_bytes(4, "big") + body


def _token_keys(session: pkcs11.Session) -> list[Any]:
    return list(session.get_objects(_TOKEN_KEY))


def sign(session: pkcs11.Session, token: ImportToken) -> tuple[bytes, Any]:
    """The token's bytes, and the token key if this call created it (else None)."""
    keys, created = _token_keys(session), None
    if not keys:
        created = session.generate_key(
            KeyType.GENERIC_SECRET,
            256,
            id=TOKEN_KEY_ID,
            store=True,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.DECRYPT: False,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            },
        )
        keys = [created]
    signed = _signed_part(token.body())
    mac = bytes(keys[0].sign(signed, mechanism=Mechanism.SHA256_HMAC))
    return signed + mac, created


def verify(session: pkcs11.Session, raw: bytes) -> ImportToken:
    """The token in *raw*, once its MAC verifies in this HSM; KeyAdminError otherwise.

    PKCS#11 errors of the HSM itself pass through (the caller says where they happened).
    """
    head = len(MAGIC) + 4
    if len(raw) < head + MAC_BYTES or not raw.startswith(MAGIC):
        raise KeyAdminError(NOT_VALID)
    size = int.from_bytes(raw[len(MAGIC) : head], "big")
    if len(raw) != head + size + MAC_BYTES:
        raise KeyAdminError(NOT_VALID)
    signed, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    # Two token keys exist only if two import-params raced to create one: either may have signed.
    if not any(
        k.verify(signed, mac, mechanism=Mechanism.SHA256_HMAC) for k in _token_keys(session)
    ):
        raise KeyAdminError(NOT_VALID)
    try:
        return ImportToken.from_body(raw[head:-MAC_BYTES])
    except (ValueError, KeyError, TypeError) as exc:  # signed by us, so never expected
        raise KeyAdminError(NOT_VALID) from exc
