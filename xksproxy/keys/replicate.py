"""``xksproxy keys replicate``: copy keys, with every version and their state, from one HSM to
another, so that a new HSM or a second site can serve (and decrypt) everything the first can.

Blocking functions, for the CLI.  Per key, per version of the source:

- the target has that version with the same key check value (KCV): nothing to do;
- the target has it with another KCV, or has versions the source lacks: the key is refused
  (nothing of it is changed) and the run goes on with the other keys;
- the target lacks it: it is wrapped on the source under a key the source's security officer
  marked trusted, unwrapped on the target (:mod:`xksproxy.keys.trusted`), and its KCV compared
  with the original's.  A version that is not extractable (made by an xksproxy older than
  this command, or by other tooling) cannot be copied: the key is refused.

Metadata (:class:`xksproxy.hsm.objects.KeyMeta`): a target without metadata in force for the
key gets the source's, written *before* the versions, so that no proxy on the target ever sees
the key's versions without its state (a disabled key served as enabled).  A target that has
its own keeps it: a different status, deletion or rotation period is reported for the operator
to settle with the key commands (they act on every HSM), and only the version records it lacks
are added, after every version is copied.

A key whose copy fails half-way has everything this run made for it on the target destroyed
again (what was there before is never touched); the other keys go on.  So the command is safe
to re-run: keys already alike change nothing, and a run after a failure completes the job.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError, KeyNotFoundError, XksError
from xksproxy.hsm import objects
from xksproxy.hsm.kcv import kcv_blocking
from xksproxy.hsm.keystore import data_template, find_key_blocking
from xksproxy.keys.locks import key_lock
from xksproxy.keys.replicate_plan import (
    KeyObjects,
    KeyReport,
    Plan,
    Report,
    VersionObject,
    plan_copy,
)
from xksproxy.keys.sessions import admin_session, step
from xksproxy.keys.store import (
    check_key_id,
    destroy_quietly,
    key_template,
    version_objects,
    write_meta,
)
from xksproxy.keys.trusted import Channel, open_channel

T = TypeVar("T")


def choose_hsms(hsms: Sequence[HsmConfig], source: str, target: str) -> tuple[HsmConfig, ...]:
    """The configurations of the *source* and *target* HSMs, which must differ."""
    by_name = {h.name: h for h in hsms}
    configured = ", ".join(by_name)
    for option, name in (("--from", source), ("--to", target)):
        if name not in by_name:
            raise KeyAdminError(f"{option}: no HSM named {name!r} (configured: {configured})")
    if source == target:
        raise KeyAdminError(f"--from and --to are both {source!r}: name two different HSMs")
    return by_name[source], by_name[target]


def _check_ids(key_ids: Sequence[str], reserved: Collection[str]) -> list[str]:
    ids = list(dict.fromkeys(key_ids))  # in the order given, once each
    for key_id in ids:
        check_key_id(key_id)
        if key_id in reserved:
            raise KeyAdminError(
                f"{key_id!r} is a health key: each HSM has its own (keys init-health), never a copy"
            )
    return ids


def _is_key(session: pkcs11.Session, key_id: str) -> bool:
    """Whether *key_id* labels a key the proxy would serve (or try to: see its report)."""
    try:
        find_key_blocking(session, key_id)
    except KeyNotFoundError:
        return False
    except XksError:
        return True  # two objects claim one version: that key's report says so
    return True


def _source_ids(
    session: pkcs11.Session, hsm: str, ids: list[str], reserved: Collection[str]
) -> list[str]:
    """The keys to replicate: *ids*, each of which must be on the source, or every key there
    (the health keys and labels of objects that are no AES-256 key left out)."""
    with step(hsm, "listing keys"):
        if ids:
            unknown = [key_id for key_id in ids if not _is_key(session, key_id)]
            if unknown:
                raise KeyAdminError(f"not on {hsm}: {', '.join(map(repr, unknown))}")
            return ids
        labels = {
            obj[Attribute.LABEL]
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
            )
        }
        return [
            label
            for label in sorted(labels)
            if label and label not in reserved and _is_key(session, label)
        ]


def read_objects(session: pkcs11.Session, key_id: str) -> KeyObjects:
    """One HSM's copy of *key_id*: its versions with their KCVs, and its metadata objects."""
    try:
        _, found = version_objects(session, key_id)
    except KeyNotFoundError:
        found = {}
    versions = {}
    for version, obj in found.items():
        attrs = obj.get_attributes([Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.EXTRACTABLE])
        versions[version] = VersionObject(
            obj,
            kcv_blocking(obj),
            bool(attrs.get(Attribute.ENCRYPT)),
            bool(attrs.get(Attribute.DECRYPT)),
            bool(attrs.get(Attribute.EXTRACTABLE)),
        )
    metas = list(session.get_objects(data_template(key_id, objects.STATE_APPLICATION)))
    raws = [bytes(m[Attribute.VALUE]) for m in metas]
    return KeyObjects(versions, objects.current_meta(raws) if raws else None, tuple(metas))


