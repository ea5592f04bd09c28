"""AES-256-GCM on the HSM, whoever makes the IV (docs/vendors.md).

Production HSMs differ in who makes the IV of an encryption and where it comes back:

- ``caller``: the proxy passes a fresh random 12-byte IV (SoftHSM, Luna outside FIPS mode).
- ``hsm-written``: the proxy passes 12 zero bytes in a buffer it owns; the HSM writes the IV it
  made there (AWS CloudHSM, Entrust nShield, Thales ProtectServer in FIPS mode).
- ``hsm-appended``: the proxy asks for a generated IV (``ulIvLen`` 0); the HSM returns
  ciphertext || tag || IV (Thales Luna in FIPS mode).  ``ulIvBits`` 96 asks Luna firmware
  7.9.3 and later for a 12-byte IV; older firmware refuses that and is asked with 0, which
  makes a 16-byte IV.

The calls go straight through the module's function list with ctypes (which releases the GIL
around them, as python-pkcs11 does), for two reasons.  ``CK_GCM_PARAMS`` must be packed by hand:
python-pkcs11's ``GCMParams`` refuses IVs over 12 bytes, always sets ``ulIvBits`` to the IV
length and points ``pIv`` into an immutable Python ``bytes``, which an HSM that writes the IV
back would corrupt; here ``pIv`` points into a ctypes buffer that lives until the call has
returned.  And GCM's output length is known in advance, so one ``C_Encrypt`` into a buffer of
that size does what python-pkcs11 does in two (a size query, then the call): an operation is two
round trips to a network HSM, ``C_EncryptInit`` and ``C_Encrypt``, in every mode.  A token
object's handle is valid in every session of the process, so no session has to find the key
object first.

Blocking functions: they run on an HSM's call threads (or in the key commands).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from pkcs11 import Mechanism
from pkcs11.exceptions import PKCS11Error

from xksproxy.errors import InternalError
from xksproxy.hsm.pkcs11_errors import CKR_BUFFER_TOO_SMALL, CkrError, Fault, ckr_name, classify

TAG_LENGTH = 16
TAG_BITS = 128
#: IV lengths the XKS API carries.
IV_LENGTHS = (12, 16)


class CkGcmParams(ctypes.Structure):
    """``CK_GCM_PARAMS`` as in the PKCS#11 v2.40 header (with ``ulIvBits``)."""

    _fields_ = (
        ("pIv", ctypes.c_void_p),
        ("ulIvLen", ctypes.c_ulong),
        ("ulIvBits", ctypes.c_ulong),
        ("pAAD", ctypes.c_void_p),
        ("ulAADLen", ctypes.c_ulong),
        ("ulTagBits", ctypes.c_ulong),
    )


class CkMechanism(ctypes.Structure):
    _fields_ = (
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    )


@dataclass(frozen=True)
class RawKey:
    """A key object used through the module's function list: a session and an object handle
    (the object may have been found in another session of the process)."""

    functions: Any  # xksproxy.hsm.pkcs11_lib.FunctionList, or a stand-in in the unit tests
    session: int
    handle: int

    @classmethod
    def of(cls, functions: Any, key: Any) -> RawKey:
        """The same key as a python-pkcs11 key object *key*, in that object's session."""
        return cls(functions, key.session.handle, key.handle)


@dataclass(frozen=True)
class GcmMode:
    """One way of getting an IV out of an HSM: what to pass and where the IV comes back."""

    name: str  # the gcm_iv setting that selects it
    iv_len_field: int  # ulIvLen passed
    iv_bits_field: int  # ulIvBits passed
    iv_length: int  # bytes of IV the mode yields

    def describe(self) -> str:
        where = {
            "caller": "made by the proxy",
            "hsm-written": "made by the HSM, written into the IV buffer",
            "hsm-appended": "made by the HSM, appended after the tag",
        }[self.name]
        return f"{self.name} ({self.iv_length}-byte IV {where})"


CALLER = GcmMode("caller", 12, 96, 12)
WRITTEN = GcmMode("hsm-written", 12, 96, 12)
APPENDED_12 = GcmMode("hsm-appended", 0, 96, 12)
APPENDED_16 = GcmMode("hsm-appended", 0, 0, 16)

