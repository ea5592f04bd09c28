"""The one table that turns PKCS#11 return codes into decisions (no module is loaded here)."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11e
from pkcs11.exceptions import PKCS11Error

from xksproxy.dev.faultinject import ckr_names
from xksproxy.hsm import pkcs11_errors
from xksproxy.hsm.pkcs11_errors import CkrError, Fault, ckr_name, classify


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (p11e.GeneralError(), "CKR_GENERAL_ERROR"),
        (p11e.EncryptedDataInvalid(), "CKR_ENCRYPTED_DATA_INVALID"),
        (p11e.DeviceError(), "CKR_DEVICE_ERROR"),
        (p11e.SessionHandleInvalid(), "CKR_SESSION_HANDLE_INVALID"),
        (p11e.KeyHandleInvalid(), "CKR_KEY_HANDLE_INVALID"),
        (PKCS11Error("Unmapped error code 0x68"), "CKR_KEY_FUNCTION_NOT_PERMITTED"),
        (PKCS11Error("Unmapped error code 0x80000001"), "CKR_0x80000001"),
        (
            PKCS11Error("Initialisation error (not initialized). Should never see this."),
            "CKR_CRYPTOKI_NOT_INITIALIZED",
        ),
        (PKCS11Error("something else"), "CKR_UNKNOWN"),
    ],
)
def test_ckr_name(exc: BaseException, name: str) -> None:
    assert ckr_name(exc) == name


BAD_TAG = {
    "generic": ["CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"],
    "luna": ["CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"],
    "cloudhsm": ["CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"],
    "utimaco": ["CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"],
    "softhsm": ["CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE", "CKR_GENERAL_ERROR"],
    "nshield": [
        "CKR_ENCRYPTED_DATA_INVALID",
        "CKR_ENCRYPTED_DATA_LEN_RANGE",
        "CKR_FUNCTION_FAILED",
    ],
}


@pytest.mark.parametrize(
    ("vendor", "name"), [(v, n) for v, names in BAD_TAG.items() for n in names]
)
def test_decrypt_auth_failures_per_vendor_are_bad_ciphertext(vendor: str, name: str) -> None:
    assert classify(name, "decrypt", vendor) is Fault.BAD_CIPHERTEXT


@pytest.mark.parametrize(
    ("vendor", "name"),
    [
        ("generic", "CKR_GENERAL_ERROR"),
        ("luna", "CKR_FUNCTION_FAILED"),
        ("softhsm", "CKR_FUNCTION_FAILED"),
        ("nshield", "CKR_GENERAL_ERROR"),
    ],
)
def test_other_vendors_codes_are_not_blamed_on_the_caller(vendor: str, name: str) -> None:
    assert classify(name, "decrypt", vendor) is Fault.INTERNAL


@pytest.mark.parametrize("name", ["CKR_GENERAL_ERROR", "CKR_ENCRYPTED_DATA_INVALID"])
def test_the_same_code_on_encrypt_is_never_a_bad_ciphertext(name: str) -> None:
    assert classify(name, "encrypt", "softhsm") is Fault.INTERNAL


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("CKR_KEY_FUNCTION_NOT_PERMITTED", Fault.KEY_USAGE),
        ("CKR_KEY_TYPE_INCONSISTENT", Fault.KEY_USAGE),
        ("CKR_KEY_HANDLE_INVALID", Fault.STALE_HANDLE),
        ("CKR_OBJECT_HANDLE_INVALID", Fault.STALE_HANDLE),
        ("CKR_SESSION_HANDLE_INVALID", Fault.SESSION),
        ("CKR_SESSION_CLOSED", Fault.SESSION),
        ("CKR_OPERATION_ACTIVE", Fault.SESSION),
        ("CKR_DEVICE_ERROR", Fault.DEVICE),
        ("CKR_DEVICE_REMOVED", Fault.DEVICE),
        ("CKR_DEVICE_MEMORY", Fault.DEVICE),
        ("CKR_TOKEN_NOT_PRESENT", Fault.DEVICE),
        ("CKR_TOKEN_NOT_RECOGNIZED", Fault.DEVICE),
        ("CKR_CRYPTOKI_NOT_INITIALIZED", Fault.DEVICE),
        ("CKR_USER_NOT_LOGGED_IN", Fault.DEVICE),
        ("CKR_SESSION_COUNT", Fault.DEVICE),
        ("CKR_HOST_MEMORY", Fault.INTERNAL),
        ("CKR_MECHANISM_INVALID", Fault.INTERNAL),
        ("CKR_0x80000001", Fault.INTERNAL),
    ],
)
@pytest.mark.parametrize("operation", ["encrypt", "decrypt", "find_key"])
def test_fault_table(name: str, fault: Fault, operation: str) -> None:
    assert classify(name, operation, "generic") is fault


def test_the_code_table_is_the_one_the_fault_injection_module_knows() -> None:
    """Both tables are PKCS#11 v2.40's return codes (CKR_OK and the vendor range aside): the
    names of calls made without python-pkcs11 match what the shim can inject."""
    ours = set(pkcs11_errors._CODES.values()) | {"CKR_OK", "CKR_VENDOR_DEFINED"}
    assert ours == ckr_names()


@pytest.mark.parametrize(
    ("rv", "name"), [(0x71, "CKR_MECHANISM_PARAM_INVALID"), (0x80000001, "CKR_0x80000001")]
)
def test_a_raw_return_code_is_named(rv: int, name: str) -> None:
    assert ckr_name(CkrError(rv)) == name
