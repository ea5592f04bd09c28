"""xksproxy/hsm/gcm.py against software keys that make IVs as each kind of HSM does.

The fakes read the raw ``CK_GCM_PARAMS`` the proxy packs, as an HSM would, and write the IV
through ``pIv`` where their kind does; the same behaviours run in C in front of SoftHSM in
tests/integration/test_vendor_emulation.py and through the proxy in
tests/integration/test_emulate.py.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Mechanism

from xksproxy.hsm import gcm
from xksproxy.hsm.pkcs11_errors import CkrError

MECHANISM_PARAM_INVALID, DEVICE_ERROR, ENCRYPTED_DATA_INVALID = 0x71, 0x30, 0x40
BUFFER_TOO_SMALL = 0x150


def _read(address: int | None, n: int) -> bytes:
    return ctypes.string_at(address, n) if address else b""


class SoftFunctions:
    """A module's C_EncryptInit/C_Encrypt/C_DecryptInit/C_Decrypt doing AES-GCM in software the
    way *kind* does: caller, written (zero pIv overwritten), appended16 (Luna FIPS before
    7.9.3: a caller's IV ignored), appended12 (7.9.3 on: a caller's IV refused), lost (IV
    hidden), refuse (every encryption refused), device (every call a device error).  It reads
    the CK_MECHANISM and CK_GCM_PARAMS the proxy packs from memory, as a module would."""

    def __init__(self, kind: str, iv16: bool = True) -> None:
        self.kind, self.iv16 = kind, iv16
        self.aes = AESGCM(os.urandom(32))
        self.calls: list[str] = []
        self._op: tuple[bool, bytes, bytes, int] | None = None  # decrypting, IV, AAD, appended

    def _init(self, decrypting: bool, mechanism: Any) -> int:
        mech = mechanism._obj  # what ctypes.byref() wraps
        assert mech.mechanism == Mechanism.AES_GCM
        assert mech.ulParameterLen == ctypes.sizeof(gcm.CkGcmParams)
        p = gcm.CkGcmParams.from_address(mech.pParameter)
        iv, aad = _read(p.pIv, p.ulIvLen), _read(p.pAAD, p.ulAADLen)
        if self.kind == "device":
            return DEVICE_ERROR
        if decrypting:
            if p.ulIvBits != p.ulIvLen * 8 or (p.ulIvLen == 16 and not self.iv16):
                return MECHANISM_PARAM_INVALID
            self._op = (True, iv, aad, 0)
            return 0
        appended = 0
        if self.kind == "refuse":
            return MECHANISM_PARAM_INVALID
        if self.kind == "written":
            if p.ulIvLen != 12 or any(iv):
                return MECHANISM_PARAM_INVALID
            iv = os.urandom(12)
            ctypes.memmove(p.pIv, iv, 12)
        elif self.kind == "appended16":
            if p.ulIvBits != p.ulIvLen * 8:
                return MECHANISM_PARAM_INVALID
            iv, appended = os.urandom(16), 16
        elif self.kind == "appended12":
            if p.ulIvLen != 0:
                return MECHANISM_PARAM_INVALID
            appended = 12 if p.ulIvBits == 96 else 16
            iv = os.urandom(appended)
        elif self.kind == "lost":
            iv = os.urandom(12)
        self._op = (False, iv, aad, appended)
        return 0

    def _crypt(self, data: bytes, n: int, out: Any, length: Any) -> int:
        assert self._op is not None and len(data) == n
        assert out is not None  # sized in advance: never a size query
        decrypting, iv, aad, appended = self._op
        if decrypting:
            try:
                result = self.aes.decrypt(iv, data, aad)
            except InvalidTag:
                self._op = None
                return ENCRYPTED_DATA_INVALID
        else:
            result = self.aes.encrypt(iv, data, aad) + (iv if appended else b"")
        size = length._obj
        if size.value < len(result):  # the operation stays active, as PKCS#11 says
            size.value = len(result)
            return BUFFER_TOO_SMALL
        self._op = None
        ctypes.memmove(out, result, len(result))
        size.value = len(result)
        return 0

    def C_EncryptInit(self, session: int, mechanism: Any, key: int) -> int:
        self.calls.append("C_EncryptInit")
        return self._init(False, mechanism)

    def C_DecryptInit(self, session: int, mechanism: Any, key: int) -> int:
        self.calls.append("C_DecryptInit")
        return self._init(True, mechanism)

    def C_Encrypt(self, session: int, data: bytes, n: int, out: Any, length: Any) -> int:
        self.calls.append("C_Encrypt")
        return self._crypt(data, n, out, length)

    C_Decrypt = C_Encrypt


def SoftKey(kind: str, iv16: bool = True) -> gcm.RawKey:
    return gcm.RawKey(SoftFunctions(kind, iv16), 1, 2)


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
    assert key.functions.aes.decrypt(iv, out, b"aad") == b"plaintext"  # the IV really used
    assert gcm.decrypt_blocking(key, iv, out, b"aad") == b"plaintext"
    # Two calls an operation, the output sized in advance (no size query).
    assert key.functions.calls[-4:] == ["C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Encrypt"]


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
    with pytest.raises(CkrError) as err:
        gcm.detect_blocking(SoftKey("device"), "auto", "generic")
    assert err.value.rv == DEVICE_ERROR


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
