"""The key cache of one HSM: each key's metadata and object handles, served for at most a TTL
and refreshed before it ends by lookups of single keys or passes over the whole token
(:meth:`KeyCache.cached_key` says how and why).  What a lookup or a pass reads is the
adapter's to say (:class:`xksproxy.hsm.pkcs11_backend.Pkcs11Hsm`); the cache decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from xksproxy.errors import DependencyTimeoutError, KeyNotFoundError, ThrottlingError, XksError
from xksproxy.hsm.base import KeyInfo
from xksproxy.hsm.keystore import KeyDamagedError, Scanned

log = structlog.get_logger(__name__)

LOOKUP_TIMEOUT = 5.0  # seconds a key lookup may take (SoftHSM scans every object)
SWEEP_TIMEOUT = 60.0  # seconds a pass over every key of the token may take (scan_blocking)
# Keys due for a refresh at once from which one pass over the token is cheaper than a lookup
# each: a pass costs about 200 µs of Python per object of the token (and holds the GIL meanwhile),
# a lookup two searches in the HSM, about 2 x 16 µs per object on SoftHSM, without the GIL.
SWEEP_MIN_KEYS = 8
MAX_RECHECKED = 4096  # keys whose last version lookup is remembered (for spacing)
REFRESH_LEAD = 2.0  # seconds before a cache entry expires that a use refreshes it
# Seconds between the lookups of a key that versions its cached entry lacks may cause: a forged
# version number makes the HSM search at most 1 / NEW_VERSION_RECHECK times per key and second.
NEW_VERSION_RECHECK = 0.05

#: One lookup of a key in the token, by a deadline: its metadata and the handles to use per
#: version; KeyNotFoundError, KeyDamagedError or UnfinishedKeyError (keystore.py) if none.
ReadKey = Callable[[str, float], Awaitable[tuple[KeyInfo, dict[int, int]]]]
#: One pass over every key of the token, by a deadline (keystore.scan_blocking).
ReadAll = Callable[[float], Awaitable[dict[str, Scanned]]]


@dataclass(frozen=True)
class CachedKey:
    info: KeyInfo
    handles: dict[int, int]  # version -> object handle
    started: float  # when the lookup that made it started (the cache's clock)
    expires: float  # not served from then on
    refresh_at: float  # a use from then on starts a background lookup


class KeyCache:
    """The cached keys of the HSM named *hsm*, each served for *ttl* seconds (its
    ``key_cache_ttl_seconds``) of *clock*.  *read* looks one key up, *read_all* reads every
    key in one pass; *last_return* is the loop time at which the HSM last answered a call."""

    def __init__(
        self,
        hsm: str,
        ttl: float,
        read: ReadKey,
        read_all: ReadAll,
        last_return: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.hsm = hsm
        self.ttl = ttl
        self._read = read
        self._read_all = read_all
        self._last_return = last_return
        self._clock = clock
        self.keys: dict[str, CachedKey] = {}  # by key id; cleared, never replaced
        self._finding: dict[str, asyncio.Task[CachedKey]] = {}  # lookups under way
        self._sweeping: asyncio.Task[None] | None = None  # a pass over every key, under way
        self._due: set[str] = set()  # keys whose refresh is due and not done yet
        self._rechecked: dict[str, float] = {}  # key -> when a missing version was last sought
        self._pass_seconds = 0.0  # how long the last pass over every key took
        self._warned_slow_pass = False
        # Keys served in this window of one TTL and the one before: how many keys are in use.
        self._used: set[str] = set()
        self._used_before: set[str] = set()
        self._used_since = 0.0

    async def warm(self) -> None:
        """Index every key of the token the first time (before serving), and wait for it;
        errors are left for the calls that follow."""
        if self._sweeping is None:  # the first warm-up: index every key of the token
            self.sweep_soon()
            assert self._sweeping is not None
            with contextlib.suppress(XksError):
                await asyncio.shield(self._sweeping)

    def cancel(self) -> None:
        """Stop the lookups and the pass under way (the HSM is closing)."""
        for task in list(self._finding.values()):
            task.cancel()
        if self._sweeping is not None:
            self._sweeping.cancel()

    async def cached_key(self, key_id: str, deadline: float, version: int = 0) -> CachedKey:
        """The key's cached metadata and handles.

        An entry is served for ``key_cache_ttl_seconds`` from the start of the lookup that
        made it, never longer: that is the bound on how long a running proxy may act on a
        key's old state after a key command changed it (a disable, a new version).  So that
        no request of a key in use waits for a lookup (with SoftHSM a lookup scans every
        object in the token: 0.65 s with 10,000 keys, loadtest/hsm_loop.py), a use in the
        last :data:`REFRESH_LEAD` seconds (half the TTL at most) starts a background lookup
        that replaces the entry before it expires.  A key not in the cache is looked up once
        however many requests want it; a request that cannot wait for the end of the lookup
        gets 429 or 503 and the lookup goes on, so the key is there for the retry.

        A *version* the entry lacks is looked for again (:meth:`_look_for_version`): a
        rotation may have added it since the entry was made, and another worker or proxy may
        already encrypt with it.

        When many keys are in use or due (:data:`SWEEP_MIN_KEYS`, :meth:`_refresh`), one pass
        over the whole token refreshes them all (:meth:`_sweep`) instead of a lookup each: a
        SoftHSM search reads every object, so refreshing 1,000 keys one by one cost 1,000
        searches of 2,000 objects a TTL, more than the HSM could do.  A pass also runs before
        the proxy serves, so no key's first use waits for a lookup.
        """
        cached = self.keys.get(key_id)
        if cached is not None:
            now = self._clock()
            if cached.expires > now:
                if version and version not in cached.info.versions:
                    return await self._look_for_version(key_id, version, deadline)
                self._used.add(key_id)
                if cached.refresh_at <= now:
                    self._refresh(key_id, now)
                return cached
        return await self._wait_lookup(self._finding.get(key_id) or self._lookup(key_id), deadline)

    async def _wait_lookup(self, task: asyncio.Task[CachedKey], deadline: float) -> CachedKey:
        """The end of a lookup, by *deadline*; the lookup goes on if the wait ends first."""
        now = asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - now))
        except TimeoutError:
            if self._last_return() > now:
                # The HSM answers other calls, so the lookup is slow, not hung (a big token):
                # retryable, and the lookup goes on so that the retry finds the key cached.
                raise ThrottlingError("the key is being looked up; retry") from None
            raise DependencyTimeoutError("the HSM did not answer the key lookup in time") from None

    async def _look_for_version(self, key_id: str, version: int, deadline: float) -> CachedKey:
        """The key as a lookup that started after this call sees it: the cached entry lacks
        *version*, which a rotation may have added since (a Decrypt of a ciphertext another
        worker or proxy made with the new version a moment ago must not be refused).  The
        lookups such calls start for a key are :data:`NEW_VERSION_RECHECK` apart; calls in
        between wait for the next one, and share it."""
        loop = asyncio.get_running_loop()
        arrived = self._clock()
        while True:
            task = self._finding.get(key_id)
            if task is None:
                wait = self._rechecked.get(key_id, -math.inf) + NEW_VERSION_RECHECK - self._clock()
                if wait > 0:
                    if loop.time() + wait >= deadline:
                        raise ThrottlingError("the key is being looked up; retry")
                    await asyncio.sleep(wait)
                    continue
                if len(self._rechecked) >= MAX_RECHECKED:
                    self._rechecked.clear()  # only spacing is lost, for one interval
                self._rechecked[key_id] = self._clock()
                task = self._lookup(key_id)
            entry = await self._wait_lookup(task, deadline)
            if entry.started >= arrived or version in entry.info.versions:
                return entry
            # That lookup started before this call: another one, which the version may be in.

    def _lookup(self, key_id: str) -> asyncio.Task[CachedKey]:
        task = asyncio.get_running_loop().create_task(self._find(key_id))
        self._finding[key_id] = task

        def done(t: asyncio.Task[CachedKey]) -> None:
            if self._finding.get(key_id) is t:
                del self._finding[key_id]
            if not t.cancelled():
                t.exception()  # retrieved: a refresh nobody waits for may fail quietly

        task.add_done_callback(done)
        return task

    async def _find(self, key_id: str) -> CachedKey:
        started = self._clock()
        deadline = asyncio.get_running_loop().time() + LOOKUP_TIMEOUT
        try:
            info, handles = await self._read(key_id, deadline)
        except KeyNotFoundError:
            self._drop(key_id, started)
            raise
        except KeyDamagedError as exc:
            self._drop(key_id, started)
            self._say_damaged(key_id, exc.damaged)
            raise
        finally:
            self._due.discard(key_id)
        self._say_damaged(key_id, info.damaged)
        entry = self._entry(info, handles, started)
        self._store(key_id, entry)
        return entry

    def _entry(self, info: KeyInfo, handles: dict[int, int], started: float) -> CachedKey:
        ttl = self.ttl
        expires = started + ttl
        # Refreshed early enough for a pass over the token to end before the entry expires
        # (a pass over 10,000 SoftHSM objects takes seconds), within half the TTL.
        lead = min(max(REFRESH_LEAD, 2 * self._pass_seconds), ttl / 2)
        return CachedKey(info, handles, started, expires, expires - lead)

    def _store(self, key_id: str, entry: CachedKey) -> None:
        """Cache *entry* unless a lookup that started later has cached the key already."""
        old = self.keys.get(key_id)
        if old is None or old.started <= entry.started:
            self.keys[key_id] = entry

    def _drop(self, key_id: str, started: float) -> None:
        """Forget a key found gone by a lookup that started at *started*."""
        old = self.keys.get(key_id)
        if old is not None and old.started <= started:
            del self.keys[key_id]

    def _refresh(self, key_id: str, now: float) -> None:
        """A use of *key_id* found its entry due: refresh it in the background, alone while few
        keys are in use, else every key in one pass.

        Deciding by the keys in use, not by the keys due at this instant: entries made by one
        pass all fall due together, and deciding key by key would start a lookup for each of
        the first SWEEP_MIN_KEYS - 1 (each a search of the whole token holding a session) just
        before the pass, every TTL.  Also a pass when lookups do not keep up (keys due pile up).
        """
        if self._sweeping is not None and not self._sweeping.done():
            return  # the pass under way refreshes it
        self._due.add(key_id)
        if self._keys_in_use(now) >= SWEEP_MIN_KEYS or len(self._due) >= SWEEP_MIN_KEYS:
            self.sweep_soon()
        elif key_id not in self._finding:
            self._lookup(key_id)

    def _keys_in_use(self, now: float) -> int:
        """Distinct keys served in the current window of one TTL or in the one before."""
        if now - self._used_since >= self.ttl:
            self._used_before, self._used = self._used, set()
            self._used_since = now
        return max(len(self._used), len(self._used_before))

    def sweep_soon(self) -> None:
        """Start a pass over every key, unless one is under way."""
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = asyncio.get_running_loop().create_task(self._sweep())
            self._sweeping.add_done_callback(_retrieve)

    async def _sweep(self) -> None:
        """Read every key of the token in one pass (:func:`scan_blocking`) and cache them all;
        keys gone from the token are forgotten.  Its HSM work grows with the number of keys
        once per TTL, whatever the number of sessions, workers' passes apart."""
        started = self._clock()
        self._due.clear()
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + SWEEP_TIMEOUT
        scanned = await self._read_all(deadline)
        self._pass_seconds = took = loop.time() - began
        ttl = self.ttl
        if took > ttl / 4 and not self._warned_slow_pass:
            # Entries then expire before a pass under load has refreshed them, and each use
            # turns into a lookup of its own: a longer TTL is the remedy (docs/architecture.md §4).
            self._warned_slow_pass = True
            log.warning(
                "hsm_key_index_slow",
                hsm=self.hsm,
                keys=len(scanned),
                seconds=round(took, 2),
                key_cache_ttl_seconds=ttl,
                advice=f"set key_cache_ttl_seconds to at least {math.ceil(8 * took)}",
            )
        for key_id, found in scanned.items():
            if isinstance(found, XksError):
                self._drop(key_id, started)  # the next use looks it up, and says why
            else:
                self._store(key_id, self._entry(*found, started))
                self._say_damaged(key_id, found[0].damaged)
        for key_id in [k for k in self.keys if k not in scanned]:
            self._drop(key_id, started)
        log.debug("hsm_keys_indexed", hsm=self.hsm, keys=len(scanned))

    def _say_damaged(self, key_id: str, damaged: tuple[str, ...]) -> None:
        """Log what a lookup or pass left out of a key (KeyInfo.damaged), if anything."""
        if damaged:
            log.warning("key_objects_damaged", hsm=self.hsm, key_id=key_id, damaged=damaged)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's exception: a pass nobody waits for may fail quietly (the
    keys then expire and are looked up one by one, which reports the error)."""
    if not task.cancelled():
        task.exception()
