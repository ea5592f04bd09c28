"""The token's key objects and state records, as the proxy and the key commands read them.

A key is one AES-256 secret key object per version (labelled with the key id, versions told
apart by an xksproxy version id, ``xks-v<N>``) and its CKO_DATA state records; the health key
also has a recorded known answer (hsm/objects.py).  The proxy
(:mod:`xksproxy.hsm.pkcs11_backend`) and the key commands (:mod:`xksproxy.keys`) find keys,
versions and records with the same functions here, so both decide alike which objects serve.
Every function takes an open session and blocks on PKCS#11 calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pkcs11
import structlog
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import PKCS11Error

from xksproxy.errors import InternalError, KeyNotFoundError, XksError
from xksproxy.hsm import objects
from xksproxy.hsm.base import USAGE_NAMES, KeyInfo, KeyStatus
from xksproxy.hsm.kcv import kcv_blocking

log = structlog.get_logger(__name__)

_USAGE_ATTRS = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.DERIVE,
)
_KEY_ATTRS = [Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID, *_USAGE_ATTRS]


def data_template(label: str, application: str) -> dict[Attribute, Any]:
    """The search for xksproxy's CKO_DATA object of *application* for *label* (hsm/objects.py)."""
    return {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: label,
        Attribute.APPLICATION: application,
    }


#: Every key's state record (its metadata object), whatever the key: for a pass over the token.
STATE_RECORDS: dict[Attribute, Any] = {
    Attribute.CLASS: ObjectClass.DATA,
    Attribute.APPLICATION: objects.STATE_APPLICATION,
}

# Token objects only: session copies (hsm/copies.py) have the same label.
_TOKEN_KEYS: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}


def token_key_template(key_id: str) -> dict[Attribute, Any]:
    """The search for *key_id*'s token key objects (its versions; never its session copies)."""
    return {**_TOKEN_KEYS, Attribute.LABEL: key_id}


def read_kat_blocking(session: pkcs11.Session, label: str) -> bytes | None:
    """The recorded known answer for the health key, if one was recorded."""
    for data in session.get_objects(data_template(label, objects.KAT_APPLICATION)):
        value: Any = data[Attribute.VALUE]
        return bytes(value)
    return None


def read_meta_blocking(session: pkcs11.Session, key_id: str) -> objects.KeyMeta:
    """The key's metadata in force (:func:`xksproxy.hsm.objects.current_meta`)."""
    return objects.current_meta(
        bytes(data[Attribute.VALUE])
        for data in session.get_objects(data_template(key_id, objects.STATE_APPLICATION))
    )


def _aes256(attrs: dict[Any, Any], version: int | None) -> bool:
    """Whether a key object is one the proxy serves: AES with a 32-byte value.

    SoftHSM 2.6 leaves ``CKA_VALUE_LEN`` at 0 on every key made by ``C_UnwrapKey`` (and
    refuses it in the unwrap template), which is how imported and replicated versions are
    made.  An object with an xksproxy version id (``xks-v<N>``) is written only by the key
    commands, which check the length of unwrapped material before storing it
    (:mod:`xksproxy.keys.byok`) or store a copy whose check value equals an AES-256
    original, so for those 0 means "not recorded by the HSM"; any other object must say 32.
    """
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES:
        return False
    length = attrs.get(Attribute.VALUE_LEN)
    return length == 32 or (length in (0, None) and version is not None)


#: The KCV of a key object, by handle (hsm/kcv.py): None for a key without one (usage none);
#: raises PKCS11Error for an object that cannot be used (a write cut short left it partial).
KcvOf = Callable[[int], str | None]


