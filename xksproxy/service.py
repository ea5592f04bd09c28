"""The XKS operations: AAD construction, GCM packing, ciphertextMetadata, CDIV, health.

Imports no aiohttp and no pkcs11: it talks to HSMs through :class:`xksproxy.hsm.base.Hsm`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from xksproxy.consistency import KeyConsistency
from xksproxy.errors import (
    DependencyTimeoutError,
    InternalError,
    InvalidCiphertextError,
    InvalidKeyUsageError,
    InvalidStateError,
    KeyNotFoundError,
    ThrottlingError,
    XksError,
)
from xksproxy.health import HealthBoard
from xksproxy.hsm.base import HealthState, Hsm, KeyInfo, KeyStatus
from xksproxy.models import (
    IV_LENGTHS,
    TAG_LENGTH,
    Decrypted,
    DecryptRequest,
    EkmDetail,
    Encrypted,
    EncryptRequest,
    HealthReport,
    KeyMetadata,
)

T = TypeVar("T")

# ciphertextMetadata, format 1: one format byte, then the key version as a u32 (big endian).
# The format byte names the AAD construction too (§2.2, length-prefixed), so a later change of
# either can be told apart from ciphertexts made before it.
CM_FORMAT_V1 = 0x01
CM_V1_LENGTH = 5


def encode_cm(version: int) -> bytes:
    """ciphertextMetadata for a ciphertext made with key *version*."""
    return bytes((CM_FORMAT_V1,)) + version.to_bytes(4, "big")


def decode_cm(cm: bytes | None) -> int:
    """The key version named by ciphertextMetadata; InvalidCiphertextError if it is not ours."""
    if cm is None or len(cm) != CM_V1_LENGTH or cm[0] != CM_FORMAT_V1:
        raise InvalidCiphertextError()
    version = int.from_bytes(cm[1:], "big")
    if version == 0:
        raise InvalidCiphertextError()
    return version


def hsm_aad(aad: bytes | None, cm: bytes | None) -> bytes:
    """The AAD given to the HSM: u16_be(len AAD) || AAD || u8(len CM) || CM
    (docs/spec-notes.md §2.2)."""
    a = aad or b""
    c = cm or b""
    return len(a).to_bytes(2, "big") + a + len(c).to_bytes(1, "big") + c


def cdiv(aad: bytes | None, cm: bytes | None, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """ciphertextDataIntegrityValue: SHA-256(AAD || CM || IV || ciphertext || tag) (§2.4)."""
    h = hashlib.sha256()
    for part in (aad or b"", cm or b"", iv, ciphertext, tag):
        h.update(part)
    return h.digest()


class XksService:
    """The four XKS operations over 1-10 HSMs, with routing and failover.

    Routing: ACTIVE HSMs first, then DEGRADED, then UNAVAILABLE ones (a last resort: a probe
    may not have seen a recovery yet); within a state the least loaded (calls in flight or
    waiting), ties rotated.  Least-loaded rather than plain round-robin because an HSM that
    slows down accumulates calls in flight and so gets fewer new ones at once, before any
    probe has noticed.  A call that fails on the HSM's side (device, session, token error, or
    an overrun) marks that HSM suspect and is retried once on another HSM while the deadline
    allows; Encrypt retries get a fresh IV (each HSM makes or takes its own, xksproxy/hsm/gcm.py).
    A Decrypt goes only to HSMs that take its IV's length (an HSM that makes 12-byte IVs may
    refuse the 16-byte IVs of another vendor's HSM).  Caller errors are never retried.
    """

    def __init__(
        self,
        hsms: Sequence[Hsm],
        *,
        board: HealthBoard,
        consistency: KeyConsistency,
        health_keys: frozenset[str],
        proxy_vendor: str,
        proxy_model: str,
        ekm_vendor: str,
        fleet_size: int,
        on_failover: Callable[[str, str], None] | None = None,
    ) -> None:
        if not hsms:
            raise ValueError("at least one HSM")
        self.hsms = list(hsms)
        self.board = board
        self.consistency = consistency
        self._health_keys = health_keys
        self._proxy_vendor = proxy_vendor
        self._proxy_model = proxy_model
        self._ekm_vendor = ekm_vendor
        self._fleet_size = fleet_size
        self._on_failover = on_failover
        self._index = {h.name: i for i, h in enumerate(self.hsms)}
        self._turn = 0

    def route(self) -> list[Hsm]:
        """The HSMs in the order this request should try them."""
        self._turn += 1
        n, turn, state = len(self.hsms), self._turn, self.board.state
        return sorted(
            self.hsms,
            key=lambda h: (_RANK[state(h.name)], h.load, (self._index[h.name] - turn) % n),
        )

    async def _serve(
        self,
        key_id: str,
        deadline: float,
        op: Callable[[Hsm, KeyInfo], Awaitable[T]],
        *,
        check_copy: Callable[[KeyInfo], int | None] = lambda info: None,
        version: int = 0,
        iv_length: int = 12,
    ) -> T:
        """Run *op* on the first HSM that holds the key and can serve it; fail over once.
        An HSM that cannot take an IV of *iv_length* (a Decrypt's) is passed over after the
        key's checks; if no HSM could, the ciphertext is none of ours: InvalidCiphertextError."""
        if key_id in self._health_keys:
            raise KeyNotFoundError()  # a health key never backs a KMS key
        loop = asyncio.get_running_loop()
        failure: XksError | None = None
        failed_on: str | None = None
        unfit = False
        queue = self.route()
        looked_again = False
        while queue:
            hsm = queue.pop(0)
            if loop.time() >= deadline:
                break
            try:
                info = await hsm.key_info(key_id, deadline, version)
                used = check_copy(info)
                if used is not None and not await self.consistency.allowed(
                    hsm, key_id, used, deadline
                ):
                    continue  # this HSM's copy differs: never serve the key from it
                if not hsm.accepts_iv_length(iv_length):
                    unfit = True
                    continue
                try:
                    result = await op(hsm, info)
                except KeyNotFoundError:
                    # The version chosen from the key's cached view is gone from a newer one
                    # (a key command changed the key in between): decide again, once.
                    if not looked_again:
                        looked_again = True
                        queue.insert(0, hsm)
                    continue
            except KeyNotFoundError:
                continue  # the copy may be on another HSM
            except (InternalError, DependencyTimeoutError, ThrottlingError) as exc:
                if not isinstance(exc, ThrottlingError):
                    self.board.suspect(hsm.name, exc.error_name)
                if failure is not None:
                    raise  # retried once already
                failure, failed_on = exc, hsm.name
                continue
            if failed_on is not None and self._on_failover is not None:
                self._on_failover(failed_on, hsm.name)
            return result
        if failure is not None:
            raise failure
        if loop.time() >= deadline:
            raise DependencyTimeoutError("no HSM answered in time")
        if unfit:
            raise InvalidCiphertextError()
        raise KeyNotFoundError()

    async def get_key_metadata(self, key_id: str, deadline: float) -> KeyMetadata:
        async def op(hsm: Hsm, info: KeyInfo) -> KeyMetadata:
            return KeyMetadata(info.usages, info.status.value)

        return await self._serve(key_id, deadline, op)

    async def encrypt(self, key_id: str, req: EncryptRequest, deadline: float) -> Encrypted:
        async def op(hsm: Hsm, info: KeyInfo) -> Encrypted:
            if info.status is not KeyStatus.ENABLED:
                raise InvalidStateError("the external key is disabled")
            # With a CDIV the spec requires a check-decrypt, so the key must be allowed to decrypt.
            if not info.can_encrypt or (req.want_cdiv and not info.can_decrypt):
                raise InvalidKeyUsageError()
            return await self._encrypt_on(hsm, key_id, info.current_version, req, deadline)

        return await self._serve(key_id, deadline, op, check_copy=_current_version)

    async def _encrypt_on(
        self, hsm: Hsm, key_id: str, version: int, req: EncryptRequest, deadline: float
    ) -> Encrypted:
        cm = encode_cm(version)
        aad = hsm_aad(req.aad, cm)
        # A fresh IV on every attempt, a retry on another HSM included.
        iv, out = await hsm.encrypt(key_id, version, req.plaintext, aad, deadline)
        if len(out) != len(req.plaintext) + TAG_LENGTH or len(iv) not in IV_LENGTHS:
            raise InternalError("the HSM returned an unexpected ciphertext or IV length")
        ciphertext, tag = out[:-TAG_LENGTH], out[-TAG_LENGTH:]
        if req.want_cdiv:
            # Order required by §2.4: compute the CDIV first, then prove a decrypt of exactly
            # those bytes returns the plaintext, so corruption in between cannot go unnoticed.
            value = cdiv(req.aad, cm, iv, ciphertext, tag)
            try:
                back = await hsm.decrypt(key_id, version, iv, ciphertext + tag, aad, deadline)
            except InvalidCiphertextError:
                raise InternalError("check-decrypt of the new ciphertext failed") from None
            if back != req.plaintext:
                raise InternalError("check-decrypt of the new ciphertext failed")
            return Encrypted(ciphertext, cm, iv, tag, value)
        return Encrypted(ciphertext, cm, iv, tag)

    async def decrypt(self, key_id: str, req: DecryptRequest, deadline: float) -> Decrypted:
        named = _cm_version(req)
        version = 0

        def check_copy(info: KeyInfo) -> int | None:
            nonlocal version
            if info.status is not KeyStatus.ENABLED:
                raise InvalidStateError("the external key is disabled")
            if not info.can_decrypt:
                raise InvalidKeyUsageError()
            if not named:
                raise InvalidCiphertextError()  # not a ciphertextMetadata of ours
            version = named
            if version not in info.versions:
                raise KeyNotFoundError()  # perhaps another HSM already has this version
            return version

        async def op(hsm: Hsm, info: KeyInfo) -> Decrypted:
            aad = hsm_aad(req.aad, req.ciphertext_metadata)
            return Decrypted(
                await hsm.decrypt(key_id, version, req.iv, req.ciphertext + req.tag, aad, deadline)
            )

        try:
            return await self._serve(
                key_id, deadline, op, check_copy=check_copy, version=named, iv_length=len(req.iv)
            )
        except KeyNotFoundError:
            if version and await self._key_exists(key_id, deadline):
                raise InvalidCiphertextError() from None  # no HSM holds that version
            raise

    async def _key_exists(self, key_id: str, deadline: float) -> bool:
        for hsm in self.route():
            try:
                await hsm.key_info(key_id, deadline)
            except XksError:
                continue
            return True
        return False

    def health_status(self) -> HealthReport:
        """GetHealthStatus from the probers' latest results (never older than 60 s)."""
        return HealthReport(
            fleet_size=self._fleet_size,
            proxy_vendor=self._proxy_vendor,
            proxy_model=self._proxy_model,
            ekm_vendor=self._ekm_vendor or (self.hsms[0].model or "PKCS#11"),
            hsms=tuple(
                EkmDetail(h.name, h.model or "unknown", h.state.value)
                for h in self.board.snapshot()
            ),
        )


_RANK = {HealthState.ACTIVE: 0, HealthState.DEGRADED: 1, HealthState.UNAVAILABLE: 2}


def _cm_version(req: DecryptRequest) -> int:
    """The version a Decrypt request names, or 0 if its ciphertextMetadata is not ours (that
    error is raised in order, by decrypt's check_copy, after the key's state is checked)."""
    try:
        return decode_cm(req.ciphertext_metadata)
    except InvalidCiphertextError:
        return 0


def _current_version(info: KeyInfo) -> int | None:
    return info.current_version
