"""The key objects of one token, as the key commands read and write them: the template of a
key version, generating one, a key's state record, the copy of a key an HSM holds
(:class:`KeyCopy`), labels, the health key, and the rules for a new key's id and usage.

Blocking functions on a logged-in PKCS#11 session (:mod:`xksproxy.keys.sessions`).  Keys are
token objects: sensitive, never extractable, allowed only what their usage names
(docs/architecture.md §3, §6).  How the proxy itself finds them is
:mod:`xksproxy.hsm.keystore`; this module builds on it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import PKCS11Error

from xksproxy.errors import KeyAdminError
from xksproxy.hsm import gcm, objects
from xksproxy.hsm.base import KeyInfo, KeyStatus
from xksproxy.hsm.kcv import kcv_blocking
from xksproxy.hsm.keystore import (
    STATE_RECORDS,
    data_template,
    find_key_blocking,
    read_kat_blocking,
    read_meta_blocking,
    token_key_template,
)
from xksproxy.hsm.pkcs11_lib import FunctionList
from xksproxy.keys.sessions import Sessions, step
from xksproxy.models import KEY_ID_RE

RESERVED_PREFIX = "xksproxy-"
USAGES = {
    "encrypt,decrypt": (True, True),
    "decrypt,encrypt": (True, True),
    "encrypt": (True, False),
    "decrypt": (False, True),
    "none": (False, False),
}


def destroy_quietly(obj: Any) -> bool:
    """Destroy a PKCS#11 object; False if the HSM refused."""
    try:
        obj.destroy()
    except PKCS11Error:
        return False
    return True


def check_key_id(key_id: str) -> None:
    if not KEY_ID_RE.match(key_id):
        raise KeyAdminError("key ids are 1-128 characters of A-Z a-z 0-9 . _ -")


def check_new_key(key_id: str, usage: str, reserved: Collection[str]) -> tuple[bool, bool]:
    """Validate a new key's id and usage; the (encrypt, decrypt) flags of the usage."""
    check_key_id(key_id)
    if key_id in reserved:
        raise KeyAdminError(f"{key_id!r} is the health key's label and cannot back a KMS key")
    if key_id.startswith(RESERVED_PREFIX):
        raise KeyAdminError(
            f"ids beginning with {RESERVED_PREFIX!r} are kept for the proxy's own objects "
            "(health key, import wrapping keys, transport keys)"
        )
    if usage not in USAGES:
        raise KeyAdminError("usage must be one of: encrypt,decrypt | encrypt | decrypt | none")
    return USAGES[usage]


def key_template(enc: bool, dec: bool) -> dict[Attribute, Any]:
    """The attributes of every external key version: a private, sensitive token object,
    allowed to encrypt and decrypt as its usage says and nothing else.

    It is extractable only wrapped under a key the token's security officer marked trusted
    (``CKA_WRAP_WITH_TRUSTED``): the PKCS#11 way to let ``keys replicate`` copy it to
    another HSM (xksproxy/keys/replicate.py) while the user PIN alone can never get it out.
    """
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True,
        Attribute.WRAP_WITH_TRUSTED: True,
        Attribute.ENCRYPT: enc,
        Attribute.DECRYPT: dec,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


def generate_version(
    session: pkcs11.Session, label: str, version: int, enc: bool, dec: bool
) -> Any:
    """Generate one key version in place, as a token object with :func:`key_template`."""
    return session.generate_key(
        KeyType.AES,
        256,
        label=label,
        id=objects.version_id(version),
        store=True,
        template=key_template(enc, dec),
    )


def key_exists(session: pkcs11.Session, label: str) -> bool:
    """Whether the token holds a secret key labelled *label* (of any type or version)."""
    for _ in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}):
        return True
    return False


def key_holders(sessions: Sessions, key_id: str) -> list[str]:
    """The names of the HSMs whose token holds a key labelled *key_id*."""
    holders = []
    for config, session in sessions:
        with step(config.name, f"looking for {key_id!r}"):
            if key_exists(session, key_id):
                holders.append(config.name)
    return holders


def write_meta(session: pkcs11.Session, key_id: str, meta: objects.KeyMeta) -> Any:
    """Make *meta* the key's metadata in force: written with the next revision, then the
    older objects destroyed (``objects`` says why in two steps).  The new object."""
    old = list(session.get_objects(data_template(key_id, objects.STATE_APPLICATION)))
    revisions = [objects.KeyMeta.from_bytes(bytes(o[Attribute.VALUE])).revision for o in old]
    readable = [r for r in revisions if r != objects.UNREADABLE_REVISION]
    new = session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: key_id,
            Attribute.APPLICATION: objects.STATE_APPLICATION,
            Attribute.VALUE: meta.replace(revision=max(readable, default=0) + 1).to_bytes(),
        }
    )
    for obj in old:
        obj.destroy()
    return new


def set_status(session: pkcs11.Session, key_id: str, status: str) -> Any:
    """Record ENABLED or DISABLED in the key's metadata, keeping the rest; the new object."""
    meta = read_meta_blocking(session, key_id)
    return write_meta(session, key_id, meta.replace(status=status))


