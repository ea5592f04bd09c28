"""Creating a key, or a new version of one, with identical material on every HSM, without its
material ever leaving one in the clear.

Blocking functions over logged-in sessions, one per HSM (``admin_sessions``); the CLI and
dev-setup call them.  How a key reaches every HSM:

1. The first HSM generates a fresh AES-256 *transport secret* T as a session object
   (``CKA_TOKEN`` false, sensitive, extractable so that it can be wrapped, allowed to derive).
2. **The transport key** (:mod:`xksproxy.keys.transport`).  For every other HSM, that HSM
   generates an ephemeral RSA-3072 key pair as session objects, for this one operation (the
   first HSM needs none: it derives from T directly).  The private half is sensitive, never
   extractable and allowed only to unwrap.  Only the public half (modulus and exponent) leaves
   the HSM; it is imported into the first HSM as a session object and wraps T with RSA-OAEP.
   The target HSM unwraps the blob into a session object (sensitive, not extractable, allowed
   to derive, and to encrypt for its check value), and the key pair and the imported public key
   are destroyed at once.  So no long-term transport key exists anywhere: T exists outside an
   HSM only as an RSA-OAEP-wrapped blob in this process's memory, which only the target's
   private half could open, and that half never left the target and is destroyed after the
   unwrap.
3. Every HSM (the first one from T itself) derives the key's version 1 from its copy of T with
   ``CKM_AES_ECB_ENCRYPT_DATA`` over :data:`DERIVATION_DATA`, as a token object with exactly the
   attributes of :func:`xksproxy.keys.store.key_template`, and records the ENABLED state.
4. Every ephemeral object is destroyed; the key check value (KCV) of T is compared across HSMs
   before anything is stored, and that of every stored copy afterwards: they must be equal.

An import (:mod:`xksproxy.keys.byok`) takes the same steps with its own step 3 (a ``store``
function): material that exists already on the first HSM is wrapped there under a key derived
from T, and every HSM unwraps it under its own derivation of that key.

Why derive rather than unwrap the key itself: SoftHSM 2.6 leaves ``CKA_VALUE_LEN`` at 0 on a key
made by ``C_UnwrapKey`` (and refuses it in the unwrap template), and the proxy serves only AES
keys whose ``CKA_VALUE_LEN`` is 32.  A derived key takes its length from the template on every
vendor.  The key is AES-256-ECB under T of two distinct constant blocks: the output of a PRF
keyed by a fresh random 256-bit secret, so as strong as T.  The HSMs must support
``CKM_AES_KEY_GEN``, ``CKM_RSA_PKCS_KEY_PAIR_GEN``, ``CKM_RSA_PKCS_OAEP`` (wrap and unwrap),
``CKM_AES_ECB_ENCRYPT_DATA`` (derive) and ``CKM_AES_ECB`` (the KCV).

OAEP parameters: SHA-256 with MGF1-SHA-256 first.  An HSM that refuses them
(``CKR_ARGUMENTS_BAD`` or ``CKR_MECHANISM_PARAM_INVALID``; SoftHSM 2.6 accepts only SHA-1) gets
SHA-1 with MGF1-SHA-1, which OAEP may still use (its security does not rest on collision
resistance).  The transport used is reported with the result.

Check values: a key with usage ``none`` has no KCV (:mod:`xksproxy.hsm.kcv`).  For it, equality
is established on T before derivation (derivation is deterministic), and the result carries
None per HSM; ``keys list`` cannot compare such copies later.

On any failure, everything created on every HSM is destroyed again (rollback) and
:class:`KeyAdminError` says what failed where.  With one HSM the version is generated in place
(:func:`xksproxy.keys.store.generate_version`): no transport is needed.  Every stored
version may leave its HSM only wrapped under a key the security officer marked trusted
(``CKA_WRAP_WITH_TRUSTED``, :func:`xksproxy.keys.store.key_template`), which is how
``keys replicate`` copies it to a new HSM later.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.hsm import objects
from xksproxy.hsm.base import KeyInfo, KeyStatus
from xksproxy.hsm.kcv import kcv_blocking
from xksproxy.hsm.keystore import data_template, read_meta_blocking
from xksproxy.keys.locks import key_lock
from xksproxy.keys.sessions import Sessions, admin_session, step
from xksproxy.keys.store import (
    check_new_key,
    destroy_quietly,
    generate_version,
    key_holders,
    key_template,
    objects_by_version,
    version_objects,
    write_meta,
)
from xksproxy.keys.transport import NO_USE, SESSION_ONLY, transport

#: Two distinct 16-byte blocks, neither of them the zero block a KCV encrypts.
DERIVATION_DATA = b"xksproxy-copy-v1" + b"xksproxy-copy-v2"


@contextlib.contextmanager
def admin_sessions(
    configs: Sequence[HsmConfig],
) -> Iterator[list[tuple[HsmConfig, pkcs11.Session]]]:
    """A logged-in read-write session on every HSM, in configuration order, all closed after."""
    with contextlib.ExitStack() as stack:
        yield [(config, stack.enter_context(admin_session(config))) for config in configs]


@dataclass(frozen=True)
class CreatedKey:
    info: KeyInfo
    kcv: dict[str, str | None]  # HSM name -> KCV of its copy (None: usage none)
    transport: str | None  # e.g. "RSA-3072 OAEP SHA-1"; None when made in place (one HSM)
    cleared: tuple[str, ...] = ()  # what an unfinished create had left, removed first


@dataclass
class _Made:
    """What one create has made so far, to destroy on failure."""

    ephemeral: list[Any] = field(default_factory=list)  # session objects
    stored: list[tuple[str, Any]] = field(default_factory=list)  # (HSM name, token object)

    def drop(self, obj: Any) -> None:
        """Destroy one ephemeral object now."""
        self.ephemeral.remove(obj)
        destroy_quietly(obj)

    def clean_ephemeral(self) -> None:
        while self.ephemeral:  # they also vanish when their session closes
            destroy_quietly(self.ephemeral.pop())

    def roll_back(self) -> list[str]:
        """Destroy everything; the HSMs where a stored object could not be destroyed."""
        self.clean_ephemeral()
        left = {hsm for hsm, obj in reversed(self.stored) if not destroy_quietly(obj)}
        self.stored.clear()
        return sorted(left)


def create_key_everywhere(
    sessions: Sessions, key_id: str, usage: str, reserved: Collection[str]
) -> CreatedKey:
    """Create version 1 of *key_id* with the same material on every HSM of *sessions*.

    Refuses an invalid id, a reserved one (a health key's label) and an id that exists on any
    HSM.  On failure nothing is left on any HSM; the KeyAdminError says what failed where (and
    what, if anything, could not be removed again).
    """
    enc, dec = check_new_key(key_id, usage, reserved)
    if not sessions:
        raise KeyAdminError("no HSM is configured")
    with key_lock(key_id):
        cleared = clear_unfinished_create(sessions, key_id)
        holders = key_holders(sessions, key_id)
        if holders:
            finished = f"; first {'; '.join(cleared)}" if cleared else ""
            raise KeyAdminError(
                f"key {key_id!r} already exists (on {', '.join(holders)}){finished}"
            )
        meta = objects.KeyMeta().with_version(1, objects.now_utc(), "generated")
        metas = {config.name: meta for config, _ in sessions}
        created = add_version_everywhere(sessions, key_id, 1, enc, dec, metas)
        return dataclasses.replace(created, cleared=tuple(cleared))


def clear_unfinished_create(sessions: Sessions, key_id: str) -> list[str]:
    """Finish or remove what a ``keys create`` (or import of a new key) cut short left of
    *key_id*: what was done, per HSM.

    A create marks the key CREATING on every HSM first and writes its real state last, once
    every HSM holds it; proxies never serve a CREATING key.  If some HSM already has the real
    state, the create got that far: the other HSMs get it too where they hold the same key
    (:func:`_record_unfinished`).  Otherwise the key never served, and its objects on every HSM
    (version objects and the CREATING metadata) are destroyed, so that the create starts anew.
    A key without any metadata is a key made by other tooling or an older xksproxy: left alone.
    """
    states: dict[str, str | None] = {}
    found: dict[str, list[Any]] = {}
    for config, session in sessions:
        with step(config.name, f"looking for an unfinished {key_id!r}"):
            metas = list(session.get_objects(data_template(key_id, objects.STATE_APPLICATION)))
            raws = [bytes(m[Attribute.VALUE]) for m in metas]
            states[config.name] = objects.current_meta(raws).status if raws else None
            ours = [o for objs in objects_by_version(session, key_id).values() for o in objs]
            found[config.name] = ours + metas
    if objects.CREATING not in states.values():
        return []  # nothing cut short (or a key made otherwise)
    done_on = [hsm for hsm, state in states.items() if state not in (None, objects.CREATING)]
    if done_on:
        (ref,) = [(c, s) for c, s in sessions if c.name == done_on[0]]
        behind = [hsm for hsm, state in states.items() if state in (None, objects.CREATING)]
        return _record_unfinished(sessions, key_id, ref, behind)
    done = []
    for config, _ in sessions:
        if not found[config.name]:
            continue
        with step(config.name, f"removing the unfinished {key_id!r}"):
            for obj in found[config.name]:
                obj.destroy()
        done.append(
            f"removed {len(found[config.name])} object(s) of an unfinished create "
            f"from {config.name}"
        )
    return done


def _record_unfinished(
    sessions: Sessions, key_id: str, ref: tuple[HsmConfig, pkcs11.Session], missing: list[str]
) -> list[str]:
    """A create cut short while writing the metadata: HSMs *missing* it hold the key's objects.
    Where they are the very key the recorded HSM holds (same versions, same KCVs), its metadata
    is written there too; anything else is left, reported by keys list."""
    ref_cfg, ref_session = ref
    with step(ref_cfg.name, f"reading {key_id!r}"):
        _, objs = version_objects(ref_session, key_id)
        want = {v: kcv_blocking(o) for v, o in objs.items()}
        meta = read_meta_blocking(ref_session, key_id)
    done = []
    for config, session in sessions:
        if config.name not in missing:
            continue
        with step(config.name, f"finishing {key_id!r}"):
            _, theirs = version_objects(session, key_id, unfinished=True)
            if {v: kcv_blocking(o) for v, o in theirs.items()} != want:
                continue
            write_meta(session, key_id, meta)
        done.append(f"recorded {key_id!r} on {config.name}, as on {ref_cfg.name}")
    return done


#: Stores one HSM's copy of a new version from that HSM's copy of the transport secret:
#: ``store(session, secret, key_id, version, template, made)`` returns the token object, made
#: with *template* (:func:`xksproxy.keys.store.key_template`), label *key_id* and the
#: version's id; objects it makes on the way go to ``made.ephemeral``.  It is called for the
#: first HSM (with the secret itself) before any other.
Store = Callable[[pkcs11.Session, Any, str, int, dict[Attribute, Any], _Made], Any]


def derive_version(
    session: pkcs11.Session,
    secret: Any,
    key_id: str,
    version: int,
    template: dict[Attribute, Any],
    made: _Made,
) -> Any:
    """The default :data:`Store`: derive the version from the secret (the docstring says why)."""
    return secret.derive_key(
        KeyType.AES,
        256,
        label=key_id,
        id=objects.version_id(version),
        store=True,
        mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
        mechanism_param=DERIVATION_DATA,
        template=template,
    )


def add_version_everywhere(
    sessions: Sessions,
    key_id: str,
    version: int,
    enc: bool,
    dec: bool,
    metas: dict[str, objects.KeyMeta],
    *,
    store: Store | None = None,
    expected_kcv: str | None = None,
    action: str = "creating",
) -> CreatedKey:
    """Make *version* of *key_id* with the same material on every HSM, check it, and then
    write each HSM's metadata from *metas* (HSM name -> metadata, with the version).

    The material is new, unless *store* brings it (an import: :mod:`xksproxy.keys.byok`);
    then every HSM gets a transport secret, even with one HSM, and *expected_kcv* (if given)
    is the KCV every stored copy must have.  *action* names the operation in errors.

    The caller has checked that no HSM holds *version*.  On failure every new object is
    destroyed again; for a new key (version 1) that includes its metadata.  A new version of
    an existing key has its metadata written last, after every copy is checked, so that a
    failure never loses the key's state (rewriting the metadata replaces the older object).
    """
    made = _Made()
    creating: dict[str, Any] = {}  # HSM -> its CREATING metadata object (a new key)
    try:
        for config, session in sessions if version == 1 else ():
            # First, on every HSM: a key still CREATING is never served, and a create cut
            # short from here on is known as one (clear_unfinished_create).
            with step(config.name, f"marking {key_id!r} as being created"):
                meta = metas[config.name].replace(status=objects.CREATING)
                creating[config.name] = write_meta(session, key_id, meta)
                made.stored.append((config.name, creating[config.name]))
        if len(sessions) == 1 and store is None:
            result = _create_in_place(sessions[0], key_id, version, enc, dec, made)
        else:
            result = _replicate(
                sessions, key_id, version, (enc, dec), made, store or derive_version, expected_kcv
            )
        for config, session in sessions if version == 1 else ():
            with step(config.name, f"recording {key_id!r}"):
                final = write_meta(session, key_id, metas[config.name])  # replaces CREATING
                made.stored.remove((config.name, creating[config.name]))
                made.stored.append((config.name, final))
        if version == 1:  # the key as it now is, no longer CREATING
            serving = metas[sessions[0][0].name].serving
            status = KeyStatus.ENABLED if serving else KeyStatus.DISABLED
            result = dataclasses.replace(
                result, info=dataclasses.replace(result.info, status=status)
            )
    except BaseException as exc:
        left = made.roll_back()
        if not isinstance(exc, KeyAdminError):
            raise
        what = f"{key_id!r}" if version == 1 else f"version {version} of {key_id!r}"
        if left:
            # Never served: a new key is still CREATING there, a new version unrecorded.
            again = f"keys create {key_id}" if version == 1 else f"keys repair {key_id}"
            note = (
                f"; rollback incomplete: {what} is left on {', '.join(left)}, never served; "
                f"{again} removes it"
            )
        else:
            note = "; nothing was left on any HSM"
        raise KeyAdminError(f"{action} {what} failed: {exc}{note}") from exc
    made.clean_ephemeral()
    written: list[str] = []
    for config, session in sessions if version > 1 else ():
        try:
            with step(config.name, f"recording version {version} of {key_id!r}"):
                write_meta(session, key_id, metas[config.name])
        except KeyAdminError as exc:
            done = ", ".join(written) or "no HSM"
            raise KeyAdminError(
                f"{exc}: version {version} exists on every HSM, its record only on {done} "
                f"(keys repair {key_id} finishes it)"
            ) from exc
        written.append(config.name)
    return result


def _stored_kcv(session: pkcs11.Session, key_id: str, version: int) -> tuple[KeyInfo, str | None]:
    """The key as the proxy will see it, and the KCV of *version*."""
    info, found = version_objects(session, key_id, unfinished=True)  # no metadata yet
    if version not in found:
        raise KeyAdminError(f"key {key_id!r} vanished while it was being created")
    return info, kcv_blocking(found[version])


def _create_in_place(
    hsm: tuple[HsmConfig, pkcs11.Session],
    key_id: str,
    version: int,
    enc: bool,
    dec: bool,
    made: _Made,
) -> CreatedKey:
    config, session = hsm
    with step(config.name, f"creating version {version} of {key_id!r}"):
        key = generate_version(session, key_id, version, enc, dec)
        made.stored.append((config.name, key))
        info, kcv = _stored_kcv(session, key_id, version)
    return CreatedKey(info, {config.name: kcv}, None)


def _replicate(
    sessions: Sessions,
    key_id: str,
    version: int,
    usage: tuple[bool, bool],
    made: _Made,
    store: Store,
    expected_kcv: str | None,
) -> CreatedKey:
    first_cfg, first = sessions[0]
    with step(first_cfg.name, "generating the transport secret"):
        secret: Any = first.generate_key(
            KeyType.AES,
            256,
            store=False,
            template={
                **SESSION_ONLY,
                **NO_USE,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,  # wrapped for the other HSMs, and only that
                Attribute.ENCRYPT: True,  # for its KCV
                Attribute.DERIVE: True,
            },
        )
        made.ephemeral.append(secret)
        reference = kcv_blocking(secret)
    transports = set()
    for config, session in sessions:
        copy: Any = secret
        if session is not first:
            copy, name = transport(sessions[0], (config, session), secret, made.ephemeral)
            transports.add(name)
            with step(config.name, "checking the transported secret"):
                seen = kcv_blocking(copy)
            if seen != reference:
                raise KeyAdminError(
                    f"the transported secret differs: {first_cfg.name} {reference}, "
                    f"{config.name} {seen}"
                )
        with step(config.name, f"storing {key_id!r}"):
            key = store(session, copy, key_id, version, key_template(*usage), made)
            made.stored.append((config.name, key))
        if copy is not secret:
            made.drop(copy)
    made.drop(secret)

    kcvs: dict[str, str | None] = {}
    infos: dict[str, KeyInfo] = {}
    for config, session in sessions:
        with step(config.name, f"checking {key_id!r}"):
            infos[config.name], kcvs[config.name] = _stored_kcv(session, key_id, version)
    listed = ", ".join(f"{hsm} {kcv}" for hsm, kcv in kcvs.items())
    if len(set(kcvs.values())) != 1:
        raise KeyAdminError(f"the copies differ: {listed}")
    if expected_kcv is not None and kcvs[first_cfg.name] != expected_kcv:
        raise KeyAdminError(f"the stored copies differ from the material {expected_kcv}: {listed}")
    return CreatedKey(infos[first_cfg.name], kcvs, " + ".join(sorted(transports)) or None)
