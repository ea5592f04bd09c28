"""What ``keys replicate`` must do for one key, decided from what each HSM holds (a pure
function, :func:`plan_copy`, so that every rule of :mod:`xksproxy.keys.replicate` is in one place),
and the report of what it did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from xksproxy.hsm import objects


@dataclass(frozen=True)
class VersionObject:
    """One key version's object on one HSM, with what copying it needs to know."""

    obj: Any  # the python-pkcs11 object, in the session that read it
    kcv: str | None  # None: usage none, no KCV
    enc: bool
    dec: bool
    extractable: bool


@dataclass(frozen=True)
class KeyObjects:
    """The objects of one HSM's copy of a key, as ``keys replicate`` copies them (no versions:
    the HSM lacks it).  The served view of a copy, which the other commands compare, is
    :class:`xksproxy.keys.store.KeyCopy`."""

    versions: Mapping[int, VersionObject]
    meta: objects.KeyMeta | None  # in force; None: no metadata object
    meta_objects: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Plan:
    missing: tuple[int, ...] = ()  # versions to copy, in order
    alike: tuple[int, ...] = ()  # versions the target holds with the source's KCV
    refusal: str | None = None  # why nothing of the key may be changed
    new_meta: objects.KeyMeta | None = None  # to store first: the target has none in force
    records: Mapping[int, objects.VersionMeta] = field(default_factory=dict)  # to add at the end
    problems: tuple[str, ...] = ()  # reported, not changed
    unverified: tuple[int, ...] = ()  # versions that have no KCV to compare

    @property
    def idle(self) -> bool:
        """Nothing to change on the target."""
        return not self.missing and self.new_meta is None and not self.records


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _versions(versions: list[int]) -> str:
    return ("version " if len(versions) == 1 else "versions ") + ", ".join(map(str, versions))


def _usage(version: VersionObject) -> str:
    return (
        ",".join(n for n, on in (("encrypt", version.enc), ("decrypt", version.dec)) if on)
        or "none"
    )


def _state(meta: objects.KeyMeta) -> dict[str, str]:
    deletion = meta.deletion
    return {
        "status": meta.status,
        "deletion": "none"
        if deletion is None
        else f"after {objects.format_time(deletion.delete_after)}",
        "rotation": "none" if meta.rotation_days is None else f"{meta.rotation_days} days",
    }


