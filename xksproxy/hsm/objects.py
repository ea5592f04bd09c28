"""How xksproxy keeps its state in the token (docs/architecture.md §6), shared by the backend
and the CLI.

- A key version is an AES-256 secret key object: ``CKA_LABEL`` = the external key id,
  ``CKA_ID`` = ``xks-v<N>``.  A key made by other tooling (any other ``CKA_ID``) counts as
  version 1 when it is the only such object.
- A key's metadata lives in a private ``CKO_DATA`` object: ``CKA_LABEL`` = key id,
  ``CKA_APPLICATION`` = ``xksproxy-key-state``, ``CKA_VALUE`` = JSON (:class:`KeyMeta`): a
  revision, the status (ENABLED, DISABLED or PENDING_DELETION), the deletion window, the
  rotation period and each version's creation time and origin.  No such object means ENABLED.
  ``CKA_VALUE`` of a data object cannot be changed in place on SoftHSM (read-only once
  created), so a change writes a new object with the next revision and then destroys the
  older ones: the highest revision wins, and a writer that dies between the two steps leaves
  the new state in force.  A new key is CREATING on every HSM until every HSM holds it
  (``keys create``, ``keys import``): never served, and a create run again clears it.
- The health key's expected known-answer output lives in a ``CKO_DATA`` object with the health
  key's label and ``CKA_APPLICATION`` = ``xksproxy-kat``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATE_APPLICATION = "xksproxy-key-state"
KAT_APPLICATION = "xksproxy-kat"
# The time of the last purge-due run on a clock that passed its checks (keys/deletion.py):
# a CKO_DATA object of this label and application, its value format_time's text.
CLOCK_LABEL = CLOCK_APPLICATION = "xksproxy-clock"
VERSION_PREFIX = b"xks-v"

# The known-answer test: fixed input, fixed IV, on the dedicated health key only.
KAT_IV = bytes(range(12))
KAT_AAD = b"xksproxy known-answer test"
KAT_PLAINTEXT = bytes(32)

#: CREATING: written on every HSM before a new key's first objects, replaced by its real
#: state once every HSM holds the key: a key still CREATING is a create cut short, never served.
CREATING = "CREATING"
STATUSES = ("ENABLED", "DISABLED", "PENDING_DELETION", CREATING)
#: Revision given to a metadata object that cannot be read: it outranks every readable one, so
#: an unreadable object makes the key DISABLED (fail closed) until a command rewrites it.
UNREADABLE_REVISION = 2**53


def version_id(version: int) -> bytes:
    """The CKA_ID of a key version."""
    return VERSION_PREFIX + str(version).encode()


def parse_version(cka_id: bytes) -> int | None:
    """Version from CKA_ID, or None for an ID not written by xksproxy."""
    if cka_id.startswith(VERSION_PREFIX):
        digits = cka_id[len(VERSION_PREFIX) :]
        if digits.isdigit() and len(digits) <= 9 and int(digits) > 0:
            return int(digits)
    return None


def now_utc() -> datetime:
    """The current time, UTC, whole seconds (as stored)."""
    return datetime.now(UTC).replace(microsecond=0)


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime:
    """A time written by :func:`format_time`; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("not a time")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class VersionMeta:
    """What is recorded about one key version (absent for versions made before 0.5)."""

    created: datetime
    origin: str  # "generated" | "imported"
    # An imported version: the import token's wrapping key id (hex), which tells a re-run of
    # an interrupted ``keys import`` that its version is already made.
    import_token: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"created": format_time(self.created), "origin": self.origin}
        if self.import_token is not None:
            out["importToken"] = self.import_token
        return out

    @classmethod
    def from_json(cls, raw: Any) -> VersionMeta:
        if not isinstance(raw, dict) or raw.get("origin") not in ("generated", "imported"):
            raise ValueError("bad version record")
        token = raw.get("importToken")
        if token is not None and not isinstance(token, str):
            raise ValueError("bad version record")
        return cls(parse_time(raw.get("created")), raw["origin"], token)


@dataclass(frozen=True)
class Deletion:
    """A scheduled deletion: when it was asked for and from when ``purge-due`` may act."""

    scheduled: datetime
    delete_after: datetime

    def to_json(self) -> dict[str, str]:
        return {"scheduled": format_time(self.scheduled), "after": format_time(self.delete_after)}

    @classmethod
    def from_json(cls, raw: Any) -> Deletion:
        if not isinstance(raw, dict):
            raise ValueError("bad deletion record")
        return cls(parse_time(raw.get("scheduled")), parse_time(raw.get("after")))


@dataclass(frozen=True)
class KeyMeta:
    """A key's metadata object.  ``revision`` orders concurrent objects (highest wins)."""

    status: str = "ENABLED"
    revision: int = 0
    deletion: Deletion | None = None
    rotation_days: int | None = None
    versions: Mapping[int, VersionMeta] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        """Whether the key may encrypt and decrypt."""
        return self.status == "ENABLED"

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {"rev": self.revision, "status": self.status}
        if self.deletion is not None:
            data["deletion"] = self.deletion.to_json()
        if self.rotation_days is not None:
            data["rotationDays"] = self.rotation_days
        if self.versions:
            data["versions"] = {str(v): m.to_json() for v, m in sorted(self.versions.items())}
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyMeta:
        """Parse a metadata object; an unreadable one fails closed (DISABLED, top revision)."""
        try:
            data = json.loads(raw)
            status = data["status"]
            if status not in STATUSES:
                raise ValueError(status)
            revision = data.get("rev", 0)
            rotation = data.get("rotationDays")
            if not isinstance(revision, int) or revision < 0:
                raise ValueError("bad revision")
            if rotation is not None and (not isinstance(rotation, int) or rotation < 1):
                raise ValueError("bad rotation period")
            deletion = data.get("deletion")
            versions = data.get("versions", {})
            if not isinstance(versions, dict):
                raise ValueError("bad versions")
            meta = cls(
                status=status,
                revision=revision,
                deletion=None if deletion is None else Deletion.from_json(deletion),
                rotation_days=rotation,
                versions={int(v): VersionMeta.from_json(m) for v, m in versions.items()},
            )
        except (ValueError, KeyError, TypeError):
            return cls("DISABLED", UNREADABLE_REVISION)
        if (meta.status == "PENDING_DELETION") != (meta.deletion is not None):
            return cls("DISABLED", UNREADABLE_REVISION)
        return meta

    def replace(self, **changes: Any) -> KeyMeta:
        return dataclasses.replace(self, **changes)

    def with_version(
        self, version: int, created: datetime, origin: str, import_token: str | None = None
    ) -> KeyMeta:
        return self.with_record(version, VersionMeta(created, origin, import_token))

    def with_record(self, version: int, record: VersionMeta) -> KeyMeta:
        return self.replace(versions={**self.versions, version: record})


def current_meta(values: Iterable[bytes]) -> KeyMeta:
    """The metadata in force among a key's metadata objects: the highest revision."""
    best: KeyMeta | None = None
    for raw in values:
        meta = KeyMeta.from_bytes(raw)
        if best is None or meta.revision > best.revision:
            best = meta
        elif meta.revision == best.revision and not meta.serving:
            best = meta  # two objects claim one revision: the stricter wins
    return best or KeyMeta()