#: What each ``gcm_iv`` setting tries, in order; ``auto`` tries every mode.
CANDIDATES: dict[str, tuple[GcmMode, ...]] = {
    "caller": (CALLER,),
    "hsm-written": (WRITTEN,),
    "hsm-appended": (APPENDED_12, APPENDED_16),
    "auto": (CALLER, WRITTEN, APPENDED_12, APPENDED_16),
}


class GcmOutputError(InternalError):
    """The HSM's output does not fit the IV mode in use: never returned to a caller."""

    default_message = "the HSM returned an unexpected AES-GCM output"

    def __init__(self, detail: str) -> None:
        super().__init__(None)
        self.detail = detail


def _buffer(data: bytes) -> ctypes.Array[ctypes.c_char] | None:
    return (ctypes.c_char * len(data)).from_buffer_copy(data) if data else None


def _check(rv: int) -> None:
    if rv:
        raise CkrError(rv)


def crypt_blocking(key: RawKey, decrypting: bool, mechanism: Any, data: bytes, size: int) -> bytes:
    """``C_EncryptInit``/``C_DecryptInit`` with *mechanism* (a ``CK_MECHANISM``, whose
    parameters live as long as the caller keeps them), then one ``C_Encrypt``/``C_Decrypt``
    into an output buffer of *size* bytes, asked again only if the HSM says it is too small."""
    fl = key.functions
    init, call = (
        (fl.C_DecryptInit, fl.C_Decrypt) if decrypting else (fl.C_EncryptInit, fl.C_Encrypt)
    )
    _check(init(key.session, ctypes.byref(mechanism), key.handle))
    out = ctypes.create_string_buffer(max(size, 1))
    length = ctypes.c_ulong(size)
    rv = call(key.session, data, len(data), out, ctypes.byref(length))
    if rv == CKR_BUFFER_TOO_SMALL:  # the operation is still active: call again, sized
        out = ctypes.create_string_buffer(max(length.value, 1))
        rv = call(key.session, data, len(data), out, ctypes.byref(length))
    _check(rv)
    return out.raw[: length.value]


def _run(
    key: RawKey,
    decrypting: bool,
    iv: ctypes.Array[ctypes.c_char] | None,
    iv_fields: tuple[int, int],
    aad: bytes,
    data: bytes,
    size: int,
) -> bytes:
    """One AES-GCM operation with hand-packed ``CK_GCM_PARAMS``."""
    aad_buf = _buffer(aad)
    params = CkGcmParams(
        None if iv is None else ctypes.addressof(iv),
        iv_fields[0],
        iv_fields[1],
        None if aad_buf is None else ctypes.addressof(aad_buf),
        len(aad),
        TAG_BITS,
    )
    mechanism = CkMechanism(Mechanism.AES_GCM, ctypes.addressof(params), ctypes.sizeof(CkGcmParams))
    # params, the IV and AAD buffers live until the data call has returned: the HSM may write
    # through pIv until then.
    return crypt_blocking(key, decrypting, mechanism, data, size)


