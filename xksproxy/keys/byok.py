"""Bring your own key: ``keys import-params`` and ``keys import``, as KMS's
GetParametersForImport and ImportKeyMaterial (docs/byok.md is the operator's walkthrough).

Blocking functions over logged-in sessions, one per HSM (``create.admin_sessions``).

1. ``import-params`` checks the key id and the key's state, generates an RSA wrapping key pair
   on the **first configured HSM** (:mod:`xksproxy.keys.wrapping_keys`), and proves that this
   HSM can unwrap with the chosen algorithm (:func:`xksproxy.keys.wrapping.self_test`): 32
   random bytes are wrapped in software with the new public key and unwrapped inside the HSM,
   and their check values must agree.  An HSM that refuses the mechanism or its parameters
   (SoftHSM 2.6: RSA-OAEP with SHA-256) is reported with the algorithms it can use, and
   nothing is kept.  Then it writes
   ``WrappingPublicKey.bin`` and the signed ``ImportToken.bin``
   (:mod:`xksproxy.keys.import_token`), valid 24 hours.  Existing files there are
   overwritten: neither is secret.
2. ``import`` verifies the token inside that HSM, its expiry, its key id, and that its
   wrapping key still exists; checks the key's state again; unwraps the material inside the HSM
   into a session object and checks that it is 32 bytes; then stores it as a new key (version
   1) or as the next version of an existing key on every HSM, with the same skeleton as
   ``keys create`` and ``keys rotate`` (:func:`create.add_version_everywhere`: rollback on
   failure, check values compared, metadata written last).  The material reaches the other
   HSMs as replication's transport secret does: every HSM derives a key-encryption key (KEK)
   from its copy of that secret (:data:`KEK_DATA`); the first HSM wraps the material under its
   KEK (RFC 3394) and every HSM, the first included, unwraps that blob into the token object,
   so every copy gets exactly :func:`store.key_template`'s attributes (``C_CopyObject``
   cannot make a non-extractable copy extractable under a trusted key, nor set
   ``CKA_WRAP_WITH_TRUSTED``).  The stored copies' check values must equal the material's.
   After success the wrapping key pair is destroyed: a token is good for one import.

Every refusal happens before anything is changed, and a failure while storing is rolled back
on every HSM; either way the token stays good for another try.  A new version keeps the key's
usage; a new key takes ``--usage`` (as ``keys create``).  Versions record origin ``imported``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.hsm import objects
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.keys import import_token, wrapping, wrapping_keys
from xksproxy.keys.create import CreatedKey, add_version_everywhere, clear_unfinished_create
from xksproxy.keys.locks import key_lock
from xksproxy.keys.sessions import Sessions, step
from xksproxy.keys.store import USAGES, check_new_key, destroy_quietly, key_holders
from xksproxy.keys.transport import NO_USE, SESSION_ONLY
from xksproxy.keys.versions import mend, read_copies, require_alike

DEFAULT_USAGE = "encrypt,decrypt"
#: Derivation data of the key-encryption key: two blocks distinct from replication's.
KEK_DATA = b"xksproxy-kek-v01" + b"xksproxy-kek-v02"
PUBLIC_KEY_FILE, TOKEN_FILE = "WrappingPublicKey.bin", "ImportToken.bin"


@dataclass(frozen=True)
class ImportParams:
    key_id: str
    algorithm: str
    spec: str
    public_key: Path
    token: Path
    expires: datetime
    hsm: str


@dataclass(frozen=True)
class ImportedKey:
    version: int
    created: CreatedKey
    wrapping_key_destroyed: bool  # False: it stays until keys purge-due after it expires
    # True: an earlier run with this token, interrupted, had made the version; nothing new
    already: bool = False


@dataclass(frozen=True)
class _Plan:
    """What an import makes: *version* with this usage, and each HSM's metadata before it."""

    version: int
    usage: tuple[bool, bool]
    metas: dict[str, objects.KeyMeta]
    # The check values of the key's versions: new material must differ from every one.
    kcvs: dict[int, str | None] = field(default_factory=dict)