def key_labels(session: pkcs11.Session, reserved: str) -> list[str]:
    """The labels of the token's secret keys and of its key state records (a create or purge
    cut short may leave a record without keys), the health key's excluded, sorted."""
    labels = set()
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        labels.add(obj[Attribute.LABEL])
    for obj in session.get_objects(STATE_RECORDS):
        labels.add(obj[Attribute.LABEL])
    return sorted(label for label in labels if label and label != reserved)


def objects_by_version(session: pkcs11.Session, key_id: str) -> dict[int, list[Any]]:
    """Every token key object of *key_id* with an xksproxy version id, by version (several
    where commands raced or a crash left a partial object; objects of other ids left out)."""
    out: dict[int, list[Any]] = {}
    for obj in list(session.get_objects(token_key_template(key_id))):
        cka_id = obj.get_attributes([Attribute.ID]).get(Attribute.ID)
        version = objects.parse_version(bytes(cka_id or b""))
        if version is not None:
            out.setdefault(version, []).append(obj)
    return out


def version_objects(
    session: pkcs11.Session, key_id: str, *, unfinished: bool = False
) -> tuple[KeyInfo, dict[int, Any]]:
    """The key as the proxy sees it, and its token object per version; KeyNotFoundError if
    absent.  A version whose object vanished between the two searches is left out.

    One search for the objects, ended before any is used: an encryption started while a
    search is open fails with CKR_OPERATION_ACTIVE.
    """
    info, handles = find_key_blocking(session, key_id, unfinished=unfinished)
    found: dict[int, Any] = {
        obj.handle: obj
        for obj in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_id}
        )
        if obj.handle is not None
    }
    return info, {v: found[h] for v, h in sorted(handles.items()) if h in found}


def ensure_health_key(
    session: pkcs11.Session,
    label: str,
    functions: FunctionList,
    gcm_iv: str = "auto",
    vendor: str = "generic",
) -> bool:
    """Create the dedicated health key and record its known answer; False if it existed.

    The known answer is a fixed plaintext encrypted the way the HSM makes IVs (*gcm_iv*, found
    as the proxy finds it: :func:`xksproxy.hsm.gcm.detect_blocking`), stored with its IV.  An
    existing health key without one gets it now.  When no IV mode fits the token, the key is
    left without a known answer: ``xksproxy check`` then reports the HSM UNAVAILABLE and why.
    """
    created = not key_exists(session, label)
    if created:
        generate_version(session, label, 1, True, True)
    if created or read_kat_blocking(session, label) is None:
        obj: Any = session.get_key(label=label, object_class=ObjectClass.SECRET_KEY)
        key = gcm.RawKey.of(functions, obj)
        found = gcm.detect_blocking(key, gcm_iv, vendor)
        if found.mode is not None:
            iv, expected = gcm.encrypt_blocking(
                key, found.mode, objects.KAT_PLAINTEXT, objects.KAT_AAD
            )
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: label,
                    Attribute.APPLICATION: objects.KAT_APPLICATION,
                    Attribute.VALUE: gcm.encode_kat(iv, expected),
                }
            )
    return created


@dataclass(frozen=True)
class KeyCopy:
    """One HSM's copy of a key, as the key commands read it: the key as the proxy would serve
    it (:class:`KeyInfo`), its state record in force, and the key check value of each version.

    ``keys list``, ``keys show``, rotation and repair compare these across HSMs; ``keys
    replicate``, which copies objects, reads the objects themselves
    (:class:`xksproxy.keys.replicate_plan.KeyObjects`)."""

    info: KeyInfo
    meta: objects.KeyMeta
    kcv: Mapping[int, str | None]  # version -> KCV (None: usage none)

    @classmethod
    def unservable(cls, key_id: str, meta: objects.KeyMeta, why: tuple[str, ...]) -> KeyCopy:
        """A copy with nothing the proxy could serve (a create or purge cut short, a damaged
        key), shown with *why*, one line each."""
        return cls(KeyInfo(key_id, KeyStatus.DISABLED, (), 0, frozenset(), why), meta, {})

    @property
    def status(self) -> str:
        """As recorded: ENABLED, DISABLED, PENDING_DELETION or CREATING."""
        return self.meta.status

    @property
    def usages(self) -> tuple[str, ...]:
        return self.info.usages

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.info.versions))

    @property
    def damaged(self) -> tuple[str, ...]:
        return self.info.damaged

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(sorted(self.info.pending))

    @property
    def current_kcv(self) -> str | None:
        usable = [v for v in self.versions if v not in self.info.pending]
        return self.kcv.get(max(usable)) if usable else None


def version_kcvs(session: pkcs11.Session, key_id: str) -> tuple[KeyInfo, dict[int, str | None]]:
    """The key as the proxy sees it and the KCV of each version (KeyNotFoundError if absent)."""
    info, found = version_objects(session, key_id)
    return info, {version: kcv_blocking(obj) for version, obj in found.items()}


def read_copy(session: pkcs11.Session, key_id: str) -> KeyCopy:
    """This HSM's copy of *key_id*; KeyNotFoundError (UnfinishedKeyError for a create cut
    short) if it has none it could serve, KeyDamagedError if its objects contradict."""
    info, kcv = version_kcvs(session, key_id)
    return KeyCopy(info, read_meta_blocking(session, key_id), kcv)
