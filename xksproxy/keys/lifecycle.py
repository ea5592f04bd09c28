"""Key administration on one HSM: sessions, key versions, state objects, the health key.

Blocking functions on a logged-in PKCS#11 session.  Keys are token objects: sensitive, never
extractable, allowed only what their usage names (docs/architecture.md §3, §6).  The commands
act on every configured HSM through :mod:`xksproxy.keys.create` (creating a key with the
same material everywhere) and :mod:`xksproxy.keys.fleet` (listing, state, health keys), built on
these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import PKCS11Error

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError, XksError
from xksproxy.hsm import gcm, objects
from xksproxy.hsm.base import KeyInfo
from xksproxy.hsm.keystore import (
    STATE_RECORDS,
    data_template,
    find_key_blocking,
    read_kat_blocking,
    read_meta_blocking,
    token_key_template,
)
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.hsm.pkcs11_lib import FunctionList, find_token, load_library
from xksproxy.models import KEY_ID_RE

#: The open sessions of a key command, one per configured HSM.
Sessions = Sequence[tuple[HsmConfig, pkcs11.Session]]
RESERVED_PREFIX = "xksproxy-"
USAGES = {
    "encrypt,decrypt": (True, True),
    "decrypt,encrypt": (True, True),
    "encrypt": (True, False),
    "decrypt": (False, True),
    "none": (False, False),
}


@contextlib.contextmanager
def admin_session(config: HsmConfig, so_pin: str | None = None) -> Iterator[pkcs11.Session]:
    """A read-write session logged in as the user (or, given *so_pin*, as the security
    officer), closed (and logged out) afterwards.  Finding the token and logging in are done
    under the HSM's login lock (:func:`xksproxy.keys.locks.login_lock`)."""
    from xksproxy.keys.locks import login_lock

    with login_lock(config.name):
        session = _log_in(config, so_pin)
    try:
        yield session
    finally:
        # A failing close (a device that died meanwhile) must not hide what happened before.
        with contextlib.suppress(PKCS11Error), login_lock(config.name):
            session.close()


def _log_in(config: HsmConfig, so_pin: str | None) -> pkcs11.Session:
    try:
        lib = load_library(str(config.module), config.env, config.name)
        token = find_token(lib, config.token_label, config.token_serial)
    except PKCS11Error as exc:
        raise KeyAdminError(
            f"HSM {config.name}: {config.token_desc} not found ({ckr_name(exc)})"
        ) from exc
    except Exception as exc:
        raise KeyAdminError(f"HSM {config.name}: cannot load {config.module}: {exc}") from exc
    try:
        if so_pin is None:
            return token.open(user_pin=config.read_pin(), rw=True)
        return token.open(so_pin=so_pin, rw=True)
    except PKCS11Error as exc:
        if so_pin is None:
            raise KeyAdminError(f"HSM {config.name}: login failed ({ckr_name(exc)})") from exc
        raise KeyAdminError(
            f"HSM {config.name}: security officer login failed ({ckr_name(exc)}); "
            f"check {so_pin_source(config)}"
        ) from exc


def so_pin_source(config: HsmConfig) -> str:
    """Where *config* takes its security officer PIN from, for messages."""
    if config.so_pin_env is not None:
        return f"${config.so_pin_env} (so_pin_env)"
    return f"so_pin_file {config.so_pin_file}"


@contextlib.contextmanager
def step(hsm: str, what: str) -> Iterator[None]:
    """Turn a failure of one step on *hsm* into a KeyAdminError saying where and what."""
    try:
        yield
    except PKCS11Error as exc:
        name = ckr_name(exc)
        if name == "CKR_UNKNOWN":
            name = type(exc).__name__
        raise KeyAdminError(f"HSM {hsm}: {what} failed ({name})") from exc
    except XksError as exc:  # find_key_blocking: not an AES-256 key, a damaged key
        why = getattr(exc, "detail", None) or exc.message
        raise KeyAdminError(f"HSM {hsm}: {what} failed ({why})") from exc


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


def functions_of(config: HsmConfig) -> FunctionList:
    """The function list of *config*'s module (loaded already by :func:`admin_session`)."""
    return load_library(str(config.module), config.env, config.name).functions


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