def _check_id(key_id: str, usage: str | None, reserved: Collection[str]) -> None:
    if key_id == wrapping_keys.WRAPPING_LABEL:
        raise KeyAdminError(f"{key_id!r} is the label of the import wrapping keys")
    check_new_key(key_id, usage or DEFAULT_USAGE, reserved)


def _plan(sessions: Sessions, key_id: str, usage: str | None) -> _Plan:
    """A new key, or the next version of one that is alike on every HSM and not being deleted."""
    holders = key_holders(sessions, key_id)
    if not holders:
        return _Plan(
            1, USAGES[usage or DEFAULT_USAGE], {c.name: objects.KeyMeta() for c, _ in sessions}
        )
    present = require_alike(key_id, read_copies(sessions, key_id), "import into")
    ref = next(iter(present.values()))
    if ref.meta.status == "PENDING_DELETION":
        raise KeyAdminError(
            f"key {key_id!r} is pending deletion: cancel the deletion first "
            "(xksproxy keys cancel-deletion)"
        )
    have = (ref.info.can_encrypt, ref.info.can_decrypt)
    if not any(have):
        raise KeyAdminError(f"key {key_id!r} has usage none: a new version could not be used")
    if usage is not None and USAGES[usage] != have:
        shown = ",".join(u.lower() for u in ref.info.usages)
        raise KeyAdminError(
            f"key {key_id!r} exists with usage {shown}, which a new version keeps: "
            "leave out --usage"
        )
    metas = {hsm: c.meta for hsm, c in present.items()}
    return _Plan(max(ref.info.versions) + 1, have, metas, dict(ref.kcv))


def _algorithm(name: str, spec: str) -> tuple[wrapping.Algorithm, int]:
    if name not in wrapping.ALGORITHMS:
        raise KeyAdminError(f"unknown wrapping algorithm {name!r}")
    if spec not in wrapping.SPECS:
        raise KeyAdminError(f"unknown wrapping key spec {spec!r}")
    return wrapping.ALGORITHMS[name], wrapping.SPECS[spec]


def import_params(
    sessions: Sessions,
    key_id: str,
    algorithm: str,
    spec: str,
    out_dir: Path,
    reserved: Collection[str],
    now: datetime,
) -> ImportParams:
    """Make a wrapping key and import token for *key_id*; write them into *out_dir*."""
    _check_id(key_id, None, reserved)
    alg, bits = _algorithm(algorithm, spec)
    if not sessions:
        raise KeyAdminError("no HSM is configured")
    _plan(sessions, key_id, None)
    if out_dir.exists() and not out_dir.is_dir():
        raise KeyAdminError(f"--out {out_dir}: not a directory")
    config, session = sessions[0]
    wrapping_id, expires = os.urandom(16), now + wrapping_keys.LIFETIME
    made: list[Any] = []
    try:
        with step(config.name, "recording the wrapping key"):
            made.append(wrapping_keys.write_record(session, wrapping_id, key_id, expires))
        with step(config.name, f"generating the {spec} wrapping key pair"):
            public, private = wrapping_keys.generate_pair(session, bits, wrapping_id)
            made += [public, private]
            spki = wrapping_keys.spki_der(public)
        wrapping.self_test(config, session, private, alg, bits, spki)
        token = import_token.ImportToken(
            key_id, wrapping_id, alg.name, spec, hashlib.sha256(spki).hexdigest(),
            config.name, now, expires,
        )  # fmt: skip
        with step(config.name, "signing the import token"):
            raw, token_key = import_token.sign(session, token)
            if token_key is not None:
                made.append(token_key)
        public_path, token_path = _write(out_dir, {PUBLIC_KEY_FILE: spki, TOKEN_FILE: raw})
    except BaseException:
        for obj in reversed(made):
            destroy_quietly(obj)
        raise
    return ImportParams(key_id, alg.name, spec, public_path, token_path, expires, config.name)