def _one_of(
    version: int, objs: list[tuple[int, tuple[str, ...]]], kcv_of: KcvOf | None
) -> tuple[tuple[int, tuple[str, ...]] | None, str]:
    """Which of a version's several objects to use, and what to report.  Objects that cannot
    be used are passed over; the usable ones must be one key (one KCV), and the lowest handle
    is used (any of them is the same key); otherwise none is."""
    n = len(objs)
    if kcv_of is None:
        return None, f"version {version} has {n} objects, not served"
    kcvs: dict[int, str | None] = {}
    for handle, _ in objs:
        try:
            kcvs[handle] = kcv_of(handle)
        except PKCS11Error:
            continue  # unusable: a partial object
    usable = [o for o in objs if o[0] in kcvs]
    broken = n - len(usable)
    values = {kcvs[h] for h, _ in usable}
    if not usable:
        return None, f"version {version} has {n} objects, none usable, not served"
    if len(values) > 1 or None in values:
        return None, f"version {version} has {n} objects of different material, not served"
    extra = f"{len(usable) - 1} more alike" if len(usable) > 1 else ""
    extra += (", " if extra else "") + (f"{broken} unusable (partial)" if broken else "")
    return min(usable), f"version {version} has {n} objects ({extra}): one is used"


def _key_of(
    key_id: str,
    found: list[tuple[int, dict[Any, Any]]],
    meta: objects.KeyMeta,
    kcv_of: KcvOf | None = None,
) -> tuple[KeyInfo, dict[int, int]]:
    """A key's usable versions, usage and status from its token objects (handle, attributes)
    and metadata; KeyNotFoundError if none is an AES-256 key.

    Deterministic whatever the objects: of a version held by several objects (two commands that
    raced, a crash), those *kcv_of* cannot use are passed over, and the rest are used only if
    they are one key (:func:`_one_of`): of two different keys it is unknown which one a
    ciphertext was made with, so neither serves, and the other versions serve on.  An object
    without an xksproxy version id is version 1 only when it is the only one and no ``xks-v1``
    exists (a key made by other tooling), and is ignored otherwise.
    Encrypt uses the newest usable version the metadata records (``KeyInfo.pending``: those
    it does not).  What was left out is in ``KeyInfo.damaged``; KeyDamagedError if nothing is
    usable."""
    by_version: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
    foreign: list[tuple[int, tuple[str, ...]]] = []
    for handle, attrs in found:
        version = objects.parse_version(attrs.get(Attribute.ID) or b"")
        if not _aes256(attrs, version):
            log.warning("key_object_ignored", key_id=key_id, reason="not AES-256")
            continue
        usages = tuple(
            name for name, attr in zip(USAGE_NAMES, _USAGE_ATTRS, strict=True) if attrs.get(attr)
        )
        if version is None:
            foreign.append((handle, usages))
        else:
            by_version.setdefault(version, []).append((handle, usages))
    damaged: list[str] = []
    if foreign and 1 not in by_version and len(foreign) == 1:
        by_version[1] = foreign
    elif foreign:
        damaged.append(f"{len(foreign)} key objects without a distinct version, ignored")
    versions: dict[int, tuple[int, tuple[str, ...]]] = {}
    for version, objs in sorted(by_version.items()):
        if len(objs) == 1:
            versions[version] = objs[0]
            continue
        chosen, why = _one_of(version, objs, kcv_of)
        damaged.append(why)
        if chosen is not None:
            versions[version] = chosen
    if not versions:
        if damaged:
            raise KeyDamagedError(key_id, tuple(damaged))
        raise KeyNotFoundError()
    # A key whose metadata records its versions (every key made since 0.5) encrypts only with
    # a recorded one: a version is recorded once every HSM holds it, so a rotation cut short
    # never serves a version that some HSM lacks.  Keys without records use every version.
    pending = frozenset(v for v in versions if meta.versions and v not in meta.versions)
    recorded = [v for v in versions if v not in pending]
    if not recorded:
        damaged.append("no version its metadata records is usable")
    current = max(recorded or versions)
    info = KeyInfo(
        key_id=key_id,
        # PENDING_DELETION is DISABLED on the wire: the spec knows only the two.
        status=KeyStatus.ENABLED if meta.serving else KeyStatus.DISABLED,
        usages=versions[current][1],
        current_version=current,
        versions=frozenset(versions),
        damaged=tuple(damaged),
        pending=pending,
    )
    return info, {v: h for v, (h, _) in versions.items()}


#: Why a key whose state record says CREATING does not serve (UnfinishedKeyError, keys list).
UNFINISHED_CREATE = (
    "an unfinished keys create (its metadata still says CREATING; keys create again finishes it)"
)


