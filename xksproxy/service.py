"""The XKS operations: AAD construction, GCM packing, ciphertextMetadata, CDIV, health.

Imports no aiohttp and no pkcs11: it talks to HSMs through :class:`xksproxy.hsm.base.Hsm`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from xksproxy.errors import (
    InternalError,
    InvalidCiphertextError,
    InvalidKeyUsageError,
    InvalidStateError,
    KeyNotFoundError,
    XksError,
)
from xksproxy.hsm.base import HealthState, Hsm, KeyInfo, KeyStatus
from xksproxy.models import TAG_LENGTH, DecryptRequest, EncryptRequest, b64

log = structlog.get_logger(__name__)

# ciphertextMetadata, format 1: one format byte, then the key version as a u32 (big endian).
# The format byte names the AAD construction too (§2.2, length-prefixed), so a later change of
# either can be told apart from ciphertexts made before it.
CM_FORMAT_V1 = 0x01
IV_LENGTH = 12
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
    """The AAD given to the HSM: u16_be(len AAD) || AAD || u8(len CM) || CM (xks-api.md §2.2)."""
    a = aad or b""
    c = cm or b""
    return len(a).to_bytes(2, "big") + a + len(c).to_bytes(1, "big") + c


def cdiv(aad: bytes | None, cm: bytes | None, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """ciphertextDataIntegrityValue: SHA-256(AAD || CM || IV || ciphertext || tag) (§2.4)."""
    h = hashlib.sha256()
    for part in (aad or b"", cm or b"", iv, ciphertext, tag):
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class HsmHealth:
    name: str
    model: str
    state: HealthState
    checked_at: float  # time.monotonic()
    detail: str


class XksService:
    """The four XKS operations over one HSM (several from issue 3 on)."""

    def __init__(
        self,
        hsms: Sequence[Hsm],
        *,
        health_key: str,
        iv_source: Callable[[], bytes],
        proxy_vendor: str,
        proxy_model: str,
        ekm_vendor: str,
        fleet_size: int,
    ) -> None:
        if not hsms:
            raise ValueError("at least one HSM")
        self.hsms = list(hsms)
        self._health_key = health_key
        self._iv = iv_source
        self._proxy_vendor = proxy_vendor
        self._proxy_model = proxy_model
        self._ekm_vendor = ekm_vendor
        self._fleet_size = fleet_size
        self.health: dict[str, HsmHealth] = {
            h.name: HsmHealth(h.name, h.model, HealthState.UNAVAILABLE, 0.0, "not probed yet")
            for h in self.hsms
        }

    def _hsm(self) -> Hsm:
        return self.hsms[0]

    async def _key(self, key_id: str, deadline: float) -> tuple[Hsm, KeyInfo]:
        if key_id == self._health_key:
            raise KeyNotFoundError()  # the health key never backs a KMS key
        hsm = self._hsm()
        return hsm, await hsm.key_info(key_id, deadline)

    async def get_key_metadata(self, key_id: str, deadline: float) -> dict[str, Any]:
        _, info = await self._key(key_id, deadline)
        return {"keySpec": "AES_256", "keyUsage": list(info.usages), "keyStatus": info.status.value}

    async def encrypt(self, key_id: str, req: EncryptRequest, deadline: float) -> dict[str, Any]:
        hsm, info = await self._key(key_id, deadline)
        if info.status is not KeyStatus.ENABLED:
            raise InvalidStateError("the external key is disabled")
        # With a CDIV the spec requires a check-decrypt, so the key must be allowed to decrypt.
        if not info.can_encrypt or (req.want_cdiv and not info.can_decrypt):
            raise InvalidKeyUsageError()
        version = info.current_version
        cm = encode_cm(version)
        aad = hsm_aad(req.aad, cm)
        iv = self._iv()
        out = await hsm.encrypt(key_id, version, iv, req.plaintext, aad, deadline)
        if len(out) != len(req.plaintext) + TAG_LENGTH:
            raise InternalError("the HSM returned an unexpected ciphertext length")
        ciphertext, tag = out[:-TAG_LENGTH], out[-TAG_LENGTH:]
        resp: dict[str, Any] = {
            "ciphertext": b64(ciphertext),
            "ciphertextMetadata": b64(cm),
            "initializationVector": b64(iv),
            "authenticationTag": b64(tag),
        }
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
            resp["ciphertextDataIntegrityValue"] = b64(value)
        return resp

    async def decrypt(self, key_id: str, req: DecryptRequest, deadline: float) -> dict[str, Any]:
        hsm, info = await self._key(key_id, deadline)
        if info.status is not KeyStatus.ENABLED:
            raise InvalidStateError("the external key is disabled")
        if not info.can_decrypt:
            raise InvalidKeyUsageError()
        version = decode_cm(req.ciphertext_metadata)
        # The spec allows 16-byte IVs from HSMs that make them; this proxy only makes 96-bit
        # IVs, so no ciphertext of ours has another length (python-pkcs11 refuses them too).
        if version not in info.versions or len(req.iv) != IV_LENGTH:
            raise InvalidCiphertextError()
        aad = hsm_aad(req.aad, req.ciphertext_metadata)
        plaintext = await hsm.decrypt(
            key_id, version, req.iv, req.ciphertext + req.tag, aad, deadline
        )
        return {"plaintext": b64(plaintext)}

    def health_status(self) -> dict[str, Any]:
        """GetHealthStatus from the cached probe results (never older than the probe interval)."""
        now = time.monotonic()
        details = []
        for h in self.hsms:
            rec = self.health[h.name]
            state = rec.state
            if now - rec.checked_at > 60:  # a stalled prober must not keep reporting ACTIVE
                state = HealthState.UNAVAILABLE
            details.append(
                {"id": h.name, "model": h.model or "unknown", "healthStatus": state.value}
            )
        return {
            "xksProxyFleetSize": self._fleet_size,
            "xksProxyVendor": self._proxy_vendor,
            "xksProxyModel": self._proxy_model,
            "ekmVendor": self._ekm_vendor or (self.hsms[0].model or "PKCS#11"),
            "ekmFleetDetails": details,
        }

    async def probe_once(self, hsm: Hsm, timeout: float, degraded_after: float) -> HsmHealth:
        """Probe one HSM and record its state."""
        try:
            result = await hsm.probe(timeout)
        except XksError as exc:
            record = HsmHealth(
                hsm.name, hsm.model, HealthState.UNAVAILABLE, time.monotonic(), exc.error_name
            )
        else:
            if not result.ok:
                state = HealthState.UNAVAILABLE
            elif result.latency_s > degraded_after:
                state = HealthState.DEGRADED
            else:
                state = HealthState.ACTIVE
            record = HsmHealth(hsm.name, hsm.model, state, time.monotonic(), result.detail)
        previous = self.health.get(hsm.name)
        if previous is None or previous.state is not record.state:
            emit = log.info if record.state is HealthState.ACTIVE else log.warning
            emit("hsm_health_changed", hsm=hsm.name, state=record.state.value, detail=record.detail)
        self.health[hsm.name] = record
        return record

    async def run_prober(
        self,
        interval: float,
        timeout: float,
        degraded_after: float,
        recover: Callable[[Hsm], Any],
    ) -> None:
        """Each *interval* seconds until cancelled: recover what needs it, then probe every HSM."""
        while True:
            for hsm in self.hsms:
                try:
                    await recover(hsm)
                except Exception as exc:  # recovery is retried on the next round
                    log.warning("hsm_recover_failed", hsm=hsm.name, error=str(exc))
                await self.probe_once(hsm, timeout, degraded_after)
            await asyncio.sleep(interval)