def _write(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write *files* into *out_dir* (made 0700 if missing); on failure remove what was written."""
    made_dir = not out_dir.exists()
    written: list[Path] = []
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in files.items():
            path = out_dir.resolve() / name
            path.write_bytes(data)
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise KeyAdminError(f"cannot write into {out_dir}: {exc.strerror or exc}") from exc
    return written


def import_key(
    sessions: Sessions,
    key_id: str,
    wrapped: bytes,
    raw_token: bytes,
    usage: str | None,
    reserved: Collection[str],
    now: datetime,
) -> ImportedKey:
    """Import the *wrapped* material for *key_id* on every HSM, as *raw_token* allows."""
    _check_id(key_id, usage, reserved)
    if not sessions:
        raise KeyAdminError("no HSM is configured")
    with key_lock(key_id):
        return _import(sessions, key_id, wrapped, raw_token, usage, now)


def _import(
    sessions: Sessions,
    key_id: str,
    wrapped: bytes,
    raw_token: bytes,
    usage: str | None,
    now: datetime,
) -> ImportedKey:
    config, session = sessions[0]
    with step(config.name, "verifying the import token"):
        token = import_token.verify(session, raw_token)
    if token.key_id != key_id:
        raise KeyAdminError(f"the import token was issued for key {token.key_id!r}, not {key_id!r}")
    clear_unfinished_create(sessions, key_id)  # an import of a new key cut short
    if key_holders(sessions, key_id):  # a re-run of an import cut short: no duplicate
        mend(sessions, key_id)
        done = _imported_with(sessions, key_id, token)
        if done is not None:
            return done
    if now >= token.expires:
        raise KeyAdminError(
            f"the import token expired at {objects.format_time(token.expires)}; "
            "run keys import-params again"
        )
    with step(config.name, "finding the wrapping key"):
        pair = wrapping_keys.find_pair(session, token.wrapping_key_id)
        if pair is not None and wrapping_keys.spki_sha256(pair[0]) != token.public_key_sha256:
            pair = None
    if pair is None:
        raise KeyAdminError(
            "the wrapping key of this import token no longer exists "
            "(already used, or expired and purged)"
        )
    plan = _plan(sessions, key_id, usage)
    alg, bits = _algorithm(token.algorithm, token.spec)
    wrapping.check_size(alg, bits, wrapped)
    material = _unwrap(config, session, pair[1], alg, wrapped, bits)
    try:
        with step(config.name, "checking the key material"):
            kcvs = wrapping.check_material(session, material)
        expected = kcvs[0] if plan.usage[0] else kcvs[1] if plan.usage[1] else None
        same = [v for v, kcv in sorted(plan.kcvs.items()) if kcv is not None and kcv == expected]
        if same:
            # A version of the same material rotates nothing: its ciphertexts are the old ones'.
            raise KeyAdminError(
                f"this key material is already version {same[0]} of {key_id!r} "
                f"(check value {expected}): import new material to rotate the key"
            )
        tag = token.wrapping_key_id.hex()
        metas = {
            h: m.with_version(plan.version, now, "imported", tag) for h, m in plan.metas.items()
        }
        created = add_version_everywhere(
            sessions,
            key_id,
            plan.version,
            *plan.usage,
            metas,
            store=_Carrier(session, material).store,
            expected_kcv=expected,
            action="importing",
        )
    finally:
        destroy_quietly(material)
    return ImportedKey(plan.version, created, _used_up(session, token))


def _used_up(session: pkcs11.Session, token: import_token.ImportToken) -> bool:
    """Destroy *token*'s wrapping key pair: a token is good for one import.  False if that
    failed (the import stands; purge-due removes the pair after the token expires)."""
    try:
        return wrapping_keys.destroy(session, token.wrapping_key_id)
    except PKCS11Error:
        return False


def _imported_with(
    sessions: Sessions, key_id: str, token: import_token.ImportToken
) -> ImportedKey | None:
    """The import *token* already made, if the key's newest version is recorded on every HSM
    as imported with it and the token's wrapping key is still there: a run killed after
    recording (before it destroyed the wrapping key) is then finished, not repeated as a new
    version of the same material.  With the wrapping key gone, that run had finished: the
    token is used up, and said so."""
    present = require_alike(key_id, read_copies(sessions, key_id), "import into")
    ref = next(iter(present.values()))
    version = max(ref.info.versions)
    tag = token.wrapping_key_id.hex()
    records = [c.meta.versions.get(version) for c in present.values()]
    if any(r is None or r.import_token != tag for r in records):
        return None
    if wrapping_keys.find_pair(sessions[0][1], token.wrapping_key_id) is None:
        raise KeyAdminError(
            f"this import token was already used: it made version {version} of {key_id!r}"
        )
    kcv = {hsm: c.kcv.get(version) for hsm, c in present.items()}
    made = CreatedKey(ref.info, kcv, None)
    return ImportedKey(version, made, _used_up(sessions[0][1], token), already=True)


def _unwrap(
    config: HsmConfig,
    session: pkcs11.Session,
    private: Any,
    alg: wrapping.Algorithm,
    wrapped: bytes,
    bits: int,
) -> Any:
    try:
        with step(config.name, "unwrapping the key material"):
            return wrapping.unwrap(session, private, alg, wrapped, bits)
    except wrapping.RefusedError as exc:
        raise KeyAdminError(f"HSM {config.name} refused {exc.what} ({exc.ckr})") from exc
    except KeyAdminError as exc:
        cause = exc.__cause__
        if not isinstance(cause, wrapping.BAD_INPUT):
            raise
        name = ckr_name(cause)
        raise KeyAdminError(
            f"the key material could not be unwrapped "
            f"({type(cause).__name__ if name == 'CKR_UNKNOWN' else name}): it was not wrapped "
            f"with this import token's {PUBLIC_KEY_FILE} using {alg.name}, or it is damaged"
        ) from cause


class _Carrier:
    """The ``store`` of an import (:data:`create.Store`): the material, a session object
    on *origin* (the first HSM), goes to each HSM under a KEK derived from its transport secret."""

    def __init__(self, origin: pkcs11.Session, material: Any) -> None:
        self.origin, self.material = origin, material
        self.blob: bytes | None = None

    def store(
        self,
        session: pkcs11.Session,
        secret: Any,
        key_id: str,
        version: int,
        template: dict[Attribute, Any],
        made: Any,
    ) -> Any:
        first = session is self.origin
        kek = secret.derive_key(
            KeyType.AES,
            256,
            store=False,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=KEK_DATA,
            template={
                **SESSION_ONLY,
                **NO_USE,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.WRAP: first,
                Attribute.UNWRAP: True,
            },
        )
        made.ephemeral.append(kek)
        if first:
            self.blob = bytes(kek.wrap_key(self.material, mechanism=Mechanism.AES_KEY_WRAP))
        if self.blob is None:
            raise KeyAdminError("the material must be stored on its own HSM first")
        key = kek.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            self.blob,
            label=key_id,
            id=objects.version_id(version),
            mechanism=Mechanism.AES_KEY_WRAP,
            store=True,
            template=template,
        )
        made.drop(kek)
        return key


def purge_expired_wrapping_keys(session: pkcs11.Session, now: datetime) -> int:
    """Destroy the wrapping keys whose import token expired by *now* (and leftovers without a
    record) in this HSM's token; how many.  For ``keys purge-due``, on the first HSM (the
    others hold none, so calling it for every HSM is harmless)."""
    return wrapping_keys.purge_expired(session, now)
