"""Loading a PKCS#11 module so that it may be used from several threads.

python-pkcs11 calls ``C_Initialize(NULL)``, which tells a module that the application will not
use it from several threads: SoftHSM then turns its own locking off and crashes under threads
(docs/architecture.md §3).  We initialise it with ``CKF_OS_LOCKING_OK`` instead, by overriding
``lib.initialize`` and calling ``C_Initialize`` through ctypes on the same module.  Tested with
python-pkcs11 0.10.x and SoftHSM 2.6 (the range pinned in pyproject.toml).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import threading
from collections.abc import Mapping
from typing import Any

import pkcs11
from pkcs11 import _pkcs11
from pkcs11.exceptions import PKCS11Error

from xksproxy.hsm.pkcs11_errors import CkrError

CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_InitFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)
# The data path's functions, called straight through the module's function list (hsm/gcm.py):
# ctypes releases the GIL around each call, as python-pkcs11 does.
_CryptInitFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong)
_CryptFn = ctypes.CFUNCTYPE(
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_ulong),
)
_CopyFn = ctypes.CFUNCTYPE(
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.POINTER(ctypes.c_ulong),
)
_DestroyFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_AttributeFn = ctypes.CFUNCTYPE(
    ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong
)
_TokenInfoFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)
_Other = ctypes.c_void_p  # an entry this module never calls through ctypes

# CK_FUNCTION_LIST (PKCS#11 v2.40) up to C_Decrypt: a CK_VERSION, then the functions in the
# standard's order.
_FUNCTION_LIST_FIELDS: list[tuple[str, Any]] = [
    ("major", ctypes.c_ubyte),
    ("minor", ctypes.c_ubyte),
    ("C_Initialize", _InitFn),
    ("C_Finalize", _InitFn),
    *(
        (name, _Other)
        for name in [
            "C_GetInfo",
            "C_GetFunctionList",
            "C_GetSlotList",
            "C_GetSlotInfo",
        ]
    ),
    ("C_GetTokenInfo", _TokenInfoFn),
    *(
        (name, _Other)
        for name in [
            "C_GetMechanismList",
            "C_GetMechanismInfo",
            "C_InitToken",
            "C_InitPIN",
            "C_SetPIN",
            "C_OpenSession",
            "C_CloseSession",
            "C_CloseAllSessions",
            "C_GetSessionInfo",
            "C_GetOperationState",
            "C_SetOperationState",
            "C_Login",
            "C_Logout",
            "C_CreateObject",
        ]
    ),
    ("C_CopyObject", _CopyFn),
    ("C_DestroyObject", _DestroyFn),
    *(
        (name, _Other)
        for name in [
            "C_GetObjectSize",
        ]
    ),
    ("C_GetAttributeValue", _AttributeFn),
    *(
        (name, _Other)
        for name in [
            "C_SetAttributeValue",
            "C_FindObjectsInit",
            "C_FindObjects",
            "C_FindObjectsFinal",
        ]
    ),
    ("C_EncryptInit", _CryptInitFn),
    ("C_Encrypt", _CryptFn),
    ("C_EncryptUpdate", _Other),
    ("C_EncryptFinal", _Other),
    ("C_DecryptInit", _CryptInitFn),
    ("C_Decrypt", _CryptFn),
]


class FunctionList(ctypes.Structure):
    """The module's ``CK_FUNCTION_LIST``, as far as this package calls it directly."""

    _fields_ = _FUNCTION_LIST_FIELDS


class _CkAttribute(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_ulong),
        ("pValue", ctypes.c_void_p),
        ("ulValueLen", ctypes.c_ulong),
    )


_CKA_TOKEN, _CKA_EXTRACTABLE = 0x1, 0x162
_FALSE = ctypes.c_ubyte(0)
# A session object that can never leave the HSM, even wrapped: CKA_TOKEN and CKA_EXTRACTABLE
# false (PKCS#11 lets a copy only become stricter).  Lives as long as the module.
_SESSION_COPY = (_CkAttribute * 2)(
    _CkAttribute(_CKA_TOKEN, ctypes.addressof(_FALSE), 1),
    _CkAttribute(_CKA_EXTRACTABLE, ctypes.addressof(_FALSE), 1),
)


def session_copy_blocking(functions: FunctionList, session: int, handle: int) -> int:
    """C_CopyObject of object *handle* into a non-extractable session object; its handle.
    CkrError if the HSM refuses."""
    copy = ctypes.c_ulong()
    rv = functions.C_CopyObject(session, handle, _SESSION_COPY, 2, ctypes.byref(copy))
    if rv:
        raise CkrError(rv)
    return copy.value


def read_flags_blocking(
    functions: FunctionList, session: int, handle: int, types: tuple[int, ...]
) -> tuple[bool, ...]:
    """The CK_BBOOL attributes *types* of object *handle* (an unreadable one counts as false).
    CkrError if the object cannot be read at all (a stale handle)."""
    values = (ctypes.c_ubyte * len(types))()
    template = (_CkAttribute * len(types))(
        *(_CkAttribute(t, ctypes.addressof(values) + i, 1) for i, t in enumerate(types))
    )
    rv = functions.C_GetAttributeValue(session, handle, template, len(types))
    # CKR_ATTRIBUTE_SENSITIVE / _TYPE_INVALID: the others are still filled in (PKCS#11 5.7).
    if rv not in (0, 0x11, 0x12):
        raise CkrError(rv)
    return tuple(bool(values[i]) and template[i].ulValueLen == 1 for i in range(len(types)))


