"""Scheduled deletion: a waiting period of 7-30 days, cancellable, then ``purge-due``.

As KMS does for its own keys: while a deletion is pending the key is unusable (GetKeyMetadata
says DISABLED, Encrypt and Decrypt answer InvalidStateException) but every version stays in
every HSM, so a mistake can be undone with ``cancel-deletion`` (which leaves the key DISABLED,
as KMS does).  Only ``purge-due``, once the window has passed on every HSM's copy, destroys the
versions, on every HSM, and the metadata last, so an interrupted purge is completed by running
it again.  No command deletes a key without the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pkcs11
from pkcs11 import Attribute, ObjectClass

from xksproxy.hsm import objects
from xksproxy.hsm.pkcs11_backend import data_template, read_meta_blocking
from xksproxy.keys.byok import purge_expired_wrapping_keys
from xksproxy.keys.fleet import MetaChange, change_meta_everywhere
from xksproxy.keys.lifecycle import KeyAdminError, Sessions, step
from xksproxy.keys.locks import key_lock

MIN_DAYS, MAX_DAYS = 7, 30


def schedule_deletion(sessions: Sessions, key_id: str, days: int, now: datetime) -> MetaChange:
    """Make *key_id* PENDING_DELETION on every HSM holding it, purgeable after *days*."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise KeyAdminError(f"the waiting period must be {MIN_DAYS}-{MAX_DAYS} days")
    deletion = objects.Deletion(now, now + timedelta(days=days))

    def update(hsm: str, meta: objects.KeyMeta) -> objects.KeyMeta:
        if meta.deletion is not None:
            raise KeyAdminError(
                f"key {key_id!r} is already pending deletion (on {hsm}, from "
                f"{objects.format_time(meta.deletion.delete_after)})"
            )
        return meta.replace(status="PENDING_DELETION", deletion=deletion)

    return change_meta_everywhere(sessions, key_id, "the deletion", update)


def cancel_deletion(sessions: Sessions, key_id: str) -> MetaChange:
    """End a pending deletion of *key_id*; the key is then DISABLED (enable it to use it).

    Copies that are not pending deletion (a schedule that reached only some HSMs) are made
    DISABLED too, so that the whole fleet agrees.
    """

    def check(metas: dict[str, objects.KeyMeta]) -> None:
        if not any(meta.deletion for meta in metas.values()):
            raise KeyAdminError(f"key {key_id!r} is not pending deletion")

    def update(hsm: str, meta: objects.KeyMeta) -> objects.KeyMeta:
        return meta.replace(status="DISABLED", deletion=None)

    return change_meta_everywhere(sessions, key_id, "the cancellation", update, check)


@dataclass
class PurgeResult:
    purged: dict[str, list[str]] = field(default_factory=dict)  # key id -> HSMs it left
    not_due: dict[str, datetime] = field(default_factory=dict)  # key id -> purgeable from
    refused: dict[str, str] = field(default_factory=dict)  # key id -> why not
    wrapping_keys: dict[str, int] = field(default_factory=dict)  # HSM -> expired BYOK pairs


_ALL_METADATA = {
    Attribute.CLASS: ObjectClass.DATA,
    Attribute.APPLICATION: objects.STATE_APPLICATION,
}


def _ids_with_metadata(sessions: Sessions) -> list[str]:
    """Ids of keys with metadata on any HSM (an interrupted purge may have left only that)."""
    ids = set()
    for config, session in sessions:
        with step(config.name, "listing key metadata"):
            for obj in session.get_objects(_ALL_METADATA):
                ids.add(str(obj[Attribute.LABEL]))
    return sorted(ids)


def _objects_of(session: pkcs11.Session, key_id: str) -> list[Any]:
    """The key's token objects: its versions first, then its metadata (destroyed last)."""
    versions = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_id}
    return [
        *session.get_objects({**versions, Attribute.TOKEN: True}),
        *session.get_objects(data_template(key_id, objects.STATE_APPLICATION)),
    ]


def _purgeable_from(key_id: str, copies: dict[str, objects.KeyMeta]) -> datetime:
    """When every copy's window has passed; KeyAdminError if a copy is not pending deletion."""
    refusing = [hsm for hsm, meta in copies.items() if meta.deletion is None]
    if refusing:
        raise KeyAdminError(
            f"not pending deletion on {', '.join(refusing)} (copies disagree): run "
            "keys cancel-deletion, or keys schedule-deletion again, to make them agree"
        )
    return max(meta.deletion.delete_after for meta in copies.values() if meta.deletion)


def purge_due(sessions: Sessions, now: datetime, dry_run: bool = False) -> PurgeResult:
    """Destroy every key whose deletion window has passed on every HSM holding it, and the
    BYOK wrapping keys whose import token has expired (:mod:`xksproxy.keys.byok`)."""
    result = PurgeResult()
    if not dry_run:
        for config, session in sessions:
            with step(config.name, "removing expired wrapping keys"):
                result.wrapping_keys[config.name] = purge_expired_wrapping_keys(session, now)
    for key_id in _ids_with_metadata(sessions):
        with key_lock(key_id):
            _purge_one(sessions, key_id, now, dry_run, result)
    return result


def _purge_one(
    sessions: Sessions, key_id: str, now: datetime, dry_run: bool, result: PurgeResult
) -> None:
    """Purge *key_id* if its window has passed on every HSM holding it (under its lock)."""
    copies: dict[str, objects.KeyMeta] = {}
    held: dict[str, list[Any]] = {}
    for config, session in sessions:
        with step(config.name, f"reading {key_id!r}"):
            found = _objects_of(session, key_id)
            if found:
                copies[config.name] = read_meta_blocking(session, key_id)
                held[config.name] = found
    if not any(meta.deletion for meta in copies.values()):
        return
    try:
        when = _purgeable_from(key_id, copies)
    except KeyAdminError as exc:
        result.refused[key_id] = str(exc)
        return
    if when > now:
        result.not_due[key_id] = when
    elif dry_run:
        result.purged[key_id] = sorted(held)
    else:
        _destroy(key_id, held, result)


def _destroy(key_id: str, held: dict[str, list[Any]], result: PurgeResult) -> None:
    """Every version on every HSM, each HSM's metadata last (the order of :func:`_objects_of`),
    so that an interrupted purge leaves the key pending deletion, to be purged by a rerun."""
    done: list[str] = []
    for hsm, found in held.items():
        try:
            with step(hsm, f"destroying {key_id!r}"):
                for obj in found:
                    obj.destroy()
        except KeyAdminError as exc:
            result.refused[key_id] = (
                f"{exc}; destroyed on {', '.join(done) or 'no HSM'} so far: run purge-due again"
            )
            return
        done.append(hsm)
    result.purged[key_id] = done
