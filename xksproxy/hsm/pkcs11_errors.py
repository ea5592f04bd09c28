"""PKCS#11 return codes: their names, what they mean for the proxy, per operation and vendor.

The one place where a python-pkcs11 exception becomes a decision: is the caller's ciphertext
bad, is the key handle stale, is the session broken, is the device failing?  Decrypt failures
are vendor specific: SoftHSM reports a wrong GCM tag as CKR_GENERAL_ERROR, most HSMs as
CKR_ENCRYPTED_DATA_INVALID, nShield as CKR_FUNCTION_FAILED (docs/architecture.md §3).
"""

from __future__ import annotations

import enum
import re

from pkcs11 import exceptions as p11e

# python-pkcs11 exception class -> CKR name, for logs and metrics.
_NAMES: dict[type[BaseException], str] = {
    p11e.ArgumentsBad: "CKR_ARGUMENTS_BAD",
    p11e.DataInvalid: "CKR_DATA_INVALID",
    p11e.DataLenRange: "CKR_DATA_LEN_RANGE",
    p11e.DeviceError: "CKR_DEVICE_ERROR",
    p11e.DeviceMemory: "CKR_DEVICE_MEMORY",
    p11e.DeviceRemoved: "CKR_DEVICE_REMOVED",
    p11e.EncryptedDataInvalid: "CKR_ENCRYPTED_DATA_INVALID",
    p11e.EncryptedDataLenRange: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    p11e.FunctionCancelled: "CKR_FUNCTION_CANCELED",
    p11e.FunctionFailed: "CKR_FUNCTION_FAILED",
    p11e.FunctionRejected: "CKR_FUNCTION_REJECTED",
    p11e.FunctionNotSupported: "CKR_FUNCTION_NOT_SUPPORTED",
    p11e.GeneralError: "CKR_GENERAL_ERROR",
    p11e.HostMemory: "CKR_HOST_MEMORY",
    p11e.KeyHandleInvalid: "CKR_KEY_HANDLE_INVALID",
    p11e.KeySizeRange: "CKR_KEY_SIZE_RANGE",
    p11e.KeyTypeInconsistent: "CKR_KEY_TYPE_INCONSISTENT",
    p11e.MechanismInvalid: "CKR_MECHANISM_INVALID",
    p11e.MechanismParamInvalid: "CKR_MECHANISM_PARAM_INVALID",
    p11e.ObjectHandleInvalid: "CKR_OBJECT_HANDLE_INVALID",
    p11e.OperationActive: "CKR_OPERATION_ACTIVE",
    p11e.OperationNotInitialized: "CKR_OPERATION_NOT_INITIALIZED",
    p11e.PinIncorrect: "CKR_PIN_INCORRECT",
    p11e.PinLocked: "CKR_PIN_LOCKED",
    p11e.PinExpired: "CKR_PIN_EXPIRED",
    p11e.SessionClosed: "CKR_SESSION_CLOSED",
    p11e.SessionCount: "CKR_SESSION_COUNT",
    p11e.SessionHandleInvalid: "CKR_SESSION_HANDLE_INVALID",
    p11e.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT",
    p11e.TokenNotRecognised: "CKR_TOKEN_NOT_RECOGNIZED",
    p11e.UserAlreadyLoggedIn: "CKR_USER_ALREADY_LOGGED_IN",
    p11e.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN",
    p11e.UserPinNotInitialized: "CKR_USER_PIN_NOT_INITIALIZED",
}

