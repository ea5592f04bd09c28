"""The :class:`~xksproxy.hsm.base.Hsm` implementation over PKCS#11 (python-pkcs11).

One object per configured HSM: its module (initialised for threads), one login session kept
for the life of the process, a bounded pool of further sessions, its own call runner (threads),
and a cache of key metadata and handles.  Every PKCS#11 call runs on the runner's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import structlog
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import PKCS11Error

from xksproxy.config import HsmConfig
from xksproxy.errors import (
    DependencyTimeoutError,
    InternalError,
    InvalidCiphertextError,
    InvalidKeyUsageError,
    KeyNotFoundError,
    ThrottlingError,
    XksError,
)
from xksproxy.hsm import gcm, objects
from xksproxy.hsm.base import USAGE_NAMES, KeyInfo, KeyStatus, ProbeResult
from xksproxy.hsm.kcv import kcv_blocking, kcv_raw_blocking
from xksproxy.hsm.pkcs11_errors import Fault, ckr_name, classify
from xksproxy.hsm.pkcs11_lib import (
    Pkcs11InitError,
    ThreadSafeLib,
    destroy_blocking,
    find_token,
    load_library,
    session_copy_blocking,
    shared_with_others,
)
from xksproxy.hsm.pool import BrokenSessionError, PoolStats, SessionPool
from xksproxy.hsm.runner import CallRunner
from xksproxy.metrics import Metrics

log = structlog.get_logger(__name__)
T = TypeVar("T")

_USAGE_ATTRS = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.DERIVE,
)
_KEY_ATTRS = [Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID, *_USAGE_ATTRS]


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
REOPEN_BACKOFF_MIN = 1.0  # seconds between reopen attempts, doubling up to the maximum
# At most this long between attempts: also the longest a mended HSM waits to serve again.
REOPEN_BACKOFF_MAX = 10.0


class HsmUnavailableError(InternalError):
    """The token cannot be opened or used now.  The client sees a generic message; *detail*
    (which CKR code, which token) goes to logs, health details and ``xksproxy check``."""

    default_message = "the HSM is not available"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(None)
        self.detail = detail or self.default_message


class _StaleHandle(Exception):
    """A cached key handle is no longer valid."""


@dataclass
class _Session:
    """A pooled PKCS#11 session.  Keys are used by handle (:class:`gcm.RawKey`): a token
    object's handle is valid in every session, so no session searches for key objects."""

    session: pkcs11.Session


@dataclass(frozen=True)
class _CachedKey:
    info: KeyInfo
    handles: dict[int, int]  # version -> object handle
    started: float  # when the lookup that made it started (clock of Pkcs11Hsm)
    expires: float  # not served from then on
    refresh_at: float  # a use from then on starts a background lookup


def read_meta_blocking(session: pkcs11.Session, key_id: str) -> objects.KeyMeta:
    """The key's metadata in force (:func:`xksproxy.hsm.objects.current_meta`)."""
    return objects.current_meta(
        bytes(data[Attribute.VALUE])
        for data in session.get_objects(data_template(key_id, objects.STATE_APPLICATION))
    )


def _aes256(attrs: dict[Any, Any], version: int | None) -> bool:
    """Whether a key object is one the proxy serves: AES with a 32-byte value.

    SoftHSM 2.6 leaves ``CKA_VALUE_LEN`` at 0 on every key made by ``C_UnwrapKey`` (and
    refuses it in the unwrap template), which is how imported and replicated versions are
    made.  An object with an xksproxy version id (``xks-v<N>``) is written only by the key
    commands, which check the length of unwrapped material before storing it
    (:mod:`xksproxy.keys.byok`) or store a copy whose check value equals an AES-256
    original, so for those 0 means "not recorded by the HSM"; any other object must say 32.
    """
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES:
        return False
    length = attrs.get(Attribute.VALUE_LEN)
    return length == 32 or (length in (0, None) and version is not None)


#: The KCV of a key object, by handle (hsm/kcv.py): None for a key without one (usage none);
#: raises PKCS11Error for an object that cannot be used (a write cut short left it partial).
KcvOf = Callable[[int], str | None]


def _one_of(
    version: int, objs: list[tuple[int, tuple[str, ...]]], kcv_of: KcvOf | None
) -> tuple[tuple[int, tuple[str, ...]] | None, str]:
    """Which of a version's several objects to use, and what to report.  Objects that cannot
    be used are passed over; the usable ones must be one key (one KCV), and the lowest handle
    is used (any of them is the same key); otherwise none is."""
    n = len(objs)
    if kcv_of is None:
        return None, f"version {version} has {n} objects, not served"
    kcvs: dict[int, str | None] = {}
    for handle, _ in objs:
        try:
            kcvs[handle] = kcv_of(handle)
        except PKCS11Error:
            continue  # unusable: a partial object
    usable = [o for o in objs if o[0] in kcvs]
    broken = n - len(usable)
    values = {kcvs[h] for h, _ in usable}
    if not usable:
        return None, f"version {version} has {n} objects, none usable, not served"
    if len(values) > 1 or None in values:
        return None, f"version {version} has {n} objects of different material, not served"
    extra = f"{len(usable) - 1} more alike" if len(usable) > 1 else ""
    extra += (", " if extra else "") + (f"{broken} unusable (partial)" if broken else "")
    return min(usable), f"version {version} has {n} objects ({extra}): one is used"


