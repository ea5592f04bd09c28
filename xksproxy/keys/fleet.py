"""Key administration across every configured HSM: list with check values, state, health keys.

Blocking functions over logged-in sessions, one per HSM, in configuration order
(:func:`xksproxy.keys.create.admin_sessions`).  Every external key should exist on every
HSM with the same material (:mod:`xksproxy.keys.create`); ``list_everywhere`` shows each
key's copy on each HSM with its key check values (KCV) and names what is missing or differs.
Health keys are per HSM and never compared: each has its own material and known answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pkcs11

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError, KeyNotFoundError
from xksproxy.hsm import objects
from xksproxy.hsm.base import unrecorded
from xksproxy.hsm.keystore import (
    UNFINISHED_CREATE,
    KeyDamagedError,
    UnfinishedKeyError,
    find_key_blocking,
    read_meta_blocking,
)
from xksproxy.keys.locks import key_lock
from xksproxy.keys.sessions import Sessions, functions_of, step
from xksproxy.keys.store import (
    KeyCopy,
    check_key_id,
    ensure_health_key,
    key_labels,
    read_copy,
    write_meta,
)


@dataclass(frozen=True)
class FleetKey:
    """A key id and its copy on each HSM (None where it is missing), in configuration order."""

    key_id: str
    copies: dict[str, KeyCopy | None]
    problems: tuple[str, ...]

    @property
    def reference(self) -> KeyCopy:
        """The copy on the first HSM that has one."""
        return next(c for c in self.copies.values() if c is not None)


def _copies(config: HsmConfig, session: pkcs11.Session) -> dict[str, KeyCopy]:
    out = {}
    with step(config.name, "listing keys"):
        for key_id in key_labels(session, config.health_key):
            try:
                out[key_id] = read_copy(session, key_id)
                continue
            except UnfinishedKeyError:  # shown, with what finishes it
                why: tuple[str, ...] = (UNFINISHED_CREATE,)
            except KeyNotFoundError:
                why = ()
            except KeyDamagedError as exc:  # shown, so that the rest of the list is too
                why = exc.damaged
            meta = read_meta_blocking(session, key_id)  # PENDING_DELETION as such
            if not why and meta.status == objects.CREATING:  # before any key object
                why = (UNFINISHED_CREATE,)
            elif not why and meta.status == "PENDING_DELETION":  # a purge cut short
                why = (PURGE_LEFTOVER,)
            if why:  # otherwise not an AES-256 key, or destroyed meanwhile
                out[key_id] = KeyCopy.unservable(key_id, meta, why)
    return out


PURGE_LEFTOVER = "no key objects, only its state record (a purge-due cut short): run purge-due"


def _problems(copies: dict[str, KeyCopy | None]) -> tuple[str, ...]:
    present = {hsm: c for hsm, c in copies.items() if c is not None}
    problems = [f"missing on {hsm}" for hsm, c in copies.items() if c is None]
    problems += [f"damaged on {hsm}: {d}" for hsm, c in present.items() for d in c.damaged]
    problems += [
        f"unfinished on {hsm}: {unrecorded(v)}" for hsm, c in present.items() for v in c.pending
    ]
    for what, value in (
        ("status", lambda c: c.status),
        ("usage", lambda c: ",".join(c.usages).lower() or "none"),
        ("versions", lambda c: ",".join(map(str, c.versions))),
    ):
        seen = {hsm: value(c) for hsm, c in present.items()}
        if len(set(seen.values())) > 1:
            problems.append(f"{what} differs: " + ", ".join(f"{h} {v}" for h, v in seen.items()))
    versions = sorted({v for c in present.values() for v in c.versions})
    for version in versions:
        kcvs = {hsm: c.kcv[version] for hsm, c in present.items() if version in c.kcv}
        if len({k for k in kcvs.values() if k is not None}) > 1:
            problems.append(
                f"KCV of version {version} differs: "
                + ", ".join(f"{h} {k or 'none'}" for h, k in kcvs.items())
            )
    return tuple(problems)


def list_everywhere(sessions: Sessions) -> list[FleetKey]:
    """Every external key on any HSM (health keys excluded), sorted by id."""
    per_hsm = {config.name: _copies(config, session) for config, session in sessions}
    ids = sorted({key_id for copies in per_hsm.values() for key_id in copies})
    out = []
    for key_id in ids:
        copies = {hsm: found.get(key_id) for hsm, found in per_hsm.items()}
        out.append(FleetKey(key_id, copies, _problems(copies)))
    return out


@dataclass(frozen=True)
class MetaChange:
    key_id: str
    meta: objects.KeyMeta  # as now written on the first HSM that holds the key
    applied: tuple[str, ...]  # HSMs whose copy now has the change
    missing: tuple[str, ...]  # HSMs without a copy of the key


def change_meta_everywhere(
    sessions: Sessions,
    key_id: str,
    change: str,
    update: Callable[[str, objects.KeyMeta], objects.KeyMeta],
    check: Callable[[dict[str, objects.KeyMeta]], None] | None = None,
) -> MetaChange:
    """Rewrite *key_id*'s metadata on every HSM that holds a copy with ``update(hsm, meta)``.

    *check* (all copies' metadata by HSM) and *update* (each copy's) are called before
    anything is written, and refuse by raising KeyAdminError: then nothing changes.  A
    missing copy is reported, not an error: disabling must work even on a fleet that has
    drifted.  If an HSM fails half-way, the message names where the *change* was applied;
    the commands are idempotent, so running one again completes it.  (A disable is
    deliberately not rolled back: that would re-enable a key the operator wants off.)
    """
    check_key_id(key_id)
    with key_lock(key_id):
        return _change_meta(sessions, key_id, change, update, check)


def _change_meta(
    sessions: Sessions,
    key_id: str,
    change: str,
    update: Callable[[str, objects.KeyMeta], objects.KeyMeta],
    check: Callable[[dict[str, objects.KeyMeta]], None] | None,
) -> MetaChange:
    holders, missing = [], []
    for config, session in sessions:
        with step(config.name, f"looking for {key_id!r}"):
            try:
                find_key_blocking(session, key_id)
            except KeyNotFoundError:
                missing.append(config.name)
                continue
            holders.append((config.name, session, read_meta_blocking(session, key_id)))
    if not holders:
        raise KeyAdminError(f"key {key_id!r} does not exist")
    if check is not None:
        check({hsm: meta for hsm, _, meta in holders})
    new = [(hsm, session, update(hsm, meta)) for hsm, session, meta in holders]
    applied: list[str] = []
    for hsm, session, meta in new:
        try:
            with step(hsm, f"writing the state of {key_id!r}"):
                write_meta(session, key_id, meta)
        except KeyAdminError as exc:
            done = ", ".join(applied) or "no HSM"
            raise KeyAdminError(
                f"{exc}; {change} on {done} so far: run the command again to finish"
            ) from exc
        applied.append(hsm)
    return MetaChange(key_id, new[0][2], tuple(applied), tuple(missing))


def set_status_everywhere(sessions: Sessions, key_id: str, status: str) -> MetaChange:
    """Enable or disable *key_id* on every HSM that holds a copy (not while its deletion is
    pending: that is undone only by ``cancel-deletion``)."""

    def update(hsm: str, meta: objects.KeyMeta) -> objects.KeyMeta:
        if meta.status == "PENDING_DELETION":
            assert meta.deletion is not None
            raise KeyAdminError(
                f"key {key_id!r} is pending deletion (on {hsm}, from "
                f"{objects.format_time(meta.deletion.delete_after)}): "
                "xksproxy keys cancel-deletion first"
            )
        return meta.replace(status=status)

    return change_meta_everywhere(sessions, key_id, status, update)


def ensure_health_keys(sessions: Sessions) -> dict[str, bool]:
    """Each HSM's own health key and known answer (never copied); HSM name -> created now."""
    made = {}
    for config, session in sessions:
        with step(config.name, f"creating the health key {config.health_key!r}"):
            made[config.name] = ensure_health_key(
                session, config.health_key, functions_of(config), config.gcm_iv, config.vendor
            )
    return made
