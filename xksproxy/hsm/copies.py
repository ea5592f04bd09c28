"""Session copies of an HSM's keys (``session_key_copies``), used instead of its token objects
(why: :meth:`SessionCopies.sync_copies_blocking`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pkcs11
import structlog
from pkcs11.exceptions import PKCS11Error

from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.hsm.pkcs11_lib import ThreadSafeLib, destroy_blocking, session_copy_blocking

log = structlog.get_logger(__name__)

#: The HSM's module and login session, either None while the HSM is not open.
Login = Callable[[], tuple[ThreadSafeLib | None, pkcs11.Session | None]]


class SessionCopies:
    """Session copies of keys, made in the login session (which lives as long as the
    process's login), so every pooled session can use them: key id -> {token object
    handle: copy handle}.  Guarded by a lock; the login session is used by one thread at a
    time under it.  *login* gives the HSM's module and login session as they are now."""

    def __init__(self, hsm: str, login: Login) -> None:
        self.hsm = hsm
        self._login = login
        self._copies: dict[str, dict[int, int]] = {}
        self._copy_lock = threading.Lock()

    def sync_copies_blocking(self, key_id: str, handles: dict[int, int]) -> dict[int, int]:
        """Session copies of the token objects in *handles* (version -> handle), made where
        missing; copies of objects no longer in the token are destroyed.

        Why: SoftHSM re-reads a token key's file on every use; a session copy doubles the
        raw AES-GCM rate here (loadtest/hsm_loop.py).  The copy stays sensitive and is made
        non-extractable (PKCS#11 lets both only become stricter), so the material stays
        inside the HSM; a key that may not be copied (CKA_COPYABLE false, or
        an HSM without C_CopyObject) is used from the token as before.
        """
        with self._copy_lock:
            lib, session = self._login()
            login: Any = session  # python-pkcs11's stubs lack the session's handle
            known = self._copies.get(key_id, {})
            if login is None or lib is None:
                return handles
            functions = lib.functions
            wanted = set(handles.values())
            try:
                # By handle: a token object's handle is valid in every session, so no search.
                for handle in wanted - set(known):
                    known[handle] = session_copy_blocking(functions, login.handle, handle)
            except PKCS11Error as exc:
                log.warning(
                    "session_key_copy_refused", hsm=self.hsm, key_id=key_id, ckr=ckr_name(exc)
                )
                return handles
            for handle in set(known) - wanted:
                destroy_blocking(functions, login.handle, known.pop(handle))
            if known:
                self._copies[key_id] = known
            else:
                self._copies.pop(key_id, None)
            return {v: known.get(h, h) for v, h in handles.items()}

    def key_ids(self) -> list[str]:
        """The keys that have copies now."""
        return list(self._copies)

    def forget_copies(self, key_id: str) -> None:
        """Copy handles that proved invalid (their session was closed): make new ones.

        Called on the event loop: no lock (a thread may hold it inside a hung HSM call);
        a single dict operation is atomic, and a race only costs one more stale handle."""
        self._copies.pop(key_id, None)

    def drop_all(self) -> None:
        """Forget every copy: they die with the login session, which a reopen closes (no
        lock, as in :meth:`forget_copies`)."""
        self._copies = {}