def _key_of(
    key_id: str,
    found: list[tuple[int, dict[Any, Any]]],
    meta: objects.KeyMeta,
    kcv_of: KcvOf | None = None,
) -> tuple[KeyInfo, dict[int, int]]:
    """A key's usable versions, usage and status from its token objects (handle, attributes)
    and metadata; KeyNotFoundError if none is an AES-256 key.

    Deterministic whatever the objects: of a version held by several objects (two commands that
    raced, a crash), those *kcv_of* cannot use are passed over, and the rest are used only if
    they are one key (:func:`_one_of`): of two different keys it is unknown which one a
    ciphertext was made with, so neither serves, and the other versions serve on.  An object
    without an xksproxy version id is version 1 only when it is the only one and no ``xks-v1``
    exists (a key made by other tooling), and is ignored otherwise.
    Encrypt uses the newest usable version the metadata records (``KeyInfo.pending``: those
    it does not).  What was left out is in ``KeyInfo.damaged``; KeyDamagedError if nothing is
    usable."""
    by_version: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
    foreign: list[tuple[int, tuple[str, ...]]] = []
    for handle, attrs in found:
        version = objects.parse_version(attrs.get(Attribute.ID) or b"")
        if not _aes256(attrs, version):
            log.warning("key_object_ignored", key_id=key_id, reason="not AES-256")
            continue
        usages = tuple(
            name for name, attr in zip(USAGE_NAMES, _USAGE_ATTRS, strict=True) if attrs.get(attr)
        )
        if version is None:
            foreign.append((handle, usages))
        else:
            by_version.setdefault(version, []).append((handle, usages))
    damaged: list[str] = []
    if foreign and 1 not in by_version and len(foreign) == 1:
        by_version[1] = foreign
    elif foreign:
        damaged.append(f"{len(foreign)} key objects without a distinct version, ignored")
    versions: dict[int, tuple[int, tuple[str, ...]]] = {}
    for version, objs in sorted(by_version.items()):
        if len(objs) == 1:
            versions[version] = objs[0]
            continue
        chosen, why = _one_of(version, objs, kcv_of)
        damaged.append(why)
        if chosen is not None:
            versions[version] = chosen
    if not versions:
        if damaged:
            raise KeyDamagedError(key_id, tuple(damaged))
        raise KeyNotFoundError()
    # A key whose metadata records its versions (every key made since 0.5) encrypts only with
    # a recorded one: a version is recorded once every HSM holds it, so a rotation cut short
    # never serves a version that some HSM lacks.  Keys without records use every version.
    pending = frozenset(v for v in versions if meta.versions and v not in meta.versions)
    recorded = [v for v in versions if v not in pending]
    if not recorded:
        damaged.append("no version its metadata records is usable")
    current = max(recorded or versions)
    info = KeyInfo(
        key_id=key_id,
        # PENDING_DELETION is DISABLED on the wire: the spec knows only the two.
        status=KeyStatus.ENABLED if meta.serving else KeyStatus.DISABLED,
        usages=versions[current][1],
        current_version=current,
        versions=frozenset(versions),
        damaged=tuple(damaged),
        pending=pending,
    )
    return info, {v: h for v, (h, _) in versions.items()}


class UnfinishedKeyError(KeyNotFoundError):
    """A key whose metadata still says CREATING: ``keys create`` (or the import of a new key)
    writes that on every HSM before the key's first objects and replaces it once every HSM
    holds the key, so this is a create cut short.  Not served (KMS must not start using a key
    that may yet be removed); ``keys create`` again finishes or redoes it."""

    def __init__(self, key_id: str) -> None:
        super().__init__(None)
        self.key_id = key_id
        self.detail = (
            "an unfinished keys create (its metadata still says CREATING; "
            "keys create again finishes it)"
        )


class KeyDamagedError(InternalError):
    """Every object of the key is unusable.  KMS sees a generic message (and the request
    fails over to another HSM, whose copy may be intact); *damaged* goes to logs and commands."""

    default_message = "the key's objects in this HSM cannot be used"

    def __init__(self, key_id: str, damaged: tuple[str, ...]) -> None:
        super().__init__(None)
        self.key_id, self.damaged = key_id, damaged
        self.detail = f"key {key_id!r}: " + "; ".join(damaged)


def find_key_blocking(
    session: pkcs11.Session, key_id: str, *, unfinished: bool = False
) -> tuple[KeyInfo, dict[int, int]]:
    """Read a key's versions, usage and status from the token; KeyNotFoundError if absent, and
    UnfinishedKeyError for a key still CREATING, unless *unfinished* (a create checking what it
    has written so far)."""
    # Token objects only: session copies (Pkcs11Hsm._sync_copies_blocking) have the same label.
    objs = {
        obj.handle: obj
        for obj in session.get_objects(token_key_template(key_id))
        if obj.handle is not None
    }  # the search ends here: no key may be used while it is open (CKR_OPERATION_ACTIVE)
    if not objs:
        raise KeyNotFoundError()
    found = [(handle, obj.get_attributes(_KEY_ATTRS)) for handle, obj in objs.items()]
    meta = read_meta_blocking(session, key_id)
    if not unfinished and meta.status == objects.CREATING:
        raise UnfinishedKeyError(key_id)
    return _key_of(key_id, found, meta, _kcv_by(objs))


