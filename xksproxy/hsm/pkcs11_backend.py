"""The :class:`~xksproxy.hsm.base.Hsm` implementation over PKCS#11 (python-pkcs11).

One object per configured HSM: its module (initialised for threads), one login session kept
for the life of the process, a bounded pool of further sessions, its own call runner (threads),
and a cache of key metadata and handles.  Every PKCS#11 call runs on the runner's threads.
This module opens, closes and reopens the HSM and serves its operations; the key cache
(hsm/keycache.py), the token's key objects (hsm/keystore.py), session copies of keys
(hsm/copies.py) and what a failed call becomes (hsm/calls.py) have modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
import structlog
from pkcs11.exceptions import PKCS11Error

from xksproxy.config import HsmConfig
from xksproxy.errors import (
    InternalError,
    InvalidCiphertextError,
    KeyNotFoundError,
    XksError,
)
from xksproxy.hsm import gcm, objects
from xksproxy.hsm.base import HsmObserver, KeyInfo, ProbeResult
from xksproxy.hsm.calls import Pkcs11Calls, Session, StaleHandle
from xksproxy.hsm.copies import SessionCopies
from xksproxy.hsm.kcv import kcv_raw_blocking
from xksproxy.hsm.keycache import LOOKUP_TIMEOUT, SWEEP_TIMEOUT, KeyCache
from xksproxy.hsm.keystore import (
    KeyDamagedError,
    Scanned,
    UnfinishedKeyError,
    find_key_blocking,
    read_kat_blocking,
    scan_blocking,
    token_key_template,
)
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.hsm.pkcs11_lib import (
    Pkcs11InitError,
    ThreadSafeLib,
    find_token,
    load_library,
    shared_with_others,
)
from xksproxy.hsm.pool import PoolStats, SessionPool
from xksproxy.hsm.runner import CallRunner

log = structlog.get_logger(__name__)
T = TypeVar("T")


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


class Pkcs11Hsm:
    """An HSM reached through a PKCS#11 module."""

    def __init__(
        self,
        config: HsmConfig,
        *,
        metrics: HsmObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        overloaded: Callable[[], bool] = lambda: False,
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
        self._pool: SessionPool[Session] | None = None
        self._calls = Pkcs11Calls(config.name, config.vendor, metrics, self._device_failed)
        self._cache = KeyCache(
            config.name,
            config.key_cache_ttl_seconds,
            self._read_key,
            self._read_all,
            self._last_return,
            clock,
        )
        self._kat: tuple[bytes, bytes] | None = None  # the health key's known answer, once read
        self._kat_read = False
        # How this token makes GCM IVs: found on the health key after every open (gcm.py).
        self._gcm: gcm.Detection | None = None
        self._model = "unknown"
        self._reopening: asyncio.Task[None] | None = None
        self._needs_reopen = False  # set by a device error; the health monitor acts on it
        self._next_reopen = 0.0
        self._reopen_backoff = REOPEN_BACKOFF_MIN / 2
        self.unavailable_reason = "not opened"  # why the HSM cannot serve, while it cannot
        self.call_timeout = config.call_timeout_ms / 1000
        # Whether the process is short of CPU (http/overload.py): the pool grows only if not.
        self._overloaded = overloaded
        # Session copies of keys, made in the login session (hsm/copies.py).
        self._copies = SessionCopies(config.name, lambda: (self._lib, self._login))

    @property
    def model(self) -> str:
        return self._model

    @property
    def health_key(self) -> str:
        return self.config.health_key

    @property
    def reopen_pending(self) -> bool:
        return self._needs_reopen

    def request_reopen(self) -> None:
        self._needs_reopen = True

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

    def _open_session_blocking(self) -> Session:
        assert self._token is not None
        started = time.perf_counter()
        session = Session(self._token.open(rw=True))
        if self._metrics is not None:
            self._metrics.hsm_call(self.name, "open_session", time.perf_counter() - started)
        return session

    @staticmethod
    def _close_session_blocking(s: Session) -> None:
        s.session.close()

    async def open(self, pin: str, timeout: float | None = None) -> None:
        """Load the module, log in once, open the session pool, find the GCM IV mode; within
        *timeout* seconds if given (HsmUnavailableError, and the HSM unavailable, if not)."""
        try:
            await asyncio.wait_for(self._open(pin), timeout)
        except TimeoutError:
            self.unavailable_reason = f"did not open within {timeout:.0f} s"
            raise HsmUnavailableError(self.unavailable_reason) from None

    async def _open(self, pin: str) -> None:
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
            overloaded=self._overloaded,
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
        self._cache.cancel()
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
        if self._needs_reopen or self._pool is None:
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
                self._needs_reopen = True
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
        self._cache.keys.clear()
        self._kat_read = False
        self._gcm = None  # another token or firmware may be behind the module now
        self._copies.drop_all()  # they die with the login session closed below
        if old is not None:
            await old.close()
            # C_Finalize must not run under a call still in flight on another thread.
            await old.drain(2 * self.call_timeout)
        await self._log_out()  # its handle dies with C_Finalize, or is replaced below
        await self._open_step(self._reinit_blocking, pin)
        await self._start_pool()
        self._needs_reopen = False
        self._cache.sweep_soon()  # the keys' handles died with the old login: find them all again
        await self._detect_quietly()

    # ---- calls ---------------------------------------------------------------------------

    async def _run(
        self,
        operation: str,
        fn: Callable[[Session], T],
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
        return await self._calls.run(pool, operation, fn, deadline, limit)

    def _device_failed(self) -> None:
        """A call's device error (in the call's thread): the health monitor reopens the HSM."""
        self._needs_reopen = True

    def _last_return(self) -> float:
        """The loop time at which a call last returned (the key cache tells slow from hung)."""
        pool = self._pool
        return -math.inf if pool is None else pool.last_return

    # ---- keys: the cache (hsm/keycache.py) reads the token through these -----------------

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        return (await self._cache.cached_key(key_id, deadline, version)).info

    async def _read_key(self, key_id: str, deadline: float) -> tuple[KeyInfo, dict[int, int]]:
        """Look *key_id* up for the key cache (its ReadKey)."""
        # A slow lookup is the token's size, not an HSM fault: no call time limit.
        return await self._run(
            "find_key", lambda s: self._find_blocking(s, key_id), deadline, limited=False
        )

    async def _read_all(self, deadline: float) -> dict[str, Scanned]:
        """Read every key of the token in one pass for the key cache (its ReadAll)."""
        return await self._run("index", self._scan_blocking, deadline, limited=False)

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

    def _scan_blocking(self, s: Session) -> dict[str, Scanned]:
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
                    scanned[key_id] = (
                        found[0],
                        self._copies.sync_copies_blocking(key_id, found[1]),
                    )
            for key_id in [k for k in self._copies.key_ids() if k not in scanned]:
                self._copies.sync_copies_blocking(key_id, {})  # the key is gone: so are its copies
        return scanned

    def _find_blocking(self, s: Session, key_id: str) -> tuple[KeyInfo, dict[int, int]]:
        """The key's metadata and the handles to use per version (session copies if on)."""
        try:
            info, handles = find_key_blocking(s.session, key_id)
        except UnfinishedKeyError:
            raise
        except KeyNotFoundError:
            self._check_sighted_blocking(s, key_id)
            if self.config.use_session_copies:
                self._copies.sync_copies_blocking(key_id, {})  # the key is gone: so are its copies
            raise
        if self.config.use_session_copies:
            handles = self._copies.sync_copies_blocking(key_id, handles)
        return info, handles

    def _check_sighted_blocking(self, s: Session, key_id: str) -> None:
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
        self._needs_reopen = True
        return HsmUnavailableError(
            f"{what}: the token is unreadable (out of file descriptors or memory, a lost "
            "token directory or partition) or the health key was deleted; reopening"
        )

    # ---- operations and probes -----------------------------------------------------------

    async def warm(self, key_id: str) -> None:
        """Before serving, with no time limit: index every key of the token (the first time),
        look *key_id* up, and for the health key read its known answer and find the IV mode.
        What a first use would otherwise do within a probe's or request's time (slow in a big
        SoftHSM token).  Errors are left for the calls that follow."""
        loop = asyncio.get_running_loop()
        await self._cache.warm()  # the first warm-up: index every key of the token
        deadline = loop.time() + LOOKUP_TIMEOUT
        with contextlib.suppress(XksError):  # the key vanished meanwhile
            await self._cache.cached_key(key_id, deadline)
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
            cached = await self._cache.cached_key(key_id, deadline)
            handle = cached.handles.get(version)
            if handle is None:
                raise KeyNotFoundError(f"this HSM holds no version {version} of the key")
            if self._lib is None:
                raise HsmUnavailableError(detail=self.unavailable_reason)
            functions = self._lib.functions

            def call(s: Session, handle: int = handle, functions: Any = functions) -> T:
                session: Any = s.session  # python-pkcs11's stubs lack its handle
                return fn(gcm.RawKey(functions, session.handle, handle))

            try:
                return await self._run(operation, call, deadline, limited=limited)
            except StaleHandle:
                self._cache.keys.pop(key_id, None)
                self._copies.forget_copies(key_id)
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