def _add_meta(session: pkcs11.Session, key_id: str, meta: objects.KeyMeta, old: KeyObjects) -> Any:
    """Store *meta* above every metadata object of *old* (which stay until the key is done, so
    that a rollback leaves them in force)."""
    readable = [
        objects.KeyMeta.from_bytes(bytes(o[Attribute.VALUE])).revision for o in old.meta_objects
    ]
    top = max((r for r in readable if r != objects.UNREADABLE_REVISION), default=0)
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: key_id,
            Attribute.APPLICATION: objects.STATE_APPLICATION,
            Attribute.VALUE: meta.replace(revision=top + 1).to_bytes(),
        }
    )


@dataclass(frozen=True)
class _Todo:
    src: KeyObjects
    dst: KeyObjects
    plan: Plan


@dataclass
class _Run:
    src_cfg: HsmConfig
    dst_cfg: HsmConfig
    src: pkcs11.Session
    dst: pkcs11.Session
    channel: Channel | None

    def read(self, key_id: str) -> tuple[KeyObjects, KeyObjects]:
        with step(self.src_cfg.name, f"reading {key_id!r}"):
            src = read_objects(self.src, key_id)
        with step(self.dst_cfg.name, f"reading {key_id!r}"):
            dst = read_objects(self.dst, key_id)
        return src, dst

    def plan(self, key_id: str) -> tuple[KeyReport, _Todo | None]:
        """The key's report as things stand, and what is to be done (None: nothing)."""
        try:
            src, dst = self.read(key_id)
        except KeyAdminError as exc:
            return KeyReport(key_id, "failed", problems=[str(exc)]), None
        plan = plan_copy(key_id, self.src_cfg.name, self.dst_cfg.name, src, dst)
        if plan.refusal is not None:
            return KeyReport(key_id, "refused", problems=[plan.refusal]), None
        report = KeyReport(
            key_id,
            "alike" if plan.idle else "copied",
            copied=plan.missing,
            alike=plan.alike,
            unverified=plan.unverified,
            problems=list(plan.problems),
        )
        return report, None if plan.idle else _Todo(src, dst, plan)

    def replicate_key(self, key_id: str) -> KeyReport:
        """Plan the key again (things may have changed), and carry it out."""
        report, todo = self.plan(key_id)
        if todo is None:
            return report
        src, dst, plan = todo.src, todo.dst, todo.plan
        made: list[Any] = []  # what this run stores for the key on the target, in order
        try:
            after = self._copy(key_id, src, dst, plan, made)
        except BaseException as exc:
            left = [obj for obj in reversed(made) if not destroy_quietly(obj)]
            if not isinstance(exc, KeyAdminError):
                raise
            note = (
                f"rollback incomplete: remove what this run made for {key_id!r} on "
                f"{self.dst_cfg.name} by hand ({len(left)} objects)"
                if left
                else f"nothing of this run was left on {self.dst_cfg.name}"
            )
            return KeyReport(key_id, "failed", problems=[f"{exc}; {note}"])
        self._finish(key_id, dst, after, plan, report)
        return report

    def _copy(
        self, key_id: str, src: KeyObjects, dst: KeyObjects, plan: Plan, made: list[Any]
    ) -> KeyObjects:
        a, b = self.src_cfg.name, self.dst_cfg.name
        if plan.new_meta is not None:
            with step(b, f"recording {key_id!r}"):
                made.append(_add_meta(self.dst, key_id, plan.new_meta, dst))
        for version in plan.missing:
            if self.channel is None:
                raise KeyAdminError(f"{key_id!r} changed on {a} or {b} meanwhile: run again")
            original = src.versions[version]
            template = key_template(original.enc, original.dec)
            made.append(self.channel.carry(original.obj, key_id, version, template))
            with step(b, f"checking version {version} of {key_id!r}"):
                kcv = kcv_blocking(made[-1])
            if kcv != original.kcv:
                raise KeyAdminError(
                    f"the copy of version {version} of {key_id!r} on {b} has KCV {kcv}, "
                    f"the original on {a} {original.kcv}"
                )
        # As the proxy will see it: every version of the source, each with the same KCV.
        with step(b, f"checking {key_id!r}"):
            after = read_objects(self.dst, key_id)
        seen = {v: c.kcv for v, c in after.versions.items()}
        if seen != {v: c.kcv for v, c in src.versions.items()}:
            raise KeyAdminError(f"{key_id!r} on {b} is not what was copied (KCVs {seen})")
        return after

    def _finish(
        self, key_id: str, dst: KeyObjects, after: KeyObjects, plan: Plan, report: KeyReport
    ) -> None:
        """Replace older metadata, or add the version records the target lacks."""
        b = self.dst_cfg.name
        if plan.new_meta is not None:
            report.metadata = "written"
            if not all(destroy_quietly(obj) for obj in dst.meta_objects):
                report.problems.append(
                    f"an older metadata object of {key_id!r} on {b} could not be removed"
                )
        elif plan.records and after.meta is not None:
            try:
                with step(b, f"recording the versions of {key_id!r}"):
                    records = {**plan.records, **after.meta.versions}
                    write_meta(self.dst, key_id, after.meta.replace(versions=records))
                report.metadata = "merged"
            except KeyAdminError as exc:
                report.problems.append(f"{exc}: run replicate again to record them")