# Every return code of PKCS#11 v2.40 by value: for the codes python-pkcs11 has no class for (it
# raises PKCS11Error("Unmapped error code 0x68")) and for calls made without it (CkrError).
_CODES: dict[int, str] = {
    0x1: "CKR_CANCEL",
    0x2: "CKR_HOST_MEMORY",
    0x3: "CKR_SLOT_ID_INVALID",
    0x5: "CKR_GENERAL_ERROR",
    0x6: "CKR_FUNCTION_FAILED",
    0x7: "CKR_ARGUMENTS_BAD",
    0x8: "CKR_NO_EVENT",
    0x9: "CKR_NEED_TO_CREATE_THREADS",
    0xA: "CKR_CANT_LOCK",
    0x10: "CKR_ATTRIBUTE_READ_ONLY",
    0x11: "CKR_ATTRIBUTE_SENSITIVE",
    0x12: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x13: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x1B: "CKR_ACTION_PROHIBITED",
    0x20: "CKR_DATA_INVALID",
    0x21: "CKR_DATA_LEN_RANGE",
    0x30: "CKR_DEVICE_ERROR",
    0x31: "CKR_DEVICE_MEMORY",
    0x32: "CKR_DEVICE_REMOVED",
    0x40: "CKR_ENCRYPTED_DATA_INVALID",
    0x41: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    0x50: "CKR_FUNCTION_CANCELED",
    0x51: "CKR_FUNCTION_NOT_PARALLEL",
    0x54: "CKR_FUNCTION_NOT_SUPPORTED",
    0x60: "CKR_KEY_HANDLE_INVALID",
    0x62: "CKR_KEY_SIZE_RANGE",
    0x63: "CKR_KEY_TYPE_INCONSISTENT",
    0x64: "CKR_KEY_NOT_NEEDED",
    0x65: "CKR_KEY_CHANGED",
    0x66: "CKR_KEY_NEEDED",
    0x67: "CKR_KEY_INDIGESTIBLE",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x69: "CKR_KEY_NOT_WRAPPABLE",
    0x6A: "CKR_KEY_UNEXTRACTABLE",
    0x70: "CKR_MECHANISM_INVALID",
    0x71: "CKR_MECHANISM_PARAM_INVALID",
    0x82: "CKR_OBJECT_HANDLE_INVALID",
    0x90: "CKR_OPERATION_ACTIVE",
    0x91: "CKR_OPERATION_NOT_INITIALIZED",
    0xA0: "CKR_PIN_INCORRECT",
    0xA1: "CKR_PIN_INVALID",
    0xA2: "CKR_PIN_LEN_RANGE",
    0xA3: "CKR_PIN_EXPIRED",
    0xA4: "CKR_PIN_LOCKED",
    0xB0: "CKR_SESSION_CLOSED",
    0xB1: "CKR_SESSION_COUNT",
    0xB3: "CKR_SESSION_HANDLE_INVALID",
    0xB4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    0xB5: "CKR_SESSION_READ_ONLY",
    0xB6: "CKR_SESSION_EXISTS",
    0xB7: "CKR_SESSION_READ_ONLY_EXISTS",
    0xB8: "CKR_SESSION_READ_WRITE_SO_EXISTS",
    0xC0: "CKR_SIGNATURE_INVALID",
    0xC1: "CKR_SIGNATURE_LEN_RANGE",
    0xD0: "CKR_TEMPLATE_INCOMPLETE",
    0xD1: "CKR_TEMPLATE_INCONSISTENT",
    0xE0: "CKR_TOKEN_NOT_PRESENT",
    0xE1: "CKR_TOKEN_NOT_RECOGNIZED",
    0xE2: "CKR_TOKEN_WRITE_PROTECTED",
    0xF0: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    0xF1: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    0xF2: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID",
    0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    0x105: "CKR_USER_TOO_MANY_TYPES",
    0x110: "CKR_WRAPPED_KEY_INVALID",
    0x112: "CKR_WRAPPED_KEY_LEN_RANGE",
    0x113: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    0x114: "CKR_WRAPPING_KEY_SIZE_RANGE",
    0x115: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    0x120: "CKR_RANDOM_SEED_NOT_SUPPORTED",
    0x121: "CKR_RANDOM_NO_RNG",
    0x130: "CKR_DOMAIN_PARAMS_INVALID",
    0x140: "CKR_CURVE_NOT_SUPPORTED",
    0x150: "CKR_BUFFER_TOO_SMALL",
    0x160: "CKR_SAVED_STATE_INVALID",
    0x170: "CKR_INFORMATION_SENSITIVE",
    0x180: "CKR_STATE_UNSAVEABLE",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    0x1A0: "CKR_MUTEX_BAD",
    0x1A1: "CKR_MUTEX_NOT_LOCKED",
    0x1B0: "CKR_NEW_PIN_MODE",
    0x1B1: "CKR_NEXT_OTP",
    0x1B5: "CKR_EXCEEDED_MAX_ITERATIONS",
    0x1B6: "CKR_FIPS_SELF_TEST_FAILED",
    0x1B7: "CKR_LIBRARY_LOAD_FAILED",
    0x1B8: "CKR_PIN_TOO_WEAK",
    0x1B9: "CKR_PUBLIC_KEY_INVALID",
    0x200: "CKR_FUNCTION_REJECTED",
}
CKR_BUFFER_TOO_SMALL = 0x150