def plan_copy(key_id: str, a: str, b: str, src: KeyObjects, dst: KeyObjects) -> Plan:
    """What to do to bring *key_id* from HSM *a* (copy *src*) to HSM *b* (copy *dst*)."""
    both = sorted(set(src.versions) & set(dst.versions))
    for v in both:
        mine, theirs = src.versions[v].kcv, dst.versions[v].kcv
        if mine != theirs:
            return Plan(
                refusal=f"refusing to overwrite a different copy of {key_id!r} on {b}: "
                f"version {v} KCV {mine or 'none'} on {a}, {theirs or 'none'} on {b}"
            )
    extra = sorted(set(dst.versions) - set(src.versions))
    if extra:
        return Plan(
            refusal=f"refusing to overwrite a different copy of {key_id!r} on {b}: "
            f"it has {_versions(extra)}, which {a} lacks"
        )
    missing = sorted(set(src.versions) - set(dst.versions))
    stuck = [v for v in missing if not src.versions[v].extractable]
    if stuck:
        return Plan(
            refusal=f"{key_id!r} cannot be copied: {_versions(stuck)} on {a} "
            f"{'is' if len(stuck) == 1 else 'are'} not extractable (made by an xksproxy older "
            f"than `keys replicate`, or by other tooling), so it can never leave {a}; see "
            "docs/replication.md"
        )
    if src.meta is not None and src.meta.revision == objects.UNREADABLE_REVISION:
        return Plan(
            refusal=f"the metadata of {key_id!r} on {a} is unreadable (the key is DISABLED "
            f"there): rewrite it with `xksproxy keys disable {key_id}` or `enable` first"
        )
    source_meta = src.meta or objects.KeyMeta()
    unverified = tuple(v for v in sorted(src.versions) if src.versions[v].kcv is None)
    # The same material with other usage (the KCVs of an encrypt,decrypt and an encrypt-only
    # copy are equal) is no different copy, but the target's may not serve what the source does.
    usage = [
        f"{_usage(src.versions[v])} on {a}, {_usage(dst.versions[v])} on {b}"
        for v in both
        if _usage(src.versions[v]) != _usage(dst.versions[v])
    ]
    problems: tuple[str, ...] = ()
    if usage:
        problems = (f"the usage of {key_id!r} differs ({'; '.join(usage)}): not changed on {b}",)
    plan = Plan(missing=tuple(missing), alike=tuple(both), unverified=unverified, problems=problems)
    if dst.meta is None or not dst.versions:
        # Nothing of the target's is in force, or only metadata without a key (left by a
        # crash): the source's, unless neither has any.
        if src.meta is None and dst.meta is None:
            return plan
        return replace(plan, new_meta=source_meta)
    if dst.meta.revision == objects.UNREADABLE_REVISION:
        problem = (
            f"the metadata of {key_id!r} on {b} is unreadable (the key is DISABLED there): "
            f"not changed; rewrite it with `xksproxy keys disable {key_id}` or `enable`"
        )
        return replace(plan, problems=(*plan.problems, problem))
    want, have = _state(source_meta), _state(dst.meta)
    differ = [f"{k} {want[k]} on {a}, {have[k]} on {b}" for k in want if want[k] != have[k]]
    state = (
        f"the state of {key_id!r} differs ({'; '.join(differ)}): not changed on {b}; settle "
        "it with the key commands (keys enable, keys disable, ...), which act on every HSM"
    )
    records = {
        v: r
        for v, r in source_meta.versions.items()
        if v in src.versions and v not in dst.meta.versions
    }
    return replace(plan, problems=plan.problems + ((state,) if differ else ()), records=records)


@dataclass
class KeyReport:
    """What replicate did with one key."""

    key_id: str
    result: str  # alike | copied | refused | failed
    copied: tuple[int, ...] = ()
    alike: tuple[int, ...] = ()
    metadata: str | None = None  # "written" (the source's) | "merged" (version records added)
    unverified: tuple[int, ...] = ()  # versions without a KCV (usage none): see docs
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result in ("alike", "copied") and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "keyId": self.key_id,
            "result": self.result,
            "copiedVersions": list(self.copied),
            "alikeVersions": list(self.alike),
            "metadata": self.metadata,
            "unverifiedVersions": list(self.unverified),
            "problems": self.problems,
        }


@dataclass
class Report:
    source: str
    target: str
    keys: list[KeyReport]
    transport: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(k.ok for k in self.keys)

    def _ids(self, result: str) -> list[str]:
        return [k.key_id for k in self.keys if k.result == result]

    def _with_problems(self) -> list[str]:
        return [k.key_id for k in self.keys if k.result in ("alike", "copied") and k.problems]

    def summary(self) -> str:
        text = (
            f"{self.source} -> {self.target}: copied {_count(len(self._ids('copied')), 'key')} / "
            f"{_count(sum(len(k.copied) for k in self.keys), 'version')}, "
            f"{len(self._ids('alike'))} already alike"
        )
        for what, ids in (
            ("refused", self._ids("refused")),
            ("failed", self._ids("failed")),
            ("to check", self._with_problems()),
        ):
            if ids:
                text += f"; {what}: {', '.join(ids)}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "transport": self.transport,
            "keys": [k.to_json() for k in self.keys],
            "summary": {
                "copiedKeys": len(self._ids("copied")),
                "copiedVersions": sum(len(k.copied) for k in self.keys),
                "alikeKeys": len(self._ids("alike")),
                "refused": self._ids("refused"),
                "failed": self._ids("failed"),
                "toCheck": self._with_problems(),
            },
            "notes": self.notes,
        }
