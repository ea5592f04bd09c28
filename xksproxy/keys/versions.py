"""Key versions: rotation (by hand and by period), and the per-key view of ``keys show``.

Blocking functions over logged-in sessions, one per HSM (``create.admin_sessions``).  A
new version gets new material, identical on every HSM (:func:`create.add_version_everywhere`:
checked by key check value before its record is written); Encrypt uses the newest version and
Decrypt the one named in ``ciphertextMetadata``, so older versions decrypt until the key is
deleted and never encrypt again.  A rotation needs every HSM of the configuration: a version
that some HSM lacked would fail decryption there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pkcs11.exceptions import PKCS11Error

from xksproxy.errors import KeyAdminError, KeyNotFoundError
from xksproxy.hsm import objects
from xksproxy.hsm.base import KeyInfo
from xksproxy.hsm.kcv import kcv_blocking
from xksproxy.hsm.keystore import find_key_blocking, read_meta_blocking
from xksproxy.keys.create import CreatedKey, add_version_everywhere, clear_unfinished_create
from xksproxy.keys.fleet import MetaChange, change_meta_everywhere
from xksproxy.keys.locks import key_lock
from xksproxy.keys.sessions import Sessions, step
from xksproxy.keys.store import (
    KeyCopy,
    check_key_id,
    key_holders,
    key_labels,
    objects_by_version,
    read_copy,
    version_objects,
    write_meta,
)

#: The rotation periods KMS allows for its own keys (EnableKeyRotation), in days.
MIN_ROTATION_DAYS, MAX_ROTATION_DAYS = 90, 2560


def read_copies(sessions: Sessions, key_id: str) -> dict[str, KeyCopy | None]:
    """Each HSM's copy of *key_id* (None where missing); KeyAdminError if no HSM has it."""
    check_key_id(key_id)
    out: dict[str, KeyCopy | None] = {}
    for config, session in sessions:
        with step(config.name, f"reading {key_id!r}"):
            try:
                out[config.name] = read_copy(session, key_id)
            except KeyNotFoundError:
                out[config.name] = None
    if all(c is None for c in out.values()):
        raise KeyAdminError(f"key {key_id!r} does not exist")
    return out


def require_alike(key_id: str, copies: dict[str, KeyCopy | None], doing: str) -> dict[str, KeyCopy]:
    """The copies, if every HSM has one with the same versions, usage and status, and none is
    damaged or has unfinished versions (:func:`finish_interrupted` runs first)."""
    missing = [hsm for hsm, c in copies.items() if c is None]
    if missing:
        raise KeyAdminError(
            f"cannot {doing} {key_id!r}: it is missing on {', '.join(missing)} "
            "(xksproxy keys replicate copies it there)"
        )
    present = {hsm: c for hsm, c in copies.items() if c is not None}
    for hsm, c in present.items():
        if c.info.pending:
            listed = ", ".join(map(str, sorted(c.info.pending)))
            raise KeyAdminError(
                f"cannot {doing} {key_id!r}: version {listed} on {hsm} is not recorded and "
                "could not be finished (keys show says why)"
            )
        if c.info.damaged:
            # A version number in use by a damaged object could be given out again.
            raise KeyAdminError(
                f"cannot {doing} {key_id!r}: its copy on {hsm} is damaged "
                f"({'; '.join(c.info.damaged)})"
            )
    for what, value in (
        ("versions", lambda c: sorted(c.info.versions)),
        ("usage", lambda c: c.info.usages),
        ("status", lambda c: c.meta.status),
    ):
        seen = {hsm: value(c) for hsm, c in present.items()}
        if len({repr(v) for v in seen.values()}) > 1:
            detail = ", ".join(f"{hsm} {v}" for hsm, v in seen.items())
            raise KeyAdminError(f"cannot {doing} {key_id!r}: its {what} differ ({detail})")
    return present