class CkrError(p11e.PKCS11Error):
    """A PKCS#11 call made without python-pkcs11 (hsm/gcm.py) returned *rv*."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"{_CODES.get(rv, 'CKR_' + hex(rv))}")
        self.rv = rv


_CODE_RE = re.compile(r"0x([0-9a-fA-F]+)")
_MESSAGES = {"not initialized": "CKR_CRYPTOKI_NOT_INITIALIZED"}


def ckr_name(exc: BaseException) -> str:
    """The CKR_* name behind a python-pkcs11 exception (``CKR_0x...`` if unknown)."""
    if isinstance(exc, CkrError):
        return _CODES.get(exc.rv, f"CKR_{exc.rv:#x}")
    for cls in type(exc).__mro__:
        name = _NAMES.get(cls)
        if name is not None:
            return name
    text = str(exc)
    for needle, mapped in _MESSAGES.items():
        if needle in text:
            return mapped
    m = _CODE_RE.search(text)
    if m:
        code = int(m.group(1), 16)
        return _CODES.get(code, f"CKR_{code:#x}")
    return "CKR_UNKNOWN"


class Fault(enum.Enum):
    """What a PKCS#11 failure means for the proxy."""

    BAD_CIPHERTEXT = "bad_ciphertext"  # the caller's data failed authentication: 400
    KEY_USAGE = "key_usage"  # the key may not do this: 400 InvalidKeyUsageException
    STALE_HANDLE = "stale_handle"  # find the key again and retry once
    SESSION = "session"  # this session is unusable: evict and replace it
    DEVICE = "device"  # the token or module is failing: reopen it, answer 500
    INTERNAL = "internal"  # anything else: 500


_DECRYPT_AUTH_FAILURE: dict[str, frozenset[str]] = {
    "generic": frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"}),
    "softhsm": frozenset(
        {"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE", "CKR_GENERAL_ERROR"}
    ),
    "luna": frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"}),
    "nshield": frozenset(
        {"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE", "CKR_FUNCTION_FAILED"}
    ),
    "cloudhsm": frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"}),
    "utimaco": frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"}),
    "protectserver": frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"}),
}

_KEY_USAGE = frozenset({"CKR_KEY_FUNCTION_NOT_PERMITTED", "CKR_KEY_TYPE_INCONSISTENT"})
_STALE = frozenset({"CKR_KEY_HANDLE_INVALID", "CKR_OBJECT_HANDLE_INVALID"})
_SESSION = frozenset({"CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED", "CKR_OPERATION_ACTIVE"})
_DEVICE = frozenset(
    {
        "CKR_DEVICE_ERROR",
        "CKR_DEVICE_REMOVED",
        "CKR_DEVICE_MEMORY",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_TOKEN_NOT_RECOGNIZED",
        "CKR_CRYPTOKI_NOT_INITIALIZED",
        "CKR_USER_NOT_LOGGED_IN",
        "CKR_SESSION_COUNT",
    }
)


def classify(name: str, operation: str, vendor: str) -> Fault:
    """Decide what CKR *name* from *operation* (encrypt, decrypt, ...) means on *vendor*."""
    if operation == "decrypt" and name in _DECRYPT_AUTH_FAILURE.get(
        vendor, _DECRYPT_AUTH_FAILURE["generic"]
    ):
        return Fault.BAD_CIPHERTEXT
    if name in _KEY_USAGE:
        return Fault.KEY_USAGE
    if name in _STALE:
        return Fault.STALE_HANDLE
    if name in _SESSION:
        return Fault.SESSION
    if name in _DEVICE:
        return Fault.DEVICE
    return Fault.INTERNAL