def encrypt_blocking(
    key: RawKey, mode: GcmMode, plaintext: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    """Encrypt on the HSM in *mode*: (IV, ciphertext || tag).  GcmOutputError if the HSM's
    output does not fit the mode (a wrong length, an IV buffer left zero)."""
    iv_buf: ctypes.Array[ctypes.c_char] | None = None
    if mode is CALLER:
        iv_buf = _buffer(os.urandom(12))  # the OS CSPRNG: no extra HSM round trip
    elif mode is WRITTEN:
        iv_buf = (ctypes.c_char * mode.iv_length)()  # zeroed; the HSM writes the IV here
    expected = len(plaintext) + TAG_LENGTH
    if mode.name == "hsm-appended":
        expected += mode.iv_length
    fields = (mode.iv_len_field, mode.iv_bits_field)
    out = _run(key, False, iv_buf, fields, aad, plaintext, expected)
    if len(out) != expected:
        raise GcmOutputError(
            f"{len(out)} bytes of output for {len(plaintext)} of plaintext "
            f"({expected} expected in mode {mode.name})"
        )
    if mode.name == "hsm-appended":
        return out[-mode.iv_length :], out[: -mode.iv_length]
    assert iv_buf is not None
    iv = iv_buf.raw
    if mode is WRITTEN and not any(iv):
        raise GcmOutputError("the HSM left the zero IV in place: it made no IV of its own")
    return iv, out


def decrypt_blocking(key: RawKey, iv: bytes, data: bytes, aad: bytes) -> bytes:
    """Decrypt ciphertext || tag with the IV it was made with (12 or 16 bytes)."""
    return _run(key, True, _buffer(iv), (len(iv), len(iv) * 8), aad, data, len(data))


@dataclass(frozen=True)
class Detection:
    """What a probe of the health key found: the mode to use (None: no mode fits) and whether
    the HSM takes 16-byte IVs when decrypting."""

    mode: GcmMode | None
    decrypts_iv16: bool
    detail: str  # the mode, or what the HSM did with each mode tried


def _fault(exc: PKCS11Error, operation: str, vendor: str) -> Fault:
    fault = classify(ckr_name(exc), operation, vendor)
    if fault in (Fault.DEVICE, Fault.SESSION, Fault.STALE_HANDLE):
        raise exc  # the HSM is failing, not refusing the mode: the caller retries later
    return fault


def _try_mode(key: RawKey, mode: GcmMode, vendor: str) -> str | None:
    """None if *mode* works on *key*; otherwise what the HSM did."""
    plaintext, aad = os.urandom(32), b"xksproxy IV mode probe"
    try:
        iv, out = encrypt_blocking(key, mode, plaintext, aad)
    except PKCS11Error as exc:
        _fault(exc, "encrypt", vendor)
        return f"encrypt refused ({ckr_name(exc)})"
    except GcmOutputError as exc:
        return exc.detail
    try:
        back = decrypt_blocking(key, iv, out, aad)
    except PKCS11Error as exc:
        _fault(exc, "decrypt", vendor)
        return f"its ciphertext did not decrypt with the IV it reported ({ckr_name(exc)})"
    if back != plaintext:
        return "its ciphertext decrypted to other bytes"
    return None


def decrypts_iv16_blocking(key: RawKey, vendor: str) -> bool:
    """Whether the HSM takes a 16-byte IV to decrypt: random bytes must fail as a bad tag,
    not as refused parameters."""
    try:
        decrypt_blocking(key, os.urandom(16), os.urandom(32), b"xksproxy IV length probe")
    except PKCS11Error as exc:
        return _fault(exc, "decrypt", vendor) is Fault.BAD_CIPHERTEXT
    return True  # unreachable for a sound HSM (a forged tag), harmless otherwise


def detect_blocking(key: RawKey, setting: str, vendor: str) -> Detection:
    """Find the first mode of *setting* (``auto`` or a mode name) that works on *key*, a key
    allowed to encrypt and decrypt; every mode is verified by decrypting its output.

    A PKCS#11 error meaning the HSM or session is failing is raised, not taken as a refusal."""
    tried = []
    found: GcmMode | None = None
    for mode in CANDIDATES[setting]:
        why = _try_mode(key, mode, vendor)
        if why is None:
            found = mode
            break
        label = mode.name if mode.name != "hsm-appended" else f"hsm-appended/{mode.iv_length}"
        tried.append(f"{label}: {why}")
    iv16 = decrypts_iv16_blocking(key, vendor)
    if found is None:
        return Detection(
            None, iv16, f"no AES-GCM IV mode fits (gcm_iv {setting}): " + "; ".join(tried)
        )
    return Detection(found, iv16, found.describe())


# ---- the health key's known answer ---------------------------------------------------------

_KAT_V2 = b"KAT2"
_KAT_V1_LENGTH = 48  # 32 bytes of ciphertext and the tag, made with a fixed IV


def encode_kat(iv: bytes, data: bytes) -> bytes:
    """A known-answer record: the IV the HSM used and ciphertext || tag."""
    return _KAT_V2 + bytes((len(iv),)) + iv + data


def decode_kat(record: bytes, v1_iv: bytes) -> tuple[bytes, bytes] | None:
    """(IV, ciphertext || tag) of a known-answer record, or None if it is not one.  Records
    made before HSM-generated IVs hold only the output, made with the fixed *v1_iv*."""
    if len(record) == _KAT_V1_LENGTH:
        return v1_iv, record
    if record.startswith(_KAT_V2) and len(record) > len(_KAT_V2):
        n = record[len(_KAT_V2)]
        body = record[len(_KAT_V2) + 1 :]
        if n in IV_LENGTHS and len(body) == n + _KAT_V1_LENGTH:
            return body[:n], body[n:]
    return None
