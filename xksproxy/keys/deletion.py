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
from datetime import UTC, datetime, timedelta
from typing import Any

import pkcs11
from pkcs11 import Attribute

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.hsm import objects
from xksproxy.hsm.keystore import (
    STATE_RECORDS,
    data_template,
    read_meta_blocking,
    token_key_template,
)
from xksproxy.hsm.pkcs11_lib import token_clock_blocking
from xksproxy.keys.byok import purge_expired_wrapping_keys
from xksproxy.keys.fleet import MetaChange, change_meta_everywhere
from xksproxy.keys.locks import key_lock
from xksproxy.keys.sessions import Sessions, functions_of, step

MIN_DAYS, MAX_DAYS = 7, 30
# The purge trusts the host's clock only if it is not behind a time already recorded (by more
# than NTP's usual disagreement between hosts) nor more than MAX_CLOCK_GAP ahead of the last
# run's (the timer runs daily): a clock set 8 days ahead would purge a key scheduled 7 days out.
CLOCK_SLACK = timedelta(minutes=10)
MAX_CLOCK_GAP = timedelta(days=3)


def schedule_deletion(sessions: Sessions, key_id: str, days: int, now: datetime) -> MetaChange:
    """Make *key_id* PENDING_DELETION on every HSM holding it, purgeable after *days*."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise KeyAdminError(f"the waiting period must be {MIN_DAYS}-{MAX_DAYS} days")
    deletion = objects.Deletion(now, now + timedelta(days=days))

    def check(metas: dict[str, objects.KeyMeta]) -> None:
        nonlocal deletion
        pending = {hsm: m.deletion for hsm, m in metas.items() if m.deletion is not None}
        if len(pending) == len(metas):
            hsm, first = next(iter(pending.items()))
            raise KeyAdminError(
                f"key {key_id!r} is already pending deletion (on {hsm}, from "
                f"{objects.format_time(first.delete_after)})"
            )
        if pending:
            # A schedule that reached only some HSMs (cut short): finish it, with its own
            # window, so that every copy agrees; the latest date if they differ.
            deletion = max(pending.values(), key=lambda d: d.delete_after)

    def update(hsm: str, meta: objects.KeyMeta) -> objects.KeyMeta:
        return meta.replace(status="PENDING_DELETION", deletion=deletion)

    return change_meta_everywhere(sessions, key_id, "the deletion", update, check)


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


def _ids_with_metadata(sessions: Sessions) -> list[str]:
    """Ids of keys with metadata on any HSM (an interrupted purge may have left only that)."""
    ids = set()
    for config, session in sessions:
        with step(config.name, "listing key metadata"):
            for obj in session.get_objects(STATE_RECORDS):
                ids.add(str(obj[Attribute.LABEL]))
    return sorted(ids)


def _objects_of(session: pkcs11.Session, key_id: str) -> list[Any]:
    """The key's token objects: its versions first, then its metadata (destroyed last)."""
    return [
        *session.get_objects(token_key_template(key_id)),
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


def purge_due(
    sessions: Sessions, now: datetime, dry_run: bool = False, clock_checked: bool = False
) -> PurgeResult:
    """Destroy every key whose deletion window has passed on every HSM holding it, and the
    BYOK wrapping keys whose import token has expired (:mod:`xksproxy.keys.byok`).

    The windows are measured on this host's clock, so a wrong clock would destroy keys early.
    Each run that trusts the clock records it on every HSM; a key due while the clock is behind
    a recorded time, or more than :data:`MAX_CLOCK_GAP` past the last run, is refused (kept)
    unless the operator says the clock is right (*clock_checked*)."""
    result = PurgeResult()
    doubt = None if clock_checked else _clock_doubt(sessions, now)
    if not dry_run:
        for config, session in sessions:
            with step(config.name, "removing expired wrapping keys"):
                result.wrapping_keys[config.name] = purge_expired_wrapping_keys(session, now)
    for key_id in _ids_with_metadata(sessions):
        with key_lock(key_id):
            _purge_one(sessions, key_id, now, dry_run, result, doubt)
    if not dry_run and doubt is None:
        _record_clock(sessions, now)
    return result


_CLOCK = data_template(objects.CLOCK_LABEL, objects.CLOCK_APPLICATION)


def _recorded_clock(records: list[Any]) -> datetime | None:
    """The latest time among an HSM's records of purge-due runs (its :data:`_CLOCK` objects)."""
    latest = None
    for obj in records:
        try:
            when = objects.parse_time(bytes(obj[Attribute.VALUE]).decode())
        except (ValueError, UnicodeDecodeError):
            continue  # unreadable: as if absent (a run then records a good one)
        latest = when if latest is None else max(latest, when)
    return latest


def _hsm_clock(config: HsmConfig, session: pkcs11.Session) -> datetime | None:
    """The HSM's own clock, where its token has one (CKF_CLOCK_ON_TOKEN: Luna and nShield
    tokens do, SoftHSM does not); KeyAdminError if it says it has one that cannot be read."""
    with step(config.name, "reading the token's clock"):
        raw = token_clock_blocking(functions_of(config), session.token.slot.slot_id)
    if raw is None:
        return None
    try:
        return datetime.strptime(raw, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise KeyAdminError(
            f"HSM {config.name} reports a clock that cannot be read ({raw!r})"
        ) from None


def _clock_doubt(sessions: Sessions, now: datetime) -> str | None:
    """Why this host's clock is not trusted to purge now, or None."""
    for config, session in sessions:
        hsm_now = _hsm_clock(config, session)
        if hsm_now is not None and abs(now - hsm_now) > CLOCK_SLACK:
            hours = abs(now - hsm_now).total_seconds() / 3600
            side = "ahead of" if now > hsm_now else "behind"
            return (
                f"this host's clock ({objects.format_time(now)}) is {hours:.1f} hours {side} "
                f"the clock of HSM {config.name} ({objects.format_time(hsm_now)}); fix the "
                "clocks (NTP), or if only the HSM's is wrong, run purge-due --clock-checked"
            )
    for config, session in sessions:
        with step(config.name, "reading the last purge-due run"):
            last = _recorded_clock(list(session.get_objects(_CLOCK)))
        if last is None:
            continue
        if now < last - CLOCK_SLACK:
            return (
                f"this host's clock ({objects.format_time(now)}) is behind the last purge-due "
                f"run recorded on {config.name} ({objects.format_time(last)}): it went backwards "
                "or another host's is ahead; fix the clocks (NTP)"
            )
        if now - last > MAX_CLOCK_GAP:
            days = (now - last).total_seconds() / 86400
            return (
                f"this host's clock ({objects.format_time(now)}) is {days:.1f} days past the last "
                f"purge-due run recorded on {config.name} ({objects.format_time(last)}); if the "
                "clock is right (no run for that long), run purge-due --clock-checked"
            )
    return None


def _record_clock(sessions: Sessions, now: datetime) -> None:
    """Record *now* as the last run on every HSM (never moving a record backwards)."""
    for config, session in sessions:
        with step(config.name, "recording this purge-due run"):
            old = list(session.get_objects(_CLOCK))
            last = _recorded_clock(old)
            when = now if last is None else max(now, last)
            session.create_object(
                {
                    **_CLOCK,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.VALUE: objects.format_time(when).encode(),
                }
            )
            for obj in old:
                obj.destroy()


def _purge_one(
    sessions: Sessions,
    key_id: str,
    now: datetime,
    dry_run: bool,
    result: PurgeResult,
    doubt: str | None,
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
    elif doubt is not None:
        result.refused[key_id] = f"not purged: {doubt}"
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
