"""Never serve a key from an HSM whose copy differs: key check values compared across HSMs.

For each key version first used, the KCV (xksproxy/hsm/kcv.py) is computed on every HSM that
can answer, concurrently.  The reference value is the one a strict majority of those HSMs agree
on; without a majority, the copy on the earliest configured HSM that has one.  An HSM whose KCV
differs from the reference does not serve that key version (logged as ``key_copy_mismatch`` and
counted in metrics); an HSM that could not answer is checked when it is next asked to serve it.
The prober re-checks the versions in use after each passing probe, so a copy that changes (or
is repaired) is noticed without a restart.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

import structlog

from xksproxy.errors import KeyNotFoundError, XksError
from xksproxy.hsm.base import Hsm

log = structlog.get_logger(__name__)
RECHECK_PER_ROUND = 64  # key versions re-checked per HSM per probe round

KeyVersion = tuple[str, int]
_MISSING = "missing"  # the HSM does not hold this key version
_UNKNOWN = "unknown"  # the HSM could not answer now
_NO_KCV = "none"  # the key allows neither encrypt nor decrypt: no KCV exists


class KeyConsistency:
    """Per key version: each HSM's KCV, the reference, and which HSMs are excluded."""

    def __init__(
        self,
        hsms: Sequence[Hsm],
        *,
        on_mismatch: Callable[[str], None] | None = None,
        on_excluded: Callable[[str, int], None] | None = None,
    ) -> None:
        self.hsms = list(hsms)
        self._order = {h.name: i for i, h in enumerate(self.hsms)}
        self._kcv: dict[KeyVersion, dict[str, str]] = {}
        self._reference: dict[KeyVersion, str | None] = {}
        self._on_mismatch = on_mismatch
        self._on_excluded = on_excluded
        self._cursor: dict[str, int] = {}

    def excluded(self, hsm: str) -> list[KeyVersion]:
        """Key versions in use that *hsm* does not serve: its copy differs or is missing."""
        return sorted(
            kv
            for kv, ref in self._reference.items()
            if ref is not None and self._kcv[kv].get(hsm) not in (None, ref, _UNKNOWN)
        )

    async def _kcv_of(self, hsm: Hsm, kv: KeyVersion, deadline: float) -> str:
        try:
            value = await hsm.kcv(kv[0], kv[1], deadline)
        except KeyNotFoundError:
            return _MISSING
        except XksError:
            return _UNKNOWN
        return value if value is not None else _NO_KCV

    async def allowed(self, hsm: Hsm, key_id: str, version: int, deadline: float) -> bool:
        """Whether *hsm* may serve this key version (computing KCVs on first use)."""
        if len(self.hsms) == 1:
            return True  # one copy: nothing to compare it with
        kv = (key_id, version)
        if kv not in self._reference and not await self._establish(kv, deadline):
            return True  # no HSM could answer: nothing to compare yet; tried again next use
        seen = self._kcv[kv]
        if seen.get(hsm.name, _UNKNOWN) == _UNKNOWN:
            self._record(kv, hsm.name, await self._kcv_of(hsm, kv, deadline))
        ref = self._reference[kv]
        value = seen.get(hsm.name, _UNKNOWN)
        # A key whose KCV cannot be computed (no usage) has no reference: nothing to compare.
        return ref is None or value in (ref, _UNKNOWN)

    async def _establish(self, kv: KeyVersion, deadline: float) -> bool:
        """Fix the reference from the HSMs that answer now; False if none could."""
        values = await asyncio.gather(*(self._kcv_of(h, kv, deadline) for h in self.hsms))
        if all(v in (_UNKNOWN, _MISSING) for v in values):
            return False
        self._kcv[kv] = {}
        known = {
            h.name: v
            for h, v in zip(self.hsms, values, strict=True)
            if v not in (_UNKNOWN, _MISSING, _NO_KCV)
        }
        ref: str | None = None
        if known:
            top, count = Counter(known.values()).most_common(1)[0]
            # A strict majority decides; without one, the earliest configured HSM's copy.
            earliest = known[min(known, key=self._order.__getitem__)]
            ref = top if count * 2 > len(known) else earliest
        self._reference[kv] = ref
        for h, v in zip(self.hsms, values, strict=True):
            self._record(kv, h.name, v)
        return True

    def _record(self, kv: KeyVersion, hsm: str, value: str) -> None:
        seen = self._kcv[kv]
        before = seen.get(hsm)
        if value == _UNKNOWN and before is not None:
            return  # a re-check that could not run keeps what was known
        seen[hsm] = value
        ref = self._reference.get(kv)
        if ref is None or value in (_UNKNOWN, before):
            return
        if value == _MISSING:
            log.warning("key_copy_missing", key_id=kv[0], version=kv[1], hsm=hsm)
        elif value != ref:
            log.error(
                "key_copy_mismatch", key_id=kv[0], version=kv[1], hsm=hsm, kcv=value, reference=ref
            )
            if self._on_mismatch is not None:
                self._on_mismatch(hsm)
        elif before not in (None, _UNKNOWN, _MISSING):
            log.warning("key_copy_matches_again", key_id=kv[0], version=kv[1], hsm=hsm)
        if self._on_excluded is not None:
            self._on_excluded(hsm, len(self.excluded(hsm)))

    async def recheck(self, hsm: Hsm, deadline: float) -> None:
        """Re-compute the KCV on *hsm* for a bounded slice of the key versions in use."""
        kvs = sorted(self._reference)
        if not kvs:
            return
        start = self._cursor.get(hsm.name, 0) % len(kvs)
        batch = (kvs[start:] + kvs[:start])[:RECHECK_PER_ROUND]
        self._cursor[hsm.name] = start + len(batch)
        for kv in batch:
            self._record(kv, hsm.name, await self._kcv_of(hsm, kv, deadline))
