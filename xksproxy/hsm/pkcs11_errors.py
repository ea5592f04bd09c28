"""PKCS#11 return codes: their names, what they mean for the proxy, per operation and vendor.

The one place where a python-pkcs11 exception becomes a decision: is the caller's ciphertext
bad, is the key handle stale, is the session broken, is the device failing?  Decrypt failures
are vendor specific: SoftHSM reports a wrong GCM tag as CKR_GENERAL_ERROR, most HSMs as
CKR_ENCRYPTED_DATA_INVALID, nShield as CKR_FUNCTION_FAILED (DESIGN.md §3).
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

# Codes python-pkcs11 has no class for; it raises PKCS11Error("Unmapped error code 0x68").
_CODES: dict[int, str] = {
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}
_CODE_RE = re.compile(r"0x([0-9a-fA-F]+)")
_MESSAGES = {"not initialized": "CKR_CRYPTOKI_NOT_INITIALIZED"}


def ckr_name(exc: BaseException) -> str:
    """The CKR_* name behind a python-pkcs11 exception (``CKR_0x...`` if unknown)."""
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