def _kcv_by(objs: dict[int, Any]) -> KcvOf:
    return lambda handle: kcv_blocking(objs[handle])


#: What :func:`scan_blocking` found for a key: its metadata and handles, or why it cannot serve.
Scanned = tuple[KeyInfo, dict[int, int]] | XksError


def scan_blocking(session: pkcs11.Session) -> dict[str, Scanned]:
    """Every key of the token in one pass: two searches (key objects, state objects) and one
    attribute read per object, instead of two searches per key.  A SoftHSM search reads every
    object of the token, so looking keys up one by one costs keys x objects."""
    by_label: dict[str, list[tuple[int, dict[Any, Any]]]] = {}
    objs: dict[int, Any] = {}
    for obj in session.get_objects(_TOKEN_KEYS):
        if obj.handle is None:
            continue
        objs[obj.handle] = obj
        attrs = obj.get_attributes([Attribute.LABEL, *_KEY_ATTRS])
        label = attrs.get(Attribute.LABEL)
        if isinstance(label, str):
            by_label.setdefault(label, []).append((obj.handle, attrs))
    states: dict[str, list[bytes]] = {}
    template = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: objects.STATE_APPLICATION}
    for data in session.get_objects(template):
        attrs = data.get_attributes([Attribute.LABEL, Attribute.VALUE])
        label, value = attrs.get(Attribute.LABEL), attrs.get(Attribute.VALUE)
        if isinstance(label, str) and value is not None:
            states.setdefault(label, []).append(bytes(value))
    out: dict[str, Scanned] = {}
    for label, found in by_label.items():
        meta = objects.current_meta(states.get(label, ()))
        if meta.status == objects.CREATING:
            out[label] = UnfinishedKeyError(label)
            continue
        try:
            out[label] = _key_of(label, found, meta, _kcv_by(objs))
        except XksError as exc:  # this key cannot serve; the others can
            out[label] = exc
    for label, raws in states.items():  # a create cut short before its first key object
        if label not in out and objects.current_meta(raws).status == objects.CREATING:
            out[label] = UnfinishedKeyError(label)
    return out


