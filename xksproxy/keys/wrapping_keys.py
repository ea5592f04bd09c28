"""The RSA wrapping keys of ``keys import-params`` / ``keys import``, on the first configured
HSM (:mod:`xksproxy.keys.byok` says how an import goes).

A wrapping key is an RSA key pair of token objects labelled :data:`WRAPPING_LABEL` with a random
16-byte ``CKA_ID`` (the *wrapping key id*).  The private half is sensitive, never extractable
and allowed only to unwrap; the public half is handed to the customer as a DER
SubjectPublicKeyInfo (``WrappingPublicKey.bin``, as KMS's GetParametersForImport gives it).
Beside the pair, a private ``CKO_DATA`` object (label and ``CKA_APPLICATION``
:data:`WRAPPING_LABEL`; a data object cannot carry a ``CKA_ID``) records the id, the key id and
the expiry as JSON, so :func:`purge_expired` can find expired pairs.  The record is written
before the pair and destroyed after it: a pair without a record is a leftover, never one being
made.  An import destroys the pair it used (a token is single-use); ``keys purge-due`` destroys
the pairs whose token expired (:func:`xksproxy.keys.byok.purge_expired_wrapping_keys`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from xksproxy.hsm import objects
from xksproxy.hsm.keystore import data_template
from xksproxy.keys.store import destroy_quietly
from xksproxy.keys.transport import unwrap_only_private

WRAPPING_LABEL = "xksproxy-import"
LIFETIME = timedelta(hours=24)


def generate_pair(session: pkcs11.Session, bits: int, wrapping_id: bytes) -> tuple[Any, Any]:
    """A new wrapping key pair, as token objects: (public, private)."""
    public, private = session.generate_keypair(
        KeyType.RSA,
        bits,
        store=True,
        label=WRAPPING_LABEL,
        id=wrapping_id,
        public_template={
            Attribute.TOKEN: True,
            Attribute.ENCRYPT: False,
            Attribute.VERIFY: False,
            Attribute.WRAP: False,  # the customer wraps with it, never the HSM
            Attribute.DERIVE: False,
        },
        private_template=unwrap_only_private(token=True),
    )
    return public, private


def spki_der(public: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of an RSA public key object."""
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public[Attribute.MODULUS], "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(public: Any) -> str:
    return hashlib.sha256(spki_der(public)).hexdigest()


def write_record(
    session: pkcs11.Session, wrapping_id: bytes, key_id: str, expires: datetime
) -> Any:
    """The record of a wrapping key (written before the pair)."""
    value = {
        "wrappingKeyId": wrapping_id.hex(),
        "keyId": key_id,
        "expires": objects.format_time(expires),
    }
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: WRAPPING_LABEL,
            Attribute.APPLICATION: WRAPPING_LABEL,
            Attribute.VALUE: json.dumps(value, sort_keys=True).encode(),
        }
    )


@dataclass(frozen=True)
class _Record:
    obj: Any
    wrapping_id: bytes | None  # None: unreadable
    expires: datetime | None


def _records(session: pkcs11.Session) -> list[_Record]:
    out = []
    for obj in list(session.get_objects(data_template(WRAPPING_LABEL, WRAPPING_LABEL))):
        try:
            value = json.loads(bytes(obj[Attribute.VALUE]))
            wid = bytes.fromhex(value["wrappingKeyId"])
            out.append(_Record(obj, wid, objects.parse_time(value["expires"])))
        except (ValueError, KeyError, TypeError):
            out.append(_Record(obj, None, None))
    return out


def _pairs(session: pkcs11.Session, wrapping_id: bytes | None = None) -> dict[bytes, list[Any]]:
    """Wrapping key id -> its key objects (public and private), for one id or all."""
    out: dict[bytes, list[Any]] = {}
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        search: dict[Attribute, Any] = {Attribute.CLASS: cls, Attribute.LABEL: WRAPPING_LABEL}
        if wrapping_id is not None:
            search[Attribute.ID] = wrapping_id
        for obj in list(session.get_objects(search)):
            out.setdefault(bytes(obj[Attribute.ID]), []).append(obj)
    return out


def find_pair(session: pkcs11.Session, wrapping_id: bytes) -> tuple[Any, Any] | None:
    """(public, private) of a wrapping key; None unless both exist."""
    found = _pairs(session, wrapping_id).get(wrapping_id, [])
    by_class = {obj[Attribute.CLASS]: obj for obj in found}
    public, private = by_class.get(ObjectClass.PUBLIC_KEY), by_class.get(ObjectClass.PRIVATE_KEY)
    return None if public is None or private is None else (public, private)


def destroy(session: pkcs11.Session, wrapping_id: bytes) -> bool:
    """Destroy a wrapping key pair, then its record; False if the HSM refused any of it."""
    objs = _pairs(session, wrapping_id).get(wrapping_id, [])
    if not all([destroy_quietly(obj) for obj in objs]):
        return False
    records = [r.obj for r in _records(session) if r.wrapping_id == wrapping_id]
    return all([destroy_quietly(obj) for obj in records])


def purge_expired(session: pkcs11.Session, now: datetime) -> int:
    """Destroy every wrapping key whose token has expired at *now* (its pair, then its record),
    unreadable records, and pairs with no record (leftovers); how many of these there were."""
    pairs = _pairs(session)
    records = _records(session)
    recorded = {r.wrapping_id for r in records}
    purged = 0
    for record in records:
        if record.expires is not None and record.expires > now:
            continue
        for obj in pairs.get(record.wrapping_id or b"", []):
            obj.destroy()
        record.obj.destroy()
        purged += 1
    for wid, objs in pairs.items():
        if wid not in recorded:
            for obj in objs:
                obj.destroy()
            purged += 1
    return purged