class UnfinishedKeyError(KeyNotFoundError):
    """A key whose metadata still says CREATING: ``keys create`` (or the import of a new key)
    writes that on every HSM before the key's first objects and replaces it once every HSM
    holds the key, so this is a create cut short.  Not served (KMS must not start using a key
    that may yet be removed); ``keys create`` again finishes or redoes it."""

    def __init__(self, key_id: str) -> None:
        super().__init__(None)
        self.key_id = key_id
        self.detail = UNFINISHED_CREATE


class KeyDamagedError(InternalError):
    """Every object of the key is unusable.  KMS sees a generic message (and the request
    fails over to another HSM, whose copy may be intact); *damaged* goes to logs and commands."""

    default_message = "the key's objects in this HSM cannot be used"

    def __init__(self, key_id: str, damaged: tuple[str, ...]) -> None:
        super().__init__(None)
        self.key_id, self.damaged = key_id, damaged
        self.detail = f"key {key_id!r}: " + "; ".join(damaged)


def find_key_blocking(
    session: pkcs11.Session, key_id: str, *, unfinished: bool = False
) -> tuple[KeyInfo, dict[int, int]]:
    """Read a key's versions, usage and status from the token; KeyNotFoundError if absent, and
    UnfinishedKeyError for a key still CREATING, unless *unfinished* (a create checking what it
    has written so far)."""
    # Token objects only: session copies (hsm/copies.py) have the same label.
    objs = {
        obj.handle: obj
        for obj in session.get_objects(token_key_template(key_id))
        if obj.handle is not None
    }  # the search ends here: no key may be used while it is open (CKR_OPERATION_ACTIVE)
    if not objs:
        raise KeyNotFoundError()
    found = [(handle, obj.get_attributes(_KEY_ATTRS)) for handle, obj in objs.items()]
    meta = read_meta_blocking(session, key_id)
    if not unfinished and meta.status == objects.CREATING:
        raise UnfinishedKeyError(key_id)
    return _key_of(key_id, found, meta, _kcv_by(objs))


def _kcv_by(objs: dict[int, Any]) -> KcvOf:
    return lambda handle: kcv_blocking(objs[handle])


#: What :func:`scan_blocking` found for a key: its metadata and handles, or why it cannot serve.
Scanned = tuple[KeyInfo, dict[int, int]] | XksError


def scan_blocking(session: pkcs11.Session) -> dict[str, Scanned]:
    """Every key of the token in one pass: two searches (key objects, state objects) and one
    attribute read per object, instead of two searches per key.  A SoftHSM search reads every
    object of the token, so looking keys up one by one costs keys x objects."""
    by_label: dict[str, list[tuple[int, dict[Any, Any]]]] = {}
    objs: dict[int, Any] = {}
    for obj in session.get_objects(_TOKEN_KEYS):
        if obj.handle is None:
            continue
        objs[obj.handle] = obj
        attrs = obj.get_attributes([Attribute.LABEL, *_KEY_ATTRS])
        label = attrs.get(Attribute.LABEL)
        if isinstance(label, str):
            by_label.setdefault(label, []).append((obj.handle, attrs))
    states: dict[str, list[bytes]] = {}
    for data in session.get_objects(STATE_RECORDS):
        attrs = data.get_attributes([Attribute.LABEL, Attribute.VALUE])
        label, value = attrs.get(Attribute.LABEL), attrs.get(Attribute.VALUE)
        if isinstance(label, str) and value is not None:
            states.setdefault(label, []).append(bytes(value))
    out: dict[str, Scanned] = {}
    for label, found in by_label.items():
        meta = objects.current_meta(states.get(label, ()))
        if meta.status == objects.CREATING:
            out[label] = UnfinishedKeyError(label)
            continue
        try:
            out[label] = _key_of(label, found, meta, _kcv_by(objs))
        except XksError as exc:  # this key cannot serve; the others can
            out[label] = exc
    for label, raws in states.items():  # a create cut short before its first key object
        if label not in out and objects.current_meta(raws).status == objects.CREATING:
            out[label] = UnfinishedKeyError(label)
    return out