def _bar(items: Iterable[T], desc: str, progress: bool | None) -> Iterator[T]:
    """*items* with a progress bar on stderr (by default only when it is a terminal)."""
    from tqdm import tqdm

    bar = tqdm(
        items,
        desc=desc,
        unit="key",
        file=sys.stderr,
        disable=None if progress is None else not progress,
        leave=False,
    )
    with contextlib.closing(bar):
        yield from bar


def _so_pin(src: HsmConfig, dst: HsmConfig) -> str:
    pin = src.read_so_pin()
    if not pin:
        raise KeyAdminError(
            f"HSM {src.name} has no security officer PIN configured: set so_pin_file or "
            f"so_pin_env in its [[hsms]] table.  Its keys may leave it only wrapped under a "
            f"key its security officer marked trusted (CKA_WRAP_WITH_TRUSTED), which replicate "
            f"does for {dst.name}"
        )
    return pin


def replicate(
    hsms: Sequence[HsmConfig],
    source: str,
    target: str,
    key_ids: Sequence[str] = (),
    *,
    progress: bool | None = None,
) -> Report:
    """KeyObjects *key_ids* (default: every key but the health keys) from *source* to *target*.

    Bad input (HSM names, key ids, no SO PIN, unknown keys, a login failing) raises
    KeyAdminError before anything is changed; a key that is refused or fails is in the report.
    """
    src_cfg, dst_cfg = choose_hsms(hsms, source, target)
    reserved = {h.health_key for h in hsms}
    ids = _check_ids(key_ids, reserved)
    so_pin = _so_pin(src_cfg, dst_cfg)
    reports: dict[str, KeyReport] = {}
    transport = None
    notes: list[str] = []
    with admin_session(dst_cfg) as dst:
        with admin_session(src_cfg) as src:
            ids = _source_ids(src, src_cfg.name, ids, reserved)
            run = _Run(src_cfg, dst_cfg, src, dst, None)
            work: dict[str, bool] = {}  # key -> whether versions must travel
            for key_id in _bar(ids, "checking", progress):
                reports[key_id], todo = run.plan(key_id)
                if todo is not None:
                    work[key_id] = bool(todo.plan.missing)
        # The source's user session is closed (logged out): its security officer may log in.
        if work:
            if any(work.values()):
                opened: Any = open_channel(src_cfg, so_pin, (dst_cfg, dst))
            else:
                opened = _no_channel(src_cfg)
            with opened as (src, channel):
                run = _Run(src_cfg, dst_cfg, src, dst, channel)
                for key_id in _bar(work, "copying", progress):
                    with key_lock(key_id):  # planned again under it: see _Run.replicate_key
                        reports[key_id] = run.replicate_key(key_id)
            if channel is not None:
                transport = channel.name if channel.oaep else None
                notes += channel.notes
    return Report(source, target, [reports[k] for k in ids], transport, notes)


@contextlib.contextmanager
def _no_channel(config: HsmConfig) -> Iterator[tuple[pkcs11.Session, None]]:
    with admin_session(config) as session:
        yield session, None