@dataclass(frozen=True)
class Rotation:
    key_id: str
    version: int
    created: CreatedKey
    repaired: tuple[str, ...] = ()  # what an earlier, interrupted command left, finished first


def rotate_everywhere(sessions: Sessions, key_id: str, now: datetime) -> Rotation:
    """Add a new version of *key_id*, with new material, on every HSM."""
    with key_lock(key_id):
        return _rotate(sessions, key_id, now)


def repair(sessions: Sessions, key_id: str) -> list[str]:
    """``keys repair``, under the key's lock: a create cut short is finished where some HSM
    got its real state, or else removed (it never served; ``keys create`` makes it anew);
    then :func:`mend`."""
    with key_lock(key_id):
        cleared = clear_unfinished_create(sessions, key_id)
        if cleared and not key_holders(sessions, key_id):
            return cleared
        return [*cleared, *mend(sessions, key_id)]


def mend(sessions: Sessions, key_id: str) -> list[str]:
    """What racing or interrupted commands left of *key_id*, settled where the HSMs say how:
    one object per version (:func:`settle_duplicates`), then every version recorded everywhere
    or nowhere (:func:`finish_interrupted`).  What was done.  Under the key's lock; ``rotate``
    and ``import`` run it first."""
    return [*settle_duplicates(sessions, key_id), *finish_interrupted(sessions, key_id)]


def _kcv_or_unusable(obj: Any) -> str | None:
    """The object's KCV; None for a key without one; "unusable" if it cannot be used."""
    try:
        return kcv_blocking(obj)
    except PKCS11Error:
        return UNUSABLE


UNUSABLE = "unusable"


def settle_duplicates(sessions: Sessions, key_id: str) -> list[str]:
    """Leave one object per version of *key_id* on each HSM; what was done or left alone.

    Of a version's several objects on one HSM (commands that raced, a write cut short), the one
    kept is the key the other HSMs hold for that version (their KCV), or, on an HSM alone, the
    one key all the usable objects are; unusable (partial) objects and other copies go.  Two
    different keys with nothing to tell which is right are left for a person to decide."""
    per_hsm: dict[str, dict[int, list[Any]]] = {}
    for config, session in sessions:
        with step(config.name, f"reading the objects of {key_id!r}"):
            per_hsm[config.name] = objects_by_version(session, key_id)
    single: dict[int, set[str | None]] = {}  # version -> KCVs of the HSMs with one object
    for by_version in per_hsm.values():
        for version, objs in by_version.items():
            if len(objs) == 1:
                single.setdefault(version, set()).add(_kcv_or_unusable(objs[0]))
    done: list[str] = []
    for hsm, by_version in per_hsm.items():
        for version, objs in sorted(by_version.items()):
            if len(objs) < 2:
                continue
            with step(hsm, f"checking version {version} of {key_id!r}"):
                kcvs = {obj.handle: _kcv_or_unusable(obj) for obj in objs}
            usable = {k for k in kcvs.values() if k not in (UNUSABLE, None)}
            others = single.get(version, set()) - {UNUSABLE}
            ref = next(iter(others)) if len(others) == 1 else None
            if ref is None and not others and len(usable) == 1:
                ref = next(iter(usable))
            keep = min((h for h, k in kcvs.items() if ref is not None and k == ref), default=None)
            if keep is None:
                done.append(
                    f"left alone: version {version} on {hsm} has {len(objs)} objects "
                    f"({', '.join(str(k) for k in kcvs.values())}) and nothing tells which is "
                    "right; destroy the wrong one by hand"
                )
                continue
            with step(hsm, f"removing extra objects of version {version} of {key_id!r}"):
                for obj in objs:
                    if obj.handle != keep:
                        obj.destroy()
            gone = ", ".join(str(kcvs[o.handle]) for o in objs if o.handle != keep)
            done.append(
                f"version {version} on {hsm}: kept the object with KCV {ref}, "
                f"removed {len(objs) - 1} ({gone})"
            )
    return done