class _TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO (PKCS#11 v2.40 section 3.2)."""

    _fields_ = (
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", ctypes.c_ulong),
        *((name, ctypes.c_ulong) for name in (
            "ulMaxSessionCount", "ulSessionCount", "ulMaxRwSessionCount", "ulRwSessionCount",
            "ulMaxPinLen", "ulMinPinLen", "ulTotalPublicMemory", "ulFreePublicMemory",
            "ulTotalPrivateMemory", "ulFreePrivateMemory",
        )),
        ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2),
        ("utcTime", ctypes.c_char * 16),
    )  # fmt: skip


CKF_CLOCK_ON_TOKEN = 0x40


def token_clock_blocking(functions: FunctionList, slot_id: int) -> str | None:
    """The token's own clock, ``YYYYMMDDhhmmss`` (UTC), if it has one (CKF_CLOCK_ON_TOKEN);
    None if it has none.  CkrError if the token cannot be asked."""
    info = _TokenInfo()
    rv = functions.C_GetTokenInfo(slot_id, ctypes.byref(info))
    if rv:
        raise CkrError(rv)
    if not info.flags & CKF_CLOCK_ON_TOKEN:
        return None
    return bytes(info.utcTime)[:14].decode("ascii", "replace")


def destroy_blocking(functions: FunctionList, session: int, handle: int) -> None:
    """C_DestroyObject; a failure is ignored (the object dies with its session anyway)."""
    functions.C_DestroyObject(session, handle)


class Pkcs11InitError(Exception):
    """The module could not be loaded or initialised."""

    def __init__(self, message: str, rv: int = 0) -> None:
        super().__init__(message)
        self.rv = rv


def _function_list(path: str) -> FunctionList:
    dll = ctypes.CDLL(path)  # the same handle python-pkcs11 holds: dlopen is refcounted
    get_list = dll.C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(FunctionList))]
    ptr = ctypes.POINTER(FunctionList)()
    rv = get_list(ctypes.byref(ptr))
    if rv != CKR_OK or not ptr:
        raise Pkcs11InitError(f"C_GetFunctionList failed: {rv:#x}", rv)
    return ptr.contents


class ThreadSafeLib(_pkcs11.lib):
    """A python-pkcs11 ``lib`` initialised with CKF_OS_LOCKING_OK."""

    _fl: FunctionList | None = None
    env: Mapping[str, str] = {}

    @property
    def functions(self) -> FunctionList:
        """The module's function list, for calls made without python-pkcs11 (hsm/gcm.py)."""
        if self._fl is None:
            self._fl = _function_list(self.so)
        return self._fl

    def initialize(self) -> None:
        """C_Initialize with OS locking; an already initialised module is fine."""
        if self._fl is None:
            self._fl = _function_list(self.so)
        args = _InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = self._fl.C_Initialize(ctypes.addressof(args))
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise Pkcs11InitError(f"C_Initialize failed: {rv:#x}", rv)

    def finalize_module(self) -> None:
        """C_Finalize: every session of this process on this module is closed."""
        if self._fl is not None:
            rv = self._fl.C_Finalize(None)
            if rv not in (CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED):
                raise Pkcs11InitError(f"C_Finalize failed: {rv:#x}", rv)

    def reinitialize_module(self) -> None:
        """Finalize and initialise again, as after a device error that needs it.

        The module's environment is applied again first, under the loader's lock: another
        module loaded since may have set the same variables (SOFTHSM2_CONF) to its own values.
        """
        with _libs_lock:
            os.environ.update(self.env)
            self.finalize_module()
            self.initialize()


_libs: dict[str, ThreadSafeLib] = {}
_users: dict[str, set[str]] = {}
_libs_lock = threading.RLock()


@atexit.register
def _finalize_all() -> None:
    """C_Finalize every module at exit, while the interpreter can still run python-pkcs11's
    clean-up (a lib left for interpreter teardown can fail in its __dealloc__)."""
    with _libs_lock:
        for lib in _libs.values():
            with contextlib.suppress(Pkcs11InitError):
                lib.finalize_module()
        _libs.clear()


def load_library(path: str, env: Mapping[str, str] | None = None, user: str = "") -> ThreadSafeLib:
    """Load (once per process) and initialise the module at *path* for *user* (an HSM name).

    *env* is applied to the process environment first: modules such as SoftHSM read their
    configuration (``SOFTHSM2_CONF``) when they are initialised.
    """
    with _libs_lock:
        os.environ.update(env or {})
        lib = _libs.get(path)
        if lib is None:
            try:
                lib = ThreadSafeLib(path)
            except PKCS11Error as exc:
                raise Pkcs11InitError(f"cannot load PKCS#11 module {path}: {exc}") from exc
            lib.env = dict(env or {})
            _libs[path] = lib
        _users.setdefault(path, set()).add(user)
        return lib


def find_token(lib: ThreadSafeLib, label: str | None, serial: str | None) -> pkcs11.Token:
    """The token with *label*, or with *serial* (PKCS11Error subclasses when there is none)."""
    if serial is not None:
        return lib.get_token(token_serial=serial.encode())
    return lib.get_token(token_label=label)


def shared_with_others(path: str, user: str) -> bool:
    """Whether HSMs other than *user* use the module at *path* (then it must not be
    finalized: that would close their sessions too)."""
    with _libs_lock:
        return bool(_users.get(path, set()) - {user})
