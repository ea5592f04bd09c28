"""Creating, listing, enabling and disabling external keys, and the health key.

Blocking functions on a logged-in PKCS#11 session; the CLI calls them.  Keys are generated
inside the HSM as token objects: sensitive, never extractable, allowed only what their usage
names (DESIGN.md §3, §6).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyNotFoundError
from xksproxy.hsm import objects
from xksproxy.hsm.base import KeyInfo
from xksproxy.hsm.pkcs11_backend import find_key_blocking
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.hsm.pkcs11_lib import find_token, load_library

KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
USAGES = {
    "encrypt,decrypt": (True, True),
    "decrypt,encrypt": (True, True),
    "encrypt": (True, False),
    "decrypt": (False, True),
    "none": (False, False),
}


class KeyAdminError(Exception):
    """A key command cannot be done; the message is for the operator."""


@contextlib.contextmanager
def admin_session(config: HsmConfig) -> Iterator[pkcs11.Session]:
    """A read-write session logged in as the user, closed (and logged out) afterwards."""
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
        session = token.open(user_pin=config.read_pin(), rw=True)
    except PKCS11Error as exc:
        raise KeyAdminError(f"HSM {config.name}: login failed ({ckr_name(exc)})") from exc
    try:
        yield session
    finally:
        session.close()


def check_key_id(key_id: str) -> None:
    if not KEY_ID_RE.match(key_id):
        raise KeyAdminError("key ids are 1-128 characters of A-Z a-z 0-9 . _ -")


def _generate(session: pkcs11.Session, label: str, version: int, enc: bool, dec: bool) -> None:
    session.generate_key(
        KeyType.AES,
        256,
        label=label,
        id=objects.version_id(version),
        store=True,
        template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: enc,
            Attribute.DECRYPT: dec,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        },
    )


def _exists(session: pkcs11.Session, label: str) -> bool:
    for _ in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}):
        return True
    return False


def create_key(session: pkcs11.Session, key_id: str, usage: str, reserved: str) -> KeyInfo:
    """Generate version 1 of a new key; refuse an id that exists or is reserved."""
    check_key_id(key_id)
    if key_id == reserved:
        raise KeyAdminError(f"{key_id!r} is the health key's label and cannot back a KMS key")
    if usage not in USAGES:
        raise KeyAdminError("usage must be one of: encrypt,decrypt | encrypt | decrypt | none")
    if _exists(session, key_id):
        raise KeyAdminError(f"key {key_id!r} already exists")
    enc, dec = USAGES[usage]
    _generate(session, key_id, 1, enc, dec)
    set_status(session, key_id, "ENABLED")
    info, _ = find_key_blocking(session, key_id)
    return info


def set_status(session: pkcs11.Session, key_id: str, status: str) -> None:
    """Record ENABLED or DISABLED in the key's state object (replacing any earlier one)."""
    for old in list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.LABEL: key_id,
                Attribute.APPLICATION: objects.STATE_APPLICATION,
            }
        )
    ):
        old.destroy()
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: key_id,
            Attribute.APPLICATION: objects.STATE_APPLICATION,
            Attribute.VALUE: objects.KeyState(status).to_bytes(),
        }
    )


def change_status(session: pkcs11.Session, key_id: str, status: str) -> KeyInfo:
    """Enable or disable an existing key."""
    check_key_id(key_id)
    try:
        find_key_blocking(session, key_id)
    except KeyNotFoundError:
        raise KeyAdminError(f"key {key_id!r} does not exist") from None
    set_status(session, key_id, status)
    return find_key_blocking(session, key_id)[0]


@dataclass(frozen=True)
class KeySummary:
    key_id: str
    status: str
    usages: tuple[str, ...]
    versions: tuple[int, ...]


def list_keys(session: pkcs11.Session, reserved: str) -> list[KeySummary]:
    """Every external key in the token (the health key excluded), sorted by id."""
    labels = set()
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        label = obj[Attribute.LABEL]
        if label and label != reserved:
            labels.add(label)
    out = []
    for label in sorted(labels):
        try:
            info, _ = find_key_blocking(session, label)
        except KeyNotFoundError:
            continue  # not an AES-256 key
        out.append(KeySummary(label, info.status.value, info.usages, tuple(sorted(info.versions))))
    return out


def ensure_health_key(session: pkcs11.Session, label: str) -> bool:
    """Create the dedicated health key and record its known answer; False if it exists."""
    if _exists(session, label):
        return False
    _generate(session, label, 1, True, True)
    key: Any = session.get_key(label=label, object_class=ObjectClass.SECRET_KEY)
    expected = key.encrypt(
        objects.KAT_PLAINTEXT,
        mechanism=Mechanism.AES_GCM,
        mechanism_param=GCMParams(objects.KAT_IV, objects.KAT_AAD, 128),
    )
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: label,
            Attribute.APPLICATION: objects.KAT_APPLICATION,
            Attribute.VALUE: bytes(expected),
        }
    )
    return True