def finish_interrupted(sessions: Sessions, key_id: str) -> list[str]:
    """Finish what an interrupted rotate or import of *key_id* left; what was done.

    A new version's objects are made on every HSM and checked first, and only then recorded in
    each HSM's metadata; proxies encrypt only with recorded versions.  So after a command cut
    short (killed, an HSM lost, a full token), a version is either
    - recorded on some HSMs, held by all with one KCV: it may be in use, so it is recorded on
      the others too;
    - recorded on none: it never encrypted anything, so its objects are destroyed, wherever
      they are (a re-run makes it again).
    Anything else (a recorded version some HSM lacks, copies that differ) is left alone and
    reported: ``keys replicate`` or a person must decide.  Call it under the key's lock.
    """
    copies = read_copies(sessions, key_id)
    present = {hsm: c for hsm, c in copies.items() if c is not None}
    done: list[str] = []
    for version in sorted({v for c in present.values() for v in c.info.pending}):
        holders = [hsm for hsm, c in present.items() if version in c.info.versions]
        recorded = {hsm: c for hsm, c in present.items() if version in c.meta.versions}
        if not recorded:
            for config, session in sessions:
                if config.name not in holders:
                    continue
                with step(config.name, f"removing unfinished version {version} of {key_id!r}"):
                    _, found = version_objects(session, key_id)
                    if version in found:
                        found[version].destroy()
            done.append(
                f"removed version {version}, never recorded (an interrupted command), "
                f"from {', '.join(holders)}"
            )
            continue
        kcvs = {present[h].kcv.get(version) for h in holders}
        if len(holders) < len(present) or len(kcvs) != 1:
            continue  # reported by keys list / show; not ours to guess
        record = next(iter(recorded.values())).meta.versions[version]
        for config, session in sessions:
            copy = present.get(config.name)
            if copy is None or config.name in recorded:
                continue
            meta = copy.meta.with_record(version, record)
            with step(config.name, f"recording version {version} of {key_id!r}"):
                write_meta(session, key_id, meta)
            done.append(f"recorded version {version} on {config.name}, as on the others")
    return done


def _rotate(sessions: Sessions, key_id: str, now: datetime) -> Rotation:
    repaired = mend(sessions, key_id)
    present = require_alike(key_id, read_copies(sessions, key_id), "rotate")
    ref = next(iter(present.values()))
    if ref.meta.status == "PENDING_DELETION":
        raise KeyAdminError(
            f"key {key_id!r} is pending deletion: cancel the deletion before rotating it"
        )
    if not ref.info.usages:
        raise KeyAdminError(f"key {key_id!r} has usage none: a new version could not be used")
    version = max(ref.info.versions) + 1
    metas = {hsm: c.meta.with_version(version, now, "generated") for hsm, c in present.items()}
    created = add_version_everywhere(
        sessions, key_id, version, ref.info.can_encrypt, ref.info.can_decrypt, metas
    )
    return Rotation(key_id, version, created, tuple(repaired))


def set_rotation_period(sessions: Sessions, key_id: str, days: int | None) -> MetaChange:
    """Set (or with None, remove) the key's rotation period on every HSM holding it."""
    if days is not None and not MIN_ROTATION_DAYS <= days <= MAX_ROTATION_DAYS:
        raise KeyAdminError(
            f"the rotation period must be {MIN_ROTATION_DAYS}-{MAX_ROTATION_DAYS} days"
        )

    def update(hsm: str, meta: objects.KeyMeta) -> objects.KeyMeta:
        return meta.replace(rotation_days=days)

    return change_meta_everywhere(sessions, key_id, "the rotation period", update)


