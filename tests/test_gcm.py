"""xksproxy/hsm/gcm.py against software keys that make IVs as each kind of HSM does.

The fakes read the raw ``CK_GCM_PARAMS`` the proxy packs, as an HSM would, and write the IV
through ``pIv`` where their kind does; the same behaviours run in C in front of SoftHSM in
tests/test_vendor_emulation.py and through the proxy in tests/test_emulate.py.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Mechanism
from pkcs11 import exceptions as p11e

from xksproxy.hsm import gcm


class SoftKey:
    """A python-pkcs11-like key doing AES-GCM in software the way *kind* does:
    caller, written (zero pIv overwritten), appended16, appended12, lost (IV hidden),
    refuse (every encryption refused), device (every call a device error)."""

    def __init__(self, kind: str, iv16: bool = True) -> None:
        self.kind, self.iv16 = kind, iv16
        self.aes = AESGCM(os.urandom(32))

    @staticmethod
    def _params(raw: Any) -> gcm._CkGcmParams:
        assert isinstance(raw, bytes)  # raw parameter bytes, never python-pkcs11's GCMParams
        return gcm._CkGcmParams.from_buffer_copy(raw)

    @staticmethod
    def _read(address: int | None, length: int) -> bytes:
        return ctypes.string_at(address, length) if address else b""

    def encrypt(self, data: bytes, *, mechanism: Mechanism, mechanism_param: Any) -> bytes:
        assert mechanism == Mechanism.AES_GCM
        p = self._params(mechanism_param)
        aad = self._read(p.pAAD, p.ulAADLen)
        if self.kind == "device":
            raise p11e.DeviceError()
        if self.kind == "refuse":
            raise p11e.MechanismParamInvalid()
        if self.kind == "caller":
            return self.aes.encrypt(self._read(p.pIv, p.ulIvLen), data, aad)
        if self.kind == "written":
            if p.ulIvLen != 12 or any(self._read(p.pIv, 12)):
                raise p11e.MechanismParamInvalid()
            iv = os.urandom(12)
            ctypes.memmove(p.pIv, iv, 12)
            return self.aes.encrypt(iv, data, aad)
        if self.kind == "appended16":  # Luna FIPS before 7.9.3: a caller's IV is ignored
            if p.ulIvBits != p.ulIvLen * 8:
                raise p11e.MechanismParamInvalid()
            iv = os.urandom(16)
            return self.aes.encrypt(iv, data, aad) + iv
        if self.kind == "appended12":  # Luna 7.9.3 on, FIPS: a caller's IV is refused
            if p.ulIvLen != 0:
                raise p11e.MechanismParamInvalid()
            iv = os.urandom(12 if p.ulIvBits == 96 else 16)
            return self.aes.encrypt(iv, data, aad) + iv
        assert self.kind == "lost"
        return self.aes.encrypt(os.urandom(12), data, aad)

    def decrypt(self, data: bytes, *, mechanism: Mechanism, mechanism_param: Any) -> bytes:
        p = self._params(mechanism_param)
        if self.kind == "device":
            raise p11e.DeviceError()
        if p.ulIvBits != p.ulIvLen * 8 or (p.ulIvLen == 16 and not self.iv16):
            raise p11e.MechanismParamInvalid()
        try:
            return self.aes.decrypt(
                self._read(p.pIv, p.ulIvLen), data, self._read(p.pAAD, p.ulAADLen)
            )
        except InvalidTag:
            raise p11e.EncryptedDataInvalid() from None


@pytest.mark.parametrize(
    ("kind", "mode", "iv_length"),
    [
        ("caller", gcm.CALLER, 12),
        ("written", gcm.WRITTEN, 12),
        ("appended12", gcm.APPENDED_12, 12),
        ("appended16", gcm.APPENDED_16, 16),
    ],
)
def test_auto_finds_the_mode_and_encrypt_returns_the_iv_used(
    kind: str, mode: gcm.GcmMode, iv_length: int
) -> None:
    key = SoftKey(kind)
    found = gcm.detect_blocking(key, "auto", "generic")
    assert found.mode is mode
    iv, out = gcm.encrypt_blocking(key, mode, b"plaintext", b"aad")
    assert len(iv) == iv_length and len(out) == len(b"plaintext") + 16
    assert key.aes.decrypt(iv, out, b"aad") == b"plaintext"  # the IV really used
    assert gcm.decrypt_blocking(key, iv, out, b"aad") == b"plaintext"


def test_a_token_that_hides_its_iv_matches_no_mode_and_says_what_it_did() -> None:
    found = gcm.detect_blocking(SoftKey("lost"), "auto", "generic")
    assert found.mode is None
    assert "caller: its ciphertext did not decrypt with the IV it reported" in found.detail
    assert "hsm-written: the HSM left the zero IV in place" in found.detail
    assert "hsm-appended/12: 48 bytes of output for 32 of plaintext (60 expected" in found.detail


def test_an_explicit_mode_is_checked_not_searched() -> None:
    found = gcm.detect_blocking(SoftKey("written"), "caller", "generic")
    assert found.mode is None
    assert found.detail.startswith("no AES-GCM IV mode fits (gcm_iv caller): caller: ")
    assert "hsm-written" not in found.detail


def test_every_refusal_is_named() -> None:
    found = gcm.detect_blocking(SoftKey("refuse"), "hsm-appended", "generic")
    assert found.mode is None
    assert found.detail.count("encrypt refused (CKR_MECHANISM_PARAM_INVALID)") == 2


def test_a_failing_device_is_not_taken_for_a_refusal() -> None:
    with pytest.raises(p11e.DeviceError):
        gcm.detect_blocking(SoftKey("device"), "auto", "generic")


@pytest.mark.parametrize("iv16", [True, False])
def test_decrypting_16_byte_ivs_is_probed(iv16: bool) -> None:
    found = gcm.detect_blocking(SoftKey("written", iv16=iv16), "auto", "generic")
    assert found.decrypts_iv16 is iv16


def test_an_unexpected_output_length_is_an_error_not_a_ciphertext() -> None:
    with pytest.raises(gcm.GcmOutputError) as err:
        gcm.encrypt_blocking(SoftKey("appended16"), gcm.CALLER, b"x" * 10, b"")
    assert err.value.detail.startswith("42 bytes of output for 10 of plaintext")
    assert "42" not in err.value.message  # what a client could see says nothing of it


def test_known_answer_records_old_and_new() -> None:
    iv, data = os.urandom(16), os.urandom(48)
    assert gcm.decode_kat(gcm.encode_kat(iv, data), bytes(12)) == (iv, data)
    assert gcm.decode_kat(data, bytes(range(12))) == (bytes(range(12)), data)  # before 0.2
    assert gcm.decode_kat(b"KAT2" + bytes((13,)) + os.urandom(61), bytes(12)) is None
    assert gcm.decode_kat(b"junk", bytes(12)) is None