class Pkcs11Hsm:
    """An HSM reached through a PKCS#11 module."""

    def __init__(
        self,
        config: HsmConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self.name = config.name
        self._clock = clock
        # A thread per session, and two for opening and closing sessions beside them.
        self._executor = CallRunner(config.pool_size + 2, name=f"hsm-{config.name}")
        self._lib: ThreadSafeLib | None = None
        self._token: pkcs11.Token | None = None
        self._login: pkcs11.Session | None = None
        self._pool: SessionPool[_Session] | None = None
        self._keys: dict[str, _CachedKey] = {}
        self._finding: dict[str, asyncio.Task[_CachedKey]] = {}  # lookups under way
        self._sweeping: asyncio.Task[None] | None = None  # a pass over every key, under way
        self._due: set[str] = set()  # keys whose refresh is due and not done yet
        self._rechecked: dict[str, float] = {}  # key -> when a missing version was last sought
        self._pass_seconds = 0.0  # how long the last pass over every key took
        self._warned_slow_pass = False
        # Keys served in this window of one TTL and the one before: how many keys are in use.
        self._used: set[str] = set()
        self._used_before: set[str] = set()
        self._used_since = 0.0
        self._kat: tuple[bytes, bytes] | None = None  # the health key's known answer, once read
        self._kat_read = False
        # How this token makes GCM IVs: found on the health key after every open (gcm.py).
        self._gcm: gcm.Detection | None = None
        self._model = "unknown"
        self._reopening: asyncio.Task[None] | None = None
        self.needs_reopen = False  # set by a device error; the health monitor acts on it
        self._next_reopen = 0.0
        self._reopen_backoff = REOPEN_BACKOFF_MIN / 2
        self.unavailable_reason = "not opened"  # why the HSM cannot serve, while it cannot
        self.call_timeout = config.call_timeout_ms / 1000
        # Set by the application: whether the process is short of CPU (http/overload.py).
        self.overloaded: Callable[[], bool] = lambda: False
        # Session copies of keys, made in the login session (which lives as long as the
        # process's login), so every pooled session can use them: key id -> {token object
        # handle: copy handle}.  Guarded by _copy_lock; the login session is used by one
        # thread at a time under it.
        self._copies: dict[str, dict[int, int]] = {}
        self._copy_lock = threading.Lock()

    @property
    def model(self) -> str:
        return self._model

    @property
    def gcm_detail(self) -> str:
        """The AES-GCM IV mode in use, or why there is none (``xksproxy check`` prints it)."""
        found = self._gcm
        if found is None:
            return f"IV mode not known yet (gcm_iv {self.config.gcm_iv})"
        if found.mode is None:
            return found.detail
        lengths = "12- and 16-byte IVs" if found.decrypts_iv16 else "12-byte IVs only"
        return f"{found.detail}; decrypts {lengths}"

    def accepts_iv_length(self, length: int) -> bool:
        """Whether a Decrypt with an IV of *length* bytes may be sent here (unknown: yes)."""
        found = self._gcm
        return length == 12 or found is None or found.decrypts_iv16

    def pool_stats(self) -> PoolStats:
        pool = self._pool
        return PoolStats(0, 0, 0, 0) if pool is None else pool.stats()

    def trim_pool(self) -> None:
        """Close sessions the pool grew to and no longer needs (called once a second)."""
        if self._pool is not None:
            self._pool.trim()

    @property
    def load(self) -> int:
        pool = self._pool
        return 0 if pool is None else pool.busy + pool.waiting

    # ---- opening and closing -------------------------------------------------------------

    def _open_token_blocking(self, pin: str) -> None:
        try:
            lib = load_library(str(self.config.module), self.config.env, self.name)
        except Pkcs11InitError as exc:
            raise HsmUnavailableError(str(exc)) from exc
        self._lib = lib
        try:
            token = find_token(lib, self.config.token_label, self.config.token_serial)
        except PKCS11Error as exc:
            raise HsmUnavailableError(
                f"{self.config.token_desc} not found ({type(exc).__name__})"
            ) from exc
        self._token = token
        self._model = (
            " ".join(part for part in (token.manufacturer_id, token.model) if part).strip()
            or "PKCS#11 token"
        )
        try:
            self._login = token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Login is per application: a session of ours is logged in already.
            self._login = token.open(rw=True)
        except PKCS11Error as exc:
            raise HsmUnavailableError(f"login failed: {ckr_name(exc)}") from exc

    def _open_session_blocking(self) -> _Session:
        assert self._token is not None
        started = time.perf_counter()
        session = _Session(self._token.open(rw=True))
        if self._metrics is not None:
            self._metrics.hsm_call(self.name, "open_session", time.perf_counter() - started)
        return session

    @staticmethod
    def _close_session_blocking(s: _Session) -> None:
        s.session.close()

    async def open(self, pin: str) -> None:
        """Load the module, log in once, open the session pool, find the GCM IV mode."""
        await self._open_step(self._open_token_blocking, pin)
        await self._start_pool()
        await self._detect_quietly()

    async def _start_pool(self) -> None:
        metrics, name = self._metrics, self.name
        pool = SessionPool(
            self.config.pool_size,
            self._open_session_blocking,
            self._close_session_blocking,
            self._executor,
            on_acquire=None if metrics is None else lambda s: metrics.pool_acquire(name, s),
            name=name,
            overloaded=lambda: self.overloaded(),
            max_size=self.config.max_pool_size,
        )
        try:
            await pool.start()
        except PKCS11Error as exc:
            self.unavailable_reason = f"cannot open sessions: {ckr_name(exc)}"
            raise HsmUnavailableError(self.unavailable_reason) from exc
        self._pool = pool
        self.unavailable_reason = ""

    async def close(self) -> None:
        """Close sessions, log out, and stop the executor."""
        for task in list(self._finding.values()):
            task.cancel()
        if self._sweeping is not None:
            self._sweeping.cancel()
        if self._pool is not None:
            await self._pool.close()
        await self._log_out()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _log_out(self) -> None:
        """Close the login session (logging out), if there is one; errors do not matter."""
        if self._login is not None:
            login, self._login = self._login, None
            with contextlib.suppress(PKCS11Error):
                await asyncio.get_running_loop().run_in_executor(self._executor, login.close)

    async def _open_step(self, fn: Callable[[str], None], pin: str) -> None:
        """Run a blocking step of opening the token; a failure is why the HSM is unavailable."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, fn, pin)
        except HsmUnavailableError as exc:
            self.unavailable_reason = exc.detail
            raise

    def _reinit_blocking(self, pin: str) -> None:
        try:
            # Re-initialise the module only if no other HSM uses it: C_Finalize would close
            # their sessions too.  A shared module is reopened by logging in again.
            if self._lib is not None and not shared_with_others(self._lib.so, self.name):
                self._lib.reinitialize_module()
            self._open_token_blocking(pin)
        except Pkcs11InitError as exc:
            raise HsmUnavailableError(str(exc)) from exc

    async def recover(self) -> None:
        """Reopen the HSM if a device error or a failed open left it unusable; refill lost
        sessions otherwise.  Cheap when there is nothing to do: the prober calls it each round."""
        if self.needs_reopen or self._pool is None:
            now = self._clock()
            if now < self._next_reopen:
                return  # back off: failed requests wake the prober often
            self._reopen_backoff = min(REOPEN_BACKOFF_MAX, self._reopen_backoff * 2)
            self._next_reopen = now + self._reopen_backoff
            await self.reopen()
            self._reopen_backoff = REOPEN_BACKOFF_MIN / 2
        elif self._pool.lost:
            try:
                await self._pool.refill()
            except PKCS11Error as exc:
                # Sessions cannot even be opened: start over (module, login, sessions) next time.
                self.needs_reopen = True
                raise HsmUnavailableError(f"cannot open sessions: {ckr_name(exc)}") from exc

    async def reopen(self) -> None:
        """After a device error: re-initialise the module, log in, reopen every session."""
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.ensure_future(self._do_reopen())
        await asyncio.shield(self._reopening)

    async def _do_reopen(self) -> None:
        if self._pool is not None and self._pool.stuck:
            # C_Finalize under a call still inside the module is undefined behaviour: wait for
            # the hung calls to come back (the prober tries again next round).
            raise HsmUnavailableError("calls are still hung in the HSM; reopen postponed")
        log.warning("hsm_reopen", hsm=self.name)
        pin = self.config.read_pin()
        old = self._pool
        self._pool = None
        self._keys.clear()
        self._kat_read = False
        self._gcm = None  # another token or firmware may be behind the module now
        self._copies = {}  # they die with the login session closed below (no lock: see above)
        if old is not None:
            await old.close()
            # C_Finalize must not run under a call still in flight on another thread.
            await old.drain(2 * self.call_timeout)
        await self._log_out()  # its handle dies with C_Finalize, or is replaced below
        await self._open_step(self._reinit_blocking, pin)
        await self._start_pool()
        self.needs_reopen = False
        self._sweep_soon()  # the keys' handles died with the old login: find them all again
        await self._detect_quietly()

    # ---- calls ---------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[[_Session], T]) -> Callable[[_Session], T]:
        """Wrap a blocking call so PKCS#11 failures become decisions (pkcs11_errors)."""
        vendor, metrics, hsm = self.config.vendor, self._metrics, self.name

        def run(s: _Session) -> T:
            started = time.perf_counter()
            try:
                return fn(s)
            except PKCS11Error as exc:
                name = ckr_name(exc)
                if metrics is not None:
                    metrics.hsm_error(hsm, name)
                fault = classify(name, operation, vendor)
                if fault is Fault.BAD_CIPHERTEXT:
                    raise InvalidCiphertextError() from None
                if fault is Fault.KEY_USAGE:
                    raise InvalidKeyUsageError() from None
                if fault is Fault.STALE_HANDLE:
                    raise _StaleHandle(name) from None
                if fault is Fault.DEVICE:
                    # Set here, in the call's thread: a call abandoned after overrunning still
                    # tells us the device needs reopening when it finally fails.
                    self.needs_reopen = True
                if fault in (Fault.SESSION, Fault.DEVICE):
                    raise BrokenSessionError(name) from exc
                raise _Pkcs11Failure(operation, name) from exc
            finally:
                if metrics is not None:
                    metrics.hsm_call(hsm, operation, time.perf_counter() - started)

        return run

    async def _run(
        self,
        operation: str,
        fn: Callable[[_Session], T],
        deadline: float,
        *,
        limited: bool = True,
    ) -> T:
        """Run *fn* on a pooled session by *deadline*; a *limited* call may also take at most
        ``call_timeout_ms`` (overrunning that is the HSM's fault)."""
        pool = self._pool
        if pool is None:
            raise HsmUnavailableError(detail=self.unavailable_reason)
        limit = self.call_timeout if limited else None
        try:
            return await pool.run(self._call(operation, fn), deadline, limit)
        except DependencyTimeoutError:
            if self._metrics is not None:
                self._metrics.hsm_error(self.name, "TIMEOUT")
            raise
        except BrokenSessionError as exc:
            log.warning("hsm_session_broken", hsm=self.name, op=operation, ckr=str(exc))
            raise InternalError(f"HSM error during {operation}") from exc
        except _Pkcs11Failure as exc:
            log.warning("hsm_call_failed", hsm=self.name, op=operation, ckr=exc.ckr)
            raise InternalError(f"HSM error during {operation}") from exc

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        return (await self._cached_key(key_id, deadline, version)).info

    async def _cached_key(self, key_id: str, deadline: float, version: int = 0) -> _CachedKey:
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
        cached = self._keys.get(key_id)
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

    async def _wait_lookup(self, task: asyncio.Task[_CachedKey], deadline: float) -> _CachedKey:
        """The end of a lookup, by *deadline*; the lookup goes on if the wait ends first."""
        now = asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - now))
        except TimeoutError:
            pool = self._pool
            if pool is not None and pool.last_return > now:
                # The HSM answers other calls, so the lookup is slow, not hung (a big token):
                # retryable, and the lookup goes on so that the retry finds the key cached.
                raise ThrottlingError("the key is being looked up; retry") from None
            raise DependencyTimeoutError("the HSM did not answer the key lookup in time") from None

    async def _look_for_version(self, key_id: str, version: int, deadline: float) -> _CachedKey:
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

    def _lookup(self, key_id: str) -> asyncio.Task[_CachedKey]:
        task = asyncio.get_running_loop().create_task(self._find(key_id))
        self._finding[key_id] = task

        def done(t: asyncio.Task[_CachedKey]) -> None:
            if self._finding.get(key_id) is t:
                del self._finding[key_id]
            if not t.cancelled():
                t.exception()  # retrieved: a refresh nobody waits for may fail quietly

        task.add_done_callback(done)
        return task

    async def _find(self, key_id: str) -> _CachedKey:
        started = self._clock()
        deadline = asyncio.get_running_loop().time() + LOOKUP_TIMEOUT
        try:
            # A slow lookup is the token's size, not an HSM fault: no call time limit.
            info, handles = await self._run(
                "find_key", lambda s: self._find_blocking(s, key_id), deadline, limited=False
            )
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

    def _entry(self, info: KeyInfo, handles: dict[int, int], started: float) -> _CachedKey:
        ttl = self.config.key_cache_ttl_seconds
        expires = started + ttl
        # Refreshed early enough for a pass over the token to end before the entry expires
        # (a pass over 10,000 SoftHSM objects takes seconds), within half the TTL.
        lead = min(max(REFRESH_LEAD, 2 * self._pass_seconds), ttl / 2)
        return _CachedKey(info, handles, started, expires, expires - lead)

    def _store(self, key_id: str, entry: _CachedKey) -> None:
        """Cache *entry* unless a lookup that started later has cached the key already."""
        old = self._keys.get(key_id)
        if old is None or old.started <= entry.started:
            self._keys[key_id] = entry

    def _drop(self, key_id: str, started: float) -> None:
        """Forget a key found gone by a lookup that started at *started*."""
        old = self._keys.get(key_id)
        if old is not None and old.started <= started:
            del self._keys[key_id]

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
            self._sweep_soon()
        elif key_id not in self._finding:
            self._lookup(key_id)

    def _keys_in_use(self, now: float) -> int:
        """Distinct keys served in the current window of one TTL or in the one before."""
        if now - self._used_since >= self.config.key_cache_ttl_seconds:
            self._used_before, self._used = self._used, set()
            self._used_since = now
        return max(len(self._used), len(self._used_before))

    def _sweep_soon(self) -> None:
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
        scanned = await self._run("index", self._scan_blocking, deadline, limited=False)
        self._pass_seconds = took = loop.time() - began
        ttl = self.config.key_cache_ttl_seconds
        if took > ttl / 4 and not self._warned_slow_pass:
            # Entries then expire before a pass under load has refreshed them, and each use
            # turns into a lookup of its own: a longer TTL is the remedy (README).
            self._warned_slow_pass = True
            log.warning(
                "hsm_key_index_slow",
                hsm=self.name,
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
        for key_id in [k for k in self._keys if k not in scanned]:
            self._drop(key_id, started)
        log.debug("hsm_keys_indexed", hsm=self.name, keys=len(scanned))

    def _say_damaged(self, key_id: str, damaged: tuple[str, ...]) -> None:
        """Log what a lookup or pass left out of a key (KeyInfo.damaged), if anything."""
        if damaged:
            log.warning("key_objects_damaged", hsm=self.name, key_id=key_id, damaged=damaged)

    async def key_problems(self) -> dict[str, tuple[str, ...]]:
        """Every key of the token that cannot serve whole, and why (``xksproxy check``): one
        pass over the token, without a time limit."""
        deadline = asyncio.get_running_loop().time() + SWEEP_TIMEOUT
        scanned = await self._run(
            "index",
            lambda s: scan_blocking(s.session),
            deadline,
            limited=False,
        )
        out: dict[str, tuple[str, ...]] = {}
        for key_id, found in sorted(scanned.items()):
            if isinstance(found, KeyDamagedError):
                out[key_id] = found.damaged
            elif isinstance(found, UnfinishedKeyError):
                out[key_id] = (found.detail,)
            elif isinstance(found, XksError):
                continue  # not a key of ours (not AES-256)
            elif found[0].problems:
                out[key_id] = found[0].problems
        return out

    def _scan_blocking(self, s: _Session) -> dict[str, Scanned]:
        """Every key of the token, with the handles to use (session copies if on).  A pass
        that does not see the health key saw an unreadable token: it forgets nothing."""
        scanned = scan_blocking(s.session)
        if self.config.health_key not in scanned:
            health = self.config.health_key
            raise self._blind(
                f"a pass over the token's keys did not find the health key {health!r}"
            )
        if self.config.use_session_copies:
            for key_id, found in scanned.items():
                if not isinstance(found, XksError):
                    scanned[key_id] = (found[0], self._sync_copies_blocking(key_id, found[1]))
            for key_id in [k for k in list(self._copies) if k not in scanned]:
                self._sync_copies_blocking(key_id, {})  # the key is gone: so are its copies
        return scanned

    def _find_blocking(self, s: _Session, key_id: str) -> tuple[KeyInfo, dict[int, int]]:
        """The key's metadata and the handles to use per version (session copies if on)."""
        try:
            info, handles = find_key_blocking(s.session, key_id)
        except UnfinishedKeyError:
            raise
        except KeyNotFoundError:
            self._check_sighted_blocking(s, key_id)
            if self.config.use_session_copies:
                self._sync_copies_blocking(key_id, {})  # the key is gone: so are its copies
            raise
        if self.config.use_session_copies:
            handles = self._sync_copies_blocking(key_id, handles)
        return info, handles

    def _check_sighted_blocking(self, s: _Session, key_id: str) -> None:
        """A search found no *key_id*: believe it only if the token still shows the health
        key, which every served token holds.  A module that cannot read its own store for a
        local reason answers searches with nothing at all (SoftHSM out of file descriptors
        does, and keeps doing so after they return until it is initialised again): that is an
        HSM fault, never "no such key" (which KMS reports to the caller as a missing key)."""
        health = self.config.health_key
        if key_id == health:
            raise self._blind(f"a search did not find the health key {health!r}")
        if not any(
            obj.handle is not None for obj in s.session.get_objects(token_key_template(health))
        ):
            raise self._blind(f"a search found neither {key_id!r} nor the health key {health!r}")

    def _blind(self, what: str) -> HsmUnavailableError:
        """The token shows none of the objects it must hold: reopen it (module, login,
        sessions), as after a device error, and fail over meanwhile."""
        self.needs_reopen = True
        return HsmUnavailableError(
            f"{what}: the token is unreadable (out of file descriptors or memory, a lost "
            "token directory or partition) or the health key was deleted; reopening"
        )

    def _sync_copies_blocking(self, key_id: str, handles: dict[int, int]) -> dict[int, int]:
        """Session copies of the token objects in *handles* (version -> handle), made where
        missing; copies of objects no longer in the token are destroyed.

        Why: SoftHSM re-reads a token key's file on every use; a session copy doubles the
        raw AES-GCM rate here (loadtest/hsm_loop.py).  The copy stays sensitive and is made
        non-extractable (PKCS#11 lets both only become stricter), so the material stays
        inside the HSM; a key that may not be copied (CKA_COPYABLE false, or
        an HSM without C_CopyObject) is used from the token as before.
        """
        with self._copy_lock:
            login: Any = self._login  # python-pkcs11's stubs lack the session's handle
            known = self._copies.get(key_id, {})
            if login is None or self._lib is None:
                return handles
            functions = self._lib.functions
            wanted = set(handles.values())
            try:
                # By handle: a token object's handle is valid in every session, so no search.
                for handle in wanted - set(known):
                    known[handle] = session_copy_blocking(functions, login.handle, handle)
            except PKCS11Error as exc:
                log.warning(
                    "session_key_copy_refused", hsm=self.name, key_id=key_id, ckr=ckr_name(exc)
                )
                return handles
            for handle in set(known) - wanted:
                destroy_blocking(functions, login.handle, known.pop(handle))
            if known:
                self._copies[key_id] = known
            else:
                self._copies.pop(key_id, None)
            return {v: known.get(h, h) for v, h in handles.items()}

    def _forget_copies(self, key_id: str) -> None:
        """Copy handles that proved invalid (their session was closed): make new ones.

        Called on the event loop: no lock (a thread may hold it inside a hung HSM call);
        a single dict operation is atomic, and a race only costs one more stale handle."""
        self._copies.pop(key_id, None)

    async def warm(self, key_id: str) -> None:
        """Before serving, with no time limit: index every key of the token (the first time),
        look *key_id* up, and for the health key read its known answer and find the IV mode.
        What a first use would otherwise do within a probe's or request's time (slow in a big
        SoftHSM token).  Errors are left for the calls that follow."""
        loop = asyncio.get_running_loop()
        if self._sweeping is None:  # the first warm-up: index every key of the token
            self._sweep_soon()
            assert self._sweeping is not None
            with contextlib.suppress(XksError):
                await asyncio.shield(self._sweeping)
        deadline = loop.time() + LOOKUP_TIMEOUT
        with contextlib.suppress(XksError):  # the key vanished meanwhile
            await self._cached_key(key_id, deadline)
            if key_id == self.config.health_key:
                await self._known_answer(deadline)
                if self._gcm is None:
                    await self._detect_gcm(deadline)

    async def _with_key(
        self,
        operation: str,
        key_id: str,
        version: int,
        fn: Callable[[Any], T],
        deadline: float,
        *,
        limited: bool = True,
    ) -> T:
        """Run *fn* on a pooled session with the key's object of *version*, as a
        :class:`gcm.RawKey`: the cached handle, used in whichever session the pool gives."""
        for attempt in (1, 2):
            cached = await self._cached_key(key_id, deadline)
            handle = cached.handles.get(version)
            if handle is None:
                raise KeyNotFoundError(f"this HSM holds no version {version} of the key")
            if self._lib is None:
                raise HsmUnavailableError(detail=self.unavailable_reason)
            functions = self._lib.functions

            def call(s: _Session, handle: int = handle, functions: Any = functions) -> T:
                session: Any = s.session  # python-pkcs11's stubs lack its handle
                return fn(gcm.RawKey(functions, session.handle, handle))

            try:
                return await self._run(operation, call, deadline, limited=limited)
            except _StaleHandle:
                self._keys.pop(key_id, None)
                self._forget_copies(key_id)
                if attempt == 2:  # found again, and again unusable: the token's fault
                    raise InternalError("the key's object handle was invalid twice") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _mode(self) -> gcm.GcmMode:
        found = self._gcm
        if found is None:
            raise HsmUnavailableError("the HSM's AES-GCM IV mode is not known yet")
        if found.mode is None:
            raise HsmUnavailableError(found.detail)
        return found.mode

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        mode = self._mode()

        def enc(key: gcm.RawKey) -> tuple[bytes, bytes]:
            return gcm.encrypt_blocking(key, mode, plaintext, aad)

        try:
            return await self._with_key("encrypt", key_id, version, enc, deadline)
        except gcm.GcmOutputError as exc:
            # The token no longer behaves as it did when probed (a policy or firmware change):
            # find its mode again before serving another Encrypt from it.
            log.error("hsm_gcm_output_unexpected", hsm=self.name, detail=exc.detail)
            self._gcm = None
            raise

    async def decrypt(
        self, key_id: str, version: int, iv: bytes, data: bytes, aad: bytes, deadline: float
    ) -> bytes:
        def dec(key: gcm.RawKey) -> bytes:
            return gcm.decrypt_blocking(key, iv, data, aad)

        return await self._with_key("decrypt", key_id, version, dec, deadline)

    async def kcv(self, key_id: str, version: int, deadline: float) -> str | None:
        return await self._with_key("kcv", key_id, version, kcv_raw_blocking, deadline)

    async def _detect_gcm(self, deadline: float) -> gcm.Detection:
        """Find (again) how the token makes GCM IVs, on the health key (gcm.detect_blocking)."""
        label = self.config.health_key
        info = await self.key_info(label, deadline)
        setting, vendor = self.config.gcm_iv, self.config.vendor

        def detect(key: gcm.RawKey) -> gcm.Detection:
            return gcm.detect_blocking(key, setting, vendor)

        # Several calls in a row: the call time limit is for one call.
        found = await self._with_key(
            "gcm_probe", label, info.current_version, detect, deadline, limited=False
        )
        if found != self._gcm:
            event = log.info if found.mode is not None else log.error
            event("hsm_gcm_iv_mode", hsm=self.name, setting=setting, detail=found.detail)
        self._gcm = found
        return found

    async def _detect_quietly(self) -> None:
        """Find the GCM IV mode now, without a time limit; a failure is left for the probe,
        which reports it and tries again."""
        deadline = asyncio.get_running_loop().time() + LOOKUP_TIMEOUT
        with contextlib.suppress(XksError):
            await self._detect_gcm(deadline)

    async def _known_answer(self, deadline: float) -> tuple[bytes, bytes] | None:
        """The health key's recorded known answer: (IV, ciphertext || tag).  Read once per
        login: it never changes, and a search scans the whole token (SoftHSM: 0.35 s with
        10,000 keys), which is no measure of the HSM's health."""
        if not self._kat_read:
            label = self.config.health_key
            record = await self._run(
                "kat", lambda s: read_kat_blocking(s.session, label), deadline, limited=False
            )
            self._kat = None if record is None else gcm.decode_kat(record, objects.KAT_IV)
            if record is not None and self._kat is None:
                log.error("hsm_known_answer_unreadable", hsm=self.name)
            self._kat_read = True
        return self._kat

    async def probe(self, timeout: float) -> ProbeResult:
        """Decrypt the recorded known answer, then an Encrypt -> Decrypt round trip in the
        token's IV mode (found first if not known: after an open, or a change of behaviour).
        No fixed-IV encryption: an HSM that makes its own IVs could not do one."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        label = self.config.health_key

        def failed(detail: str) -> ProbeResult:
            return ProbeResult(False, loop.time() - start, detail)

        try:
            version = (await self.key_info(label, deadline)).current_version
            found = self._gcm
            if found is None or found.mode is None:
                found = await self._detect_gcm(deadline)
            if found.mode is None:
                return failed(found.detail)
            known = await self._known_answer(deadline)
            if known is not None:
                try:
                    back = await self.decrypt(label, version, *known, objects.KAT_AAD, deadline)
                except InvalidCiphertextError:
                    back = None
                if back != objects.KAT_PLAINTEXT:
                    return failed("known-answer mismatch")
            iv, out = await self.encrypt(
                label, version, objects.KAT_PLAINTEXT, objects.KAT_AAD, deadline
            )
            back = await self.decrypt(label, version, iv, out, objects.KAT_AAD, deadline)
            if back != objects.KAT_PLAINTEXT:
                return failed("round trip mismatch")
        except XksError as exc:
            detail = getattr(exc, "detail", None) or exc.message
            return failed(f"{exc.error_name}: {detail}")
        return ProbeResult(
            True, loop.time() - start, "ok" if known else "ok (no recorded known answer)"
        )


class _Pkcs11Failure(Exception):
    def __init__(self, operation: str, ckr: str) -> None:
        super().__init__(f"{operation}: {ckr}")
        self.ckr = ckr


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's exception: a pass nobody waits for may fail quietly (the
    keys then expire and are looked up one by one, which reports the error)."""
    if not task.cancelled():
        task.exception()


def data_template(label: str, application: str) -> dict[Attribute, Any]:
    """The search for xksproxy's CKO_DATA object of *application* for *label* (hsm/objects.py)."""
    return {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: label,
        Attribute.APPLICATION: application,
    }


# Token objects only: session copies (Pkcs11Hsm._sync_copies_blocking) have the same label.
_TOKEN_KEYS: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}


def token_key_template(key_id: str) -> dict[Attribute, Any]:
    """The search for *key_id*'s token key objects (its versions; never its session copies)."""
    return {**_TOKEN_KEYS, Attribute.LABEL: key_id}


def read_kat_blocking(session: pkcs11.Session, label: str) -> bytes | None:
    """The recorded known answer for the health key, if one was recorded."""
    for data in session.get_objects(data_template(label, objects.KAT_APPLICATION)):
        value: Any = data[Attribute.VALUE]
        return bytes(value)
    return None