def next_rotation(meta: objects.KeyMeta, current: int) -> datetime | None:
    """When the key is due for rotation; None without a period.  A newest version with no
    creation record (made before versions were recorded) is due at once."""
    if meta.rotation_days is None:
        return None
    record = meta.versions.get(current)
    if record is None:
        return datetime.min.replace(tzinfo=objects.now_utc().tzinfo)
    return record.created + timedelta(days=meta.rotation_days)


@dataclass(frozen=True)
class DueResult:
    rotated: dict[str, int]  # key id -> new version
    not_due: dict[str, datetime]  # key id -> when due
    skipped: dict[str, str]  # key id -> why (disabled, pending deletion)
    failed: dict[str, str]  # key id -> error


def rotate_due(sessions: Sessions, now: datetime, dry_run: bool = False) -> DueResult:
    """Rotate every enabled key whose rotation period has passed since its newest version.

    A failure on one key is reported and the others go on; run it again to retry.
    """
    if not sessions:
        raise KeyAdminError("no HSM is configured")
    config, first = sessions[0]
    with step(config.name, "listing keys"):
        key_ids = key_labels(first, config.health_key)
    result = DueResult({}, {}, {}, {})
    for key_id in key_ids:
        with step(config.name, f"reading {key_id!r}"):
            try:
                info, _ = find_key_blocking(first, key_id)
            except KeyNotFoundError:
                continue  # not an AES-256 key
            meta = read_meta_blocking(first, key_id)
        due = next_rotation(meta, info.current_version)
        if due is None:
            continue
        if meta.status != "ENABLED":
            result.skipped[key_id] = meta.status
        elif due > now:
            result.not_due[key_id] = due
        elif dry_run:
            result.rotated[key_id] = max(info.versions) + 1
        else:
            try:
                result.rotated[key_id] = rotate_everywhere(sessions, key_id, now).version
            except KeyAdminError as exc:
                result.failed[key_id] = str(exc)
    return result


def describe(key_id: str, copies: dict[str, KeyCopy | None]) -> dict[str, Any]:
    """What ``keys show`` prints: the key as the first HSM holding it has it, each version's
    KCV on every HSM, and what differs between HSMs."""
    present = {hsm: c for hsm, c in copies.items() if c is not None}
    ref = next(iter(present.values()))
    meta, info = ref.meta, ref.info
    problems = [f"missing on {hsm}" for hsm, c in copies.items() if c is None]
    for hsm, c in present.items():
        if c.meta.to_bytes() != meta.to_bytes() or c.info != info:
            problems.append(f"the copy on {hsm} differs (keys list shows how)")
    all_versions = sorted({v for c in present.values() for v in c.kcv})
    rows = []
    for version in reversed(all_versions):
        record = meta.versions.get(version)
        kcvs = {hsm: c.kcv.get(version) for hsm, c in present.items()}
        if len({k for k in kcvs.values() if k is not None}) > 1:
            problems.append(f"version {version}: KCVs differ")
        rows.append(
            {
                "version": version,
                "created": objects.format_time(record.created) if record else None,
                "origin": record.origin if record else None,
                "state": _version_state(info, version),
                "kcv": kcvs,
            }
        )
    due = next_rotation(meta, info.current_version)
    return {
        "keyId": key_id,
        "keyStatus": meta.status,
        "keyUsage": list(info.usages),
        "currentVersion": info.current_version,
        "rotationPeriodInDays": meta.rotation_days,
        "nextRotation": objects.format_time(due)
        if due and due.year > 1
        else "now"
        if due
        else None,
        "deletionDate": objects.format_time(meta.deletion.delete_after) if meta.deletion else None,
        "versions": rows,
        "hsms": list(copies),
        "problems": problems,
    }


def _version_state(info: KeyInfo, version: int) -> str:
    if version not in info.versions:
        return "missing"
    if version in info.pending:
        return "unfinished"  # never encrypts: keys repair finishes or removes it
    if version == info.current_version:
        return "current" if info.usages else "unusable"
    return "decrypt-only" if info.can_decrypt else "unusable"
