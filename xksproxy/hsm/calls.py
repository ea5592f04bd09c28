"""The adapter's PKCS#11 calls on pooled sessions, and what their failures become.

Every call :class:`xksproxy.hsm.pkcs11_backend.Pkcs11Hsm` makes in a pooled session runs
through :class:`Pkcs11Calls`: timed and counted for the observer, and a PKCS#11 failure
classified (hsm/pkcs11_errors.py) and raised as what the service acts on: the caller's bad
ciphertext or key usage (an XksError), a stale key handle (:class:`StaleHandle`: look the key
up again), a broken session (the pool replaces it), a failing device (the HSM is reopened), or
an internal error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pkcs11
import structlog
from pkcs11.exceptions import PKCS11Error

from xksproxy.errors import (
    DependencyTimeoutError,
    InternalError,
    InvalidCiphertextError,
    InvalidKeyUsageError,
)
from xksproxy.hsm.base import HsmObserver
from xksproxy.hsm.pkcs11_errors import Fault, ckr_name, classify
from xksproxy.hsm.pool import BrokenSessionError, SessionPool

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass
class Session:
    """A pooled PKCS#11 session.  Keys are used by handle (:class:`gcm.RawKey`): a token
    object's handle is valid in every session, so no session searches for key objects."""

    session: pkcs11.Session


class StaleHandle(Exception):
    """A cached key handle is no longer valid."""


class _Pkcs11Failure(Exception):
    def __init__(self, operation: str, ckr: str) -> None:
        super().__init__(f"{operation}: {ckr}")
        self.ckr = ckr


class Pkcs11Calls:
    """The calls of the HSM named *hsm*: *vendor* decides what some CKR codes mean
    (pkcs11_errors.classify), *observer* (if any) sees every call and failure, and
    *device_failed* is called, in the call's thread, when the device needs reopening."""

    def __init__(
        self,
        hsm: str,
        vendor: str,
        observer: HsmObserver | None,
        device_failed: Callable[[], None],
    ) -> None:
        self.hsm = hsm
        self.vendor = vendor
        self.observer = observer
        self._device_failed = device_failed

    def _call(self, operation: str, fn: Callable[[Session], T]) -> Callable[[Session], T]:
        """Wrap a blocking call so PKCS#11 failures become decisions (pkcs11_errors)."""
        vendor, metrics, hsm = self.vendor, self.observer, self.hsm
        device_failed = self._device_failed

        def run(s: Session) -> T:
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
                    raise StaleHandle(name) from None
                if fault is Fault.DEVICE:
                    # Set here, in the call's thread: a call abandoned after overrunning still
                    # tells us the device needs reopening when it finally fails.
                    device_failed()
                if fault in (Fault.SESSION, Fault.DEVICE):
                    raise BrokenSessionError(name) from exc
                raise _Pkcs11Failure(operation, name) from exc
            finally:
                if metrics is not None:
                    metrics.hsm_call(hsm, operation, time.perf_counter() - started)

        return run

    async def run(
        self,
        pool: SessionPool[Session],
        operation: str,
        fn: Callable[[Session], T],
        deadline: float,
        limit: float | None,
    ) -> T:
        """Run *fn* on a session of *pool* by *deadline*, and within *limit* seconds if one is
        given (overrunning that is the HSM's fault); a failure the service does not act on
        itself is an InternalError."""
        try:
            return await pool.run(self._call(operation, fn), deadline, limit)
        except DependencyTimeoutError:
            if self.observer is not None:
                self.observer.hsm_error(self.hsm, "TIMEOUT")
            raise
        except BrokenSessionError as exc:
            log.warning("hsm_session_broken", hsm=self.hsm, op=operation, ckr=str(exc))
            raise InternalError(f"HSM error during {operation}") from exc
        except _Pkcs11Failure as exc:
            log.warning("hsm_call_failed", hsm=self.hsm, op=operation, ckr=exc.ckr)
            raise InternalError(f"HSM error during {operation}") from exc
